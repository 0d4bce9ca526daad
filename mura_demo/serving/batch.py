"""Batch: run the model over a folder tree and keep predictions and heatmaps on disk.

Files are grouped into studies only where the layout says so (a folder named ``study...``, as
MURA lays out its studies) or the user asks (``--studies folders``); otherwise each file is its
own study. Each study is read by the same rule as the app and the API
(:meth:`Predictor.analyze_study`). ``predictions.csv`` (one row per view) and ``studies.csv``
(one row per study, saying how it was formed) are appended study by study, so an interrupted run
resumes where it stopped. Unreadable files are left out of their study, the reason logged to
``skipped.log``.
"""

from __future__ import annotations

import contextlib
import csv
import sys
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..core.checks import UserError, find_images
from ..core.explain import method_slug
from ..core.imaging import load_views
from .predictor import Predictor
from .reading import AUTO

STUDY_RULES = {
    "auto": "auto: the images of a folder named study* (MURA's layout) are one study, any other file is its own",
    "folders": "folders: the images directly in each folder are one study",
    "files": "files: every file is its own study",
}
VIEW_FIELDS = ["path", "study", "body_part", "body_part_status", "predicted_body_part", "body_part_probability",
               "abnormality_probability", "threshold", "verdict", "validated"]  # fmt: skip
STUDY_FIELDS = ["study", "formed_by", "views", "body_part", "body_part_status", "abnormality_probability",
                "threshold", "verdict", "validated", "views_answered_other", "label"]  # fmt: skip


def group_studies(folder: Path, rule: str) -> dict[str, tuple[str, list[Path]]]:
    """Study name -> (how it was formed, its files), by ``rule`` (see :data:`STUDY_RULES`)."""
    if rule not in STUDY_RULES:
        raise UserError(f"Unknown study rule '{rule}'. Choose one of: {', '.join(STUDY_RULES)}.")
    studies: dict[str, tuple[str, list[Path]]] = {}
    for path in find_images(folder):
        parent = path.parent.relative_to(folder)
        if rule == "folders" or (rule == "auto" and path.parent.name.lower().startswith("study")):
            formed = "folder" if rule == "folders" else "folder named study*"
            studies.setdefault(str(parent), (formed, []))[1].append(path)
        else:
            studies[str(path.relative_to(folder))] = ("single file", [path])
    return studies


def heatmap_name(relative: str, method: str) -> str:
    return relative.replace("/", "__").rsplit(".", 1)[0] + f"_{method_slug(method)}.png"


def blank(value):
    return "" if value is None else value


def run_batch(
    predictor: Predictor, folder, out, body_part: str = AUTO, methods=("gradcam",), studies: str = "auto"
) -> dict:
    """Predict every study under ``folder`` into ``out``; returns counts of studies done, files skipped, studies
    resumed."""
    folder, out = Path(folder), Path(out)
    predictor.check_request(body_part, None, methods)
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    grouped = group_studies(folder, studies)
    done = set()
    if (out / "studies.csv").exists():
        with open(out / "studies.csv", newline="") as fh:
            done = {row["study"] for row in csv.DictReader(fh)}
    counts = Counter(resumed=len(done & set(grouped)))
    with (
        appending_csv(out / "predictions.csv", VIEW_FIELDS) as write_view,
        appending_csv(out / "studies.csv", STUDY_FIELDS) as write_study,
        open(out / "skipped.log", "a") as skipped,
    ):
        for name, (formed, files) in tqdm(grouped.items(), desc="batch", file=sys.stderr, mininterval=2):
            if name in done:
                continue
            views, labels = [], []
            for path in files:
                relative = str(path.relative_to(folder))
                try:
                    frames = load_views(path)
                except UserError as err:
                    skipped.write(f"{relative}\t{err}\n")
                    counts["skipped"] += 1
                    continue
                views += frames
                labels += [relative] if len(frames) == 1 else [f"{relative}#{i + 1}" for i in range(len(frames))]
            try:
                analysis = predictor.analyze_study(views, body_part, methods)
            except UserError as err:  # no readable view, or more views than a study may have
                skipped.write(f"{name}\t{err}\n")
                continue
            for label, view in zip(labels, analysis.views):
                for method, rgb in view.overlays().items():
                    Image.fromarray(rgb).save(out / "heatmaps" / heatmap_name(label, method), compress_level=1)
                write_view(view_row(label, name, view.prediction.to_dict()))
            st = analysis.study
            mura_label = "1" if name.endswith("_positive") else "0" if name.endswith("_negative") else ""
            write_study(
                {key: blank(st.get(key)) for key in STUDY_FIELDS}
                | {"study": name, "formed_by": formed, "views": len(views), "label": mura_label}
                | {"views_answered_other": " ".join(map(str, st["views_answered_other"]))}
            )
            counts["done"] += 1
    return dict(counts)


@contextlib.contextmanager
def appending_csv(path: Path, fields: list[str]):
    """A writer of rows appended to ``path`` (header written once), flushed after every row so that a
    killed run leaves whole rows."""
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        if new:
            writer.writeheader()

        def write(row: dict) -> None:
            writer.writerow(row)
            fh.flush()

        yield write


def view_row(label: str, study: str, p: dict) -> dict:
    top = p["body_part"] or p["predicted_body_part"]
    return {key: blank(p.get(key)) for key in VIEW_FIELDS} | {
        "path": label,
        "study": study,
        "body_part_probability": p["body_part_probabilities"][top],
    }
