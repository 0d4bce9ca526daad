"""Weight folders scored on the training holdout, alone and combined, before any of them earns a look at `valid`.

For each folder: its holdout score (the mean study AUROC of the parts with labels, as training selects by), each
part's study AUROC and kappa at its thresholds, and body-part accuracy, read as its config says. With two folders
or more: the uniform average of their weights (one network, the same cost to serve; read as the first folder's config
says) and the mean of their outputs (an ensemble, n times the cost). With ``--scales``: each folder also read at
those input sizes, outputs averaged. MURA ``valid`` is never read.

    python -m benchmarks.holdout_variants weights runs/s1/weights --scales 256 288
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json

import torch

from mura_demo.core.inference import score_images
from mura_demo.core.malloc import tune_for_batch_work
from mura_demo.core.weights import load_folder
from mura_demo.training.data import load_images, load_splits, model_images
from mura_demo.training.metrics import binary_metrics
from mura_demo.training.train import holdout_report, mean_state, part_study_scores


def figures(config, holdout, bp_prob: torch.Tensor, ab_prob: torch.Tensor) -> dict:
    """The holdout score, body-part accuracy, and each labelled part's study AUROC and kappa."""
    report = holdout_report(config, holdout, bp_prob, ab_prob)
    parts = {}
    for part, (_, labels, scores) in part_study_scores(config, holdout, ab_prob).items():
        m = binary_metrics(labels, scores, config.thresholds[part])
        parts[part] = {"auroc": round(m["auroc"], 4), "kappa": round(m["kappa"], 4)}
    return {"score": round(report["score"], 4), "body_part_accuracy": round(report["body_part_accuracy"], 4), **parts}


def mean_outputs(outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([o[0] for o in outputs]).mean(0), torch.stack([o[1] for o in outputs]).mean(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="weight folders (model.safetensors + config.json)")
    parser.add_argument("--scales", type=int, nargs="*", default=[], help="input sizes to read each folder at too")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    tune_for_batch_work()

    holdout = tuple(load_splits(args.data_root)["holdout"])  # hashable, so that each size is letterboxed once
    load = functools.cache(load_images)

    def read(model, config):  # the holdout letterboxed as the config reads it (a pair's body part at its own size)
        return score_images(model, config, *model_images(holdout, config, load))

    loaded = [load_folder(folder) for folder in args.folders]
    rows, outputs = {}, []
    for folder, (model, config) in zip(args.folders, loaded):
        outputs.append(read(model, config))
        rows[folder] = figures(config, holdout, *outputs[-1])
        if args.scales:
            configs = [dataclasses.replace(config, input_size=s) for s in args.scales]
            scaled = mean_outputs(  # the folder's own size is already read
                [outputs[-1] if c.input_size == config.input_size else read(model, c) for c in configs]
            )
            rows[f"{folder} at {'+'.join(map(str, args.scales))} px"] = figures(config, holdout, *scaled)
    if len(loaded) > 1:
        model, config = loaded[0]
        model.load_state_dict(mean_state([m.state_dict() for m, _ in loaded]))
        rows["weight average"] = figures(config, holdout, *read(model, config))
        rows["output mean"] = figures(config, holdout, *mean_outputs(outputs))
    for name, row in rows.items():
        print(f"{name}: {json.dumps(row)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
