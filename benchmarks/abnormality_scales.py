"""Whether reading the abnormality from a larger letterbox, with no training, ranks studies better.

A network trained with zoom augmentation saw its objects larger, on average, than an unzoomed image of the training
size shows them (Touvron et al., "Fixing the train-test resolution discrepancy", 2019); reading at a larger size gives
the apparent sizes back and keeps more of a fine fracture line. For each weights folder this reads the abnormality
from the image letterboxed at the served size and at each ``--sizes`` (the body part read as served, from its own
letterbox at the size it was trained at, the way a pair of two sizes reads it), and prints the training holdout's
study AUROC and kappa at the folder's thresholds per part. No test image is read.

``--study-rules`` also joins each study's views other ways than the served mean of their probabilities (the MURA
paper's rule): the mean of their logits, the most abnormal view, and the mean of those two; a fracture often shows on
one view of a study, and a rule that weighs that view more may rank studies better. Printed as each rule's study
AUROC per part (kappa only for the served mean, whose thresholds the folder holds).

    python -m benchmarks.abnormality_scales weights --sizes 288 320
    python -m benchmarks.abnormality_scales weights --sizes --study-rules
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch

from mura_demo.core.inference import score_images
from mura_demo.core.malloc import tune_for_batch_work
from mura_demo.core.weights import load_folder
from mura_demo.training.data import load_splits, model_images
from mura_demo.training.evaluate import body_part_by_group
from mura_demo.training.metrics import auroc, cohen_kappa
from mura_demo.training.train import part_study_scores

STUDY_RULES = {  # beside the served mean of the views' probabilities (metrics.study_scores)
    "logit_mean": lambda p: float(torch.logit(torch.tensor(p), eps=1e-6).mean()),
    "max": np.max,
    "mean_max": lambda p: (np.mean(p) + np.max(p)) / 2,
}


def auroc_figures(aurocs: dict[str, float]) -> dict:
    """Each part's study AUROC and their mean, the screen's measure."""
    return {
        "study_auroc": {k: round(v, 4) for k, v in aurocs.items()},
        "mean_auroc": round(float(np.mean(list(aurocs.values()))), 4),
    }


def read_at(config, size: int):
    """``config`` reading the abnormality from a ``size`` px letterbox, the body part from its own as before."""
    return dataclasses.replace(config, input_size=size, body_part_letterbox_size=config.body_part_image_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="weights folders (pairs)")
    parser.add_argument("--sizes", nargs="*", type=int, default=[288, 320], help="beside the served size")
    parser.add_argument("--study-rules", action="store_true", help="join each study's views other ways too")
    parser.add_argument("--data-root", default="../shared/data")
    args = parser.parse_args()
    tune_for_batch_work()
    holdout = load_splits(args.data_root)["holdout"]
    for folder in args.folders:
        model, served = load_folder(folder)
        for size in [served.input_size, *args.sizes]:
            config = read_at(served, size)
            config.check()
            bp_prob, ab_prob = score_images(model, config, *model_images(holdout, config))
            groups = body_part_by_group(config, holdout, bp_prob)
            parts = part_study_scores(config, holdout, ab_prob)
            figures = auroc_figures({part: auroc(y, p) for part, (_, y, p) in parts.items()}) | {
                "study_kappa": {
                    part: round(cohen_kappa(y, (np.asarray(p) >= config.thresholds[part]).astype(int)), 4)
                    for part, (_, y, p) in parts.items()
                },
                "studies": {part: len(y) for part, (_, y, _) in parts.items()},
                "holdout_body_parts_right": round(sum(g["accuracy"] * g["images"] for g in groups.values())),
            }
            if args.study_rules:
                for name, rule in STUDY_RULES.items():
                    joined = part_study_scores(config, holdout, ab_prob, join=rule)
                    figures[name] = auroc_figures({part: auroc(y, p) for part, (_, y, p) in joined.items()})
            print(json.dumps({folder: {size: figures}}), flush=True)


if __name__ == "__main__":
    main()
