"""Do networks trained with the elbows read them better than the shipped one? Session 44's screen.

Each folder is a run of ``train --elbow-fold K``: it trained on every non-test MURA elbow outside fold K, and reads
fold K's elbows here (image and mirror averaged, as served, whatever flip its finalize chose). The five folds pooled
give an out-of-fold study AUROC over all 153 non-test elbow studies, printed beside the reference network's on the
same studies, with a paired bootstrap over patients of the difference. Each run's forearm and humerus holdout study
AUROC (the holdout those parts keep in a fold run) is printed from its config. No test image is read.

A comma-joined item (``a,b,c``: runs of one fold) is read as the uniform average of their weights, the network
`average` would make, without its finalize: its forearm and humerus holdout AUROCs are read here (mirror included).

    python -m benchmarks.elbow_folds runs/s44/f1/weights ... runs/s44/f5/weights --reference weights
    python -m benchmarks.elbow_folds runs/s45/f1/weights,runs/s47/s1f1/weights ... --reference weights
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from benchmarks.elbow_head import study_figures, versus
from mura_demo.core.inference import score_images
from mura_demo.core.malloc import tune_for_batch_work
from mura_demo.core.weights import load_folder
from mura_demo.training.data import ELBOW_FOLDS, elbow_fold, is_mura_elbow, load_images, load_splits
from mura_demo.training.metrics import auroc
from mura_demo.training.train import averaged_state, part_study_scores

ARMS = ("forearm", "humerus")


def elbow_probabilities(model, config, samples) -> np.ndarray:
    """The elbow abnormality probability of each sample as the network reads it, mirror image included."""
    config = dataclasses.replace(config, test_time_flip=True)
    _, abnormal = score_images(model, config, load_images(samples, config.input_size))
    return abnormal[:, config.body_parts.index("elbow")].numpy()


def fold_network(item: str):
    """A fold run's network and config, or the uniform weight average of a comma-joined list of one fold's runs."""
    loaded = [load_folder(folder) for folder in item.split(",")]
    model, config = loaded[0]
    if len(loaded) > 1:
        try:
            model.load_state_dict(averaged_state(loaded))
        except ValueError as err:
            raise SystemExit(f"{item}: {err}") from None
    return model, config


def arms_auroc(model, config, holdout) -> list[float]:
    """Forearm and humerus holdout study AUROC, image and mirror averaged (as a run's holdout figures are made)."""
    config = dataclasses.replace(config, test_time_flip=True)
    samples = [s for s in holdout if s.source == "mura" and s.body_parts in [(part,) for part in ARMS]]
    _, abnormal = score_images(model, config, load_images(samples, config.input_size))
    studies = part_study_scores(config, samples, abnormal)
    return [auroc(*studies[part][1:]) for part in ARMS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs",
        nargs="+",
        help=f"fold runs' weights folders (all {ELBOW_FOLDS} for the figure; a,b,c: their weight average)",
    )
    parser.add_argument("--reference", default="weights", help="the network to beat (default: the shipped weights)")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args()
    tune_for_batch_work()

    splits = load_splits(args.data_root)
    elbows = [s for s in splits["train"] + splits["holdout"] if is_mura_elbow(s)]
    fold = np.array([elbow_fold(s.patient) for s in elbows])
    reference = elbow_probabilities(*load_folder(args.reference), elbows)
    out_of_fold = np.full(len(elbows), np.nan)
    print("fold  run                          images (studies)  fold AUROC (reference)  forearm / humerus holdout")
    for folder in args.runs:
        model, config = fold_network(folder)
        k = config.training.get("settings", {}).get("elbow_fold")
        if k is None or not np.isnan(out_of_fold[fold == k]).all():
            raise SystemExit(f"{folder}: not a run of a fold the other folders leave unread (train --elbow-fold)")
        rows = np.flatnonzero(fold == k)
        fold_elbows = [elbows[i] for i in rows]
        out_of_fold[rows] = elbow_probabilities(model, config, fold_elbows)
        trained, guess = (study_figures(fold_elbows, [e.abnormal for e in fold_elbows], p[rows])
                          for p in (out_of_fold, reference))  # fmt: skip
        held = config.metrics.get("holdout", {}).get("study_level", {})
        arms = arms_auroc(model, config, splits["holdout"]) if "," in folder else [
            held.get(p, {}).get("auroc", float("nan")) for p in ARMS]  # fmt: skip
        others = " / ".join(f"{a:.3f}" for a in arms)
        print(f"{k:>4}  {folder:<28} {len(rows):>6} ({trained[1]:>2})       {trained[0]:.3f} ({guess[0]:.3f})"
              f"           {others}")  # fmt: skip

    read = ~np.isnan(out_of_fold)
    samples = [e for e, r in zip(elbows, read) if r]
    labels = [e.abnormal for e in samples]
    folds = sorted(int(f) for f in set(fold[read]))
    (trained, studies), (guess, _) = (study_figures(samples, labels, p[read]) for p in (out_of_fold, reference))
    print(f"pooled out of fold, folds {folds} of {ELBOW_FOLDS}, {len(samples)} images ({studies} studies):")
    print(f"  reference ({args.reference}): study AUROC {guess:.3f}")
    print(f"  fold runs:                    study AUROC {trained:.3f}")
    print(f"  {versus(samples, labels, out_of_fold[read], reference[read], args.n_boot)}")


if __name__ == "__main__":
    main()
