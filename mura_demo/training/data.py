"""Training and evaluation data: MURA's official layout and the UNIFESP body-region set.

Every sample carries a body-part target (a distribution over the body-part classes, so an
image labelled with two parts counts half for each) and, for MURA images, an abnormality
label. Splits are deterministic hashes of the patient (MURA) or image (UNIFESP), so a patient
never straddles the training split and its holdout.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.config import BODY_PARTS, OTHER, ModelConfig
from ..core.imaging import load_image
from ..core.preprocess import letterbox
from .panels import Box, panel_boxes

# UNIFESP region names that are MURA body parts; "Others" is mixed (it may hold arm views),
# so images labelled only "Others" are left out rather than taught as "not upper extremity".
UNIFESP_PARTS = {
    "Elbow": "elbow",
    "Finger": "finger",
    "Forearm": "forearm",
    "Hand": "hand",
    "Shoulder": "shoulder",
    "Wrist": "wrist",
}
UNIFESP_AMBIGUOUS = "Others"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One radiograph with what is known about it."""

    path: Path
    body_parts: tuple[str, ...]  # its body-part class(es): MURA parts or "other"
    abnormal: int | None  # 1/0 for MURA images, None where unknown
    study: str  # study folder (MURA) or the image itself (UNIFESP)
    patient: str
    source: str  # "mura" or "unifesp"
    end: str | None = None  # "first"/"last": only this end of the image's long side (an end crop)
    panel: Box | None = None  # only this box of a film that holds several views
    region: str = ""  # a non-arm UNIFESP image's region label ("Chest", "Knee;Lower Leg"): what it is instead


def bucket(key: str) -> int:
    """A stable bucket in 0..99 for ``key``: the same on every machine and run."""
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100


def mura_samples(root: str | Path, split: str) -> list[Sample]:
    """Images of MURA's ``split`` ("train" or "valid"), labelled per study, from the official CSVs.

    ``root`` is the folder that holds ``MURA-v1.1/``; the CSV paths are relative to it.
    Whatever subset of body parts is present is read.
    """
    root = Path(root)
    labels = {}
    with open(root / "MURA-v1.1" / f"{split}_labeled_studies.csv", newline="") as fh:
        for study, label in csv.reader(fh):
            labels[study.rstrip("/")] = int(label)
    samples = []
    with open(root / "MURA-v1.1" / f"{split}_image_paths.csv", newline="") as fh:
        for (rel,) in csv.reader(fh):
            study = rel.rsplit("/", 1)[0]
            part_folder, patient = study.split("/")[2:4]
            part = part_folder.removeprefix("XR_").lower()
            if part not in BODY_PARTS:
                raise ValueError(f"{rel}: unknown MURA body part {part_folder}")
            samples.append(Sample(root / rel, (part,), labels[study], study, patient, "mura"))
    return samples


def unifesp_samples(folder: str | Path) -> list[Sample]:
    """UNIFESP radiographs with their body-part classes ("other" when no upper-extremity label)."""
    folder = Path(folder)
    samples = []
    with open(folder / "labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            regions = [r.strip() for r in row["classes"].split(";") if r.strip()]
            parts = tuple(sorted({UNIFESP_PARTS[r] for r in regions if r in UNIFESP_PARTS}))
            region = ""
            if not parts:
                if regions == [UNIFESP_AMBIGUOUS]:
                    continue
                parts, region = (OTHER,), ";".join(regions)
            key = row["image"]
            samples.append(Sample(folder / key, parts, None, key, key, "unifesp", region=region))
    return samples


HOLDOUT_BUCKETS = range(0, 15)  # 15% of patients: model selection and thresholds
TEST_BUCKETS = range(85, 100)  # 15% of UNIFESP images: final test (MURA has its own `valid`)
# MURA has no elbow `valid`: a quarter of the elbow patients (48 of 194, 52 studies, 152 images) is
# the elbow test share, carved once before any elbow training and never used for a choice.
ELBOW_TEST_BUCKETS = range(0, 25)


def is_elbow_test_patient(patient: str) -> bool:
    return bucket(f"mura-elbow-test:{patient}") in ELBOW_TEST_BUCKETS


# The non-test MURA elbows (train and holdout, 153 studies) in patient folds: a selection set for the elbow larger
# than the holdout's 22 studies, each fold scored by a run that trained on the others (`train --elbow-fold`).
ELBOW_FOLDS = 5


def elbow_fold(patient: str) -> int:
    """The fold (1..ELBOW_FOLDS) of a non-test MURA elbow patient."""
    return bucket(patient) % ELBOW_FOLDS + 1


def is_mura_elbow(sample: Sample) -> bool:
    return sample.source == "mura" and sample.body_parts == ("elbow",)


def elbow_fold_splits(splits: dict[str, list[Sample]], fold: int) -> dict[str, list[Sample]]:
    """Train and holdout for elbow fold ``fold``: its patients leave training (every image of theirs), its elbows
    are the holdout's elbows, and the other folds' elbows, the holdout's included, train. The rest is unchanged."""
    if fold not in range(1, ELBOW_FOLDS + 1):
        raise ValueError(f"--elbow-fold is one of 1..{ELBOW_FOLDS}; got {fold}")
    elbows = [s for s in splits["train"] + splits["holdout"] if is_mura_elbow(s)]
    scored = {s.patient for s in elbows if elbow_fold(s.patient) == fold}
    trained = splits["train"] + [s for s in splits["holdout"] if is_mura_elbow(s)]
    return {
        **splits,
        "train": [s for s in trained if not (s.source == "mura" and s.patient in scored)],
        "holdout": [s for s in splits["holdout"] if not is_mura_elbow(s)] + [s for s in elbows if s.patient in scored],
    }


def split_by_patient(samples: list[Sample]) -> dict[str, list[Sample]]:
    """Split into train / holdout / test by patient: a patient never straddles two splits.

    MURA images go to train or holdout (MURA ``valid`` is the test set), except the elbow test
    share: its patients' elbow images are test, and their other images are left out so that no
    test patient is trained on. UNIFESP images, which have no official split, also give a test share.
    """
    splits: dict[str, list[Sample]] = {"train": [], "holdout": [], "test": []}
    elbow_patients = {s.patient for s in samples if is_mura_elbow(s)}
    for s in samples:
        b = bucket(f"{s.source}:{s.patient}")
        if s.source == "mura" and s.patient in elbow_patients and is_elbow_test_patient(s.patient):
            if s.body_parts == ("elbow",):
                splits["test"].append(s)
        elif b in HOLDOUT_BUCKETS:
            splits["holdout"].append(s)
        elif b in TEST_BUCKETS and s.source == "unifesp":
            splits["test"].append(s)
        else:
            splits["train"].append(s)
    return splits


def load_splits(data_root: str | Path) -> dict[str, list[Sample]]:
    """Train, holdout and test samples under ``data_root`` (the folder holding MURA-v1.1/).

    ``test`` holds MURA ``valid`` and the UNIFESP test share: touch it only for final figures.
    """
    data_root = Path(data_root)
    unifesp_dir = data_root / "unifesp-bodypart"
    extra = unifesp_samples(unifesp_dir) if unifesp_dir.exists() else []
    splits = split_by_patient(mura_samples(data_root, "train") + extra)
    splits["test"] = mura_samples(data_root, "valid") + splits["test"]
    return splits


def abnormality_rows(samples: list[Sample], parts: tuple[str, ...]) -> dict[str, list[int]]:
    """Indices of the images of each part that carry an abnormality label (parts without any are left out)."""
    rows: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        if s.abnormal is not None and len(s.body_parts) == 1 and s.body_parts[0] in parts:
            rows.setdefault(s.body_parts[0], []).append(i)
    return {part: rows[part] for part in parts if part in rows}


def patients_of(samples: list[Sample], studies: list[str]) -> list[str]:
    """The patient of each study, for study-level steps that must keep a patient's studies together."""
    patient = {s.study: s.patient for s in samples}
    return [patient[study] for study in studies]


def is_withheld(sample: Sample, spec: str | None) -> bool:
    """Whether ``sample`` is one source's image of one part named by ``spec`` (``"mura:elbow"``)."""
    if not spec:
        return False
    source, _, part = spec.partition(":")
    if part not in BODY_PARTS or source not in ("mura", "unifesp"):
        raise ValueError(f"withhold takes SOURCE:PART, e.g. mura:elbow; got '{spec}'")
    return sample.source == source and part in sample.body_parts


def withhold(samples: list[Sample], spec: str | None) -> list[Sample]:
    """Leave out the images ``spec`` names: the leave-one-source-out run."""
    return [s for s in samples if not is_withheld(s, spec)]


# MURA-style views of parts this project has no MURA images of: the two ends of a forearm image
# show the elbow and the wrist, those of a humerus image the shoulder and the elbow. Which end is
# which is not known, so an end crop is labelled with both candidates ("either is right").
END_CROP_PARTS = {"forearm": ("elbow", "wrist"), "humerus": ("elbow", "shoulder")}
END_CROP_SHARE = 0.5  # of the long side


def end_crops(samples: list[Sample]) -> list[Sample]:
    """Both end crops of every MURA forearm and humerus image in ``samples`` (no abnormality label)."""
    return [
        dataclasses.replace(s, body_parts=END_CROP_PARTS[s.body_parts[0]], abnormal=None, end=end)
        for s in samples
        if s.source == "mura" and s.body_parts[0] in END_CROP_PARTS and s.end is None
        for end in ("first", "last")
    ]


def crop_siblings(samples: list[Sample]) -> torch.Tensor:
    """For the first end crop of an image, the index of its other end (the next sample, as
    :func:`end_crops` lays them out); -1 for every other sample."""

    def pairs_with_next(i: int, s: Sample) -> bool:
        return s.end == "first" and i + 1 < len(samples) and samples[i + 1] == dataclasses.replace(s, end="last")

    return torch.tensor([i + 1 if pairs_with_next(i, s) else -1 for i, s in enumerate(samples)])


def crop_end(image: Image.Image, end: str) -> Image.Image:
    """The first or last ``END_CROP_SHARE`` of the image along its long side."""
    w, h = image.size
    if w >= h:
        cut = round(w * END_CROP_SHARE)
        return image.crop((0, 0, cut, h) if end == "first" else (w - cut, 0, w, h))
    cut = round(h * END_CROP_SHARE)
    return image.crop((0, 0, w, cut) if end == "first" else (0, h - cut, w, h))


def single_views(samples: list[Sample]) -> list[Sample]:
    """Each view of every UNIFESP film in ``samples`` that holds several (MURA images are single views), labelled
    as its film: what the film shows, one of its views shows as well, and :func:`panel_boxes` says where."""
    return [
        dataclasses.replace(s, panel=box)
        for s in samples
        if s.source == "unifesp" and s.end is None and s.panel is None
        for boxes in [panel_boxes(load_image(s.path))]
        if len(boxes) > 1
        for box in boxes
    ]


def load_images(samples: list[Sample], size: int) -> torch.Tensor:
    """Decode and letterbox every sample once: a uint8 (N, 1, size, size) tensor kept in memory."""
    out = torch.empty((len(samples), 1, size, size), dtype=torch.uint8)
    for i, s in enumerate(samples):
        grey = load_image(s.path)  # the one decoder serving uses too (EXIF orientation, 16-bit, alpha)
        grey = grey.crop(s.panel) if s.panel else grey
        square, _ = letterbox(crop_end(grey, s.end) if s.end else grey, size)
        out[i, 0] = torch.from_numpy(np.asarray(square, dtype=np.uint8).copy())
    return out


def body_part_images(samples: list[Sample], config: ModelConfig, load=load_images) -> torch.Tensor | None:
    """``samples`` letterboxed for the body part where a pair's body-part network reads a size of its own (None:
    the body part is read from the model inputs). ``load``: ``load_images`` or a cached copy of it, where several
    configs read the same samples."""
    return load(samples, config.body_part_image_size) if config.own_body_part_letterbox else None


def model_images(
    samples: list[Sample], config: ModelConfig, load=load_images
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``samples`` letterboxed as ``config``'s model reads them: its inputs, and the body part's own letterboxes
    where it has them (see :func:`body_part_images`); the arguments ``score_images`` takes after the config."""
    return load(samples, config.input_size), body_part_images(samples, config, load)


def body_part_targets(samples: list[Sample], classes: tuple[str, ...]) -> torch.Tensor:
    """(N, len(classes)) target distributions: an image with k labels puts 1/k on each."""
    t = torch.zeros((len(samples), len(classes)))
    for i, s in enumerate(samples):
        for part in s.body_parts:
            t[i, classes.index(part)] = 1.0 / len(s.body_parts)
    return t


def group_of(sample: Sample) -> str:
    """The group body-part accuracy is reported by: source and part, e.g. ``mura/elbow``, never pooled."""
    kind = f"{sample.source}-end-crop" if sample.end else sample.source
    return f"{kind}/{'+'.join(sample.body_parts)}"
