"""Batch: run the model over a folder tree and keep predictions and heatmaps on disk.

``predictions.csv`` gets one row per image and is appended as it goes, so an interrupted run
resumes where it stopped; ``studies.csv`` (one row per study folder: mean of its views, as in
the MURA paper) is rebuilt from it at the end. Unreadable files are skipped with the reason
logged to ``skipped.log``.
"""

from __future__ import annotations

import csv
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .explain import method_slug
from .imaging import ImageInputError
from .predictor import AUTO, Predictor

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"}
PREDICTION_FIELDS = ["path", "study", "body_part", "predicted_body_part", "body_part_probability",
                     "abnormality_probability", "threshold", "verdict", "validated"]  # fmt: skip


def find_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def heatmap_name(relative: Path, method: str) -> str:
    return "__".join(relative.with_suffix("").parts) + f"_{method_slug(method)}.png"


def run_batch(predictor: Predictor, folder, out, body_part: str = AUTO, methods=("gradcam",)) -> dict:
    """Predict every image under ``folder`` into ``out``; returns counts of done, skipped and resumed."""
    folder, out = Path(folder), Path(out)
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    predictions = out / "predictions.csv"
    done = set()
    if predictions.exists():
        with open(predictions, newline="") as fh:
            done = {row["path"] for row in csv.DictReader(fh)}
    todo = [p for p in find_images(folder) if str(p.relative_to(folder)) not in done]
    counts = Counter(resumed=len(done))
    new_file = not predictions.exists()
    with open(predictions, "a", newline="") as fh, open(out / "skipped.log", "a") as log:
        writer = csv.DictWriter(fh, PREDICTION_FIELDS)
        if new_file:
            writer.writeheader()
        for path in tqdm(todo, desc="batch", file=sys.stderr, mininterval=2):
            relative = path.relative_to(folder)
            try:
                analysis = predictor.analyze(path, body_part, methods)
            except ImageInputError as err:
                log.write(f"{relative}\t{err}\n")
                counts["skipped"] += 1
                continue
            p = analysis.prediction
            for method, rgb in analysis.overlays().items():
                Image.fromarray(rgb).save(out / "heatmaps" / heatmap_name(relative, method), compress_level=1)
            writer.writerow(prediction_row(relative, p))
            fh.flush()
            counts["done"] += 1
    write_studies(predictor, predictions, out / "studies.csv")
    return dict(counts)


def prediction_row(relative: Path, p) -> dict:
    def blank(value):
        return "" if value is None else value

    top = p.body_part or p.predicted_body_part
    return {
        "path": str(relative),
        "study": str(relative.parent),
        "body_part": blank(p.body_part),
        "predicted_body_part": p.predicted_body_part,
        "body_part_probability": p.body_part_probabilities[top],
        "abnormality_probability": blank(p.abnormality_probability),
        "threshold": blank(p.threshold),
        "verdict": p.verdict,
        "validated": blank(p.validated),
    }


def write_studies(predictor: Predictor, predictions: Path, path: Path) -> None:
    """One row per study folder: the views' majority part and mean abnormality probability."""
    views = defaultdict(list)
    with open(predictions, newline="") as fh:
        for row in csv.DictReader(fh):
            views[row["study"]].append(row)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study", "views", "body_part", "abnormality_probability", "threshold", "verdict", "label"])
        for study, rows in sorted(views.items()):
            parts = Counter(r["body_part"] for r in rows if r["body_part"])
            label = "1" if study.endswith("_positive") else "0" if study.endswith("_negative") else ""
            if not parts:
                writer.writerow([study, len(rows), "", "", "", "not an upper-extremity radiograph", label])
                continue
            part = parts.most_common(1)[0][0]
            prob = float(np.mean([float(r["abnormality_probability"]) for r in rows if r["body_part"] == part]))
            reading = predictor.decide(part, prob, None)
            values = [reading[key] for key in ("abnormality_probability", "threshold", "verdict")]
            writer.writerow([study, len(rows), part, *values, label])
