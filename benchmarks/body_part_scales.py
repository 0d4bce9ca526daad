"""Whether reading the body part at several scales, with no training, names more parts right.

A network trained at one size reads anatomy at the scale it saw it; a MURA elbow filmed closer or farther than the
UNIFESP elbows it learnt from may read as its neighbours (forearm, humerus) at one scale and as an elbow at another.
For each weights folder this scores the body part from the served view (the config's flip mean and, with
``--equalized-view`` or when the config asks for it, the mean with the histogram-equalised copy) at the body-part
size, resized down and up, and zoomed in on the centre, alone and with their logits averaged: on the training holdout
by source and part, and for a leave-one-source-out folder on the withheld images outside their test share (the test
share is never read here).

    python -m benchmarks.body_part_scales runs/s53/TTT-loso/weights weights --equalized-view
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from mura_demo.core.inference import batched, body_part_logits, body_part_view, eval_mode, resized
from mura_demo.core.malloc import tune_for_batch_work
from mura_demo.core.weights import load_folder
from mura_demo.training.data import is_withheld, load_images, load_splits, withhold
from mura_demo.training.evaluate import body_part_by_group, withheld_report

SIZES = (192, 224, 288)  # beside the body-part size itself
ZOOM = 0.85  # the centre share kept by the zoomed view, resized back to the body-part size
COMBINATIONS = {
    "served": ("served",),
    "+224": ("served", "224"),
    "+224+192": ("served", "224", "192"),
    "+288": ("served", "288"),
    "+224+288": ("served", "224", "288"),
    "+zoom": ("served", "zoom"),
}


def zoomed(view: torch.Tensor, share: float) -> torch.Tensor:
    """The centre ``share`` of each side, resized back to the view's size."""
    side = view.shape[-1]
    cut = round(side * (1 - share) / 2)
    return resized(view[..., cut : side - cut, cut : side - cut], side)


@torch.inference_mode()
def scale_logits(model, config, images: torch.Tensor, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Body-part logits of every scale's view, each read the way serving reads a view (``body_part_logits``)."""
    out: dict[str, list[torch.Tensor]] = {}
    with eval_mode(model):
        for x in batched(images, config, next(model.parameters()).device, batch_size):
            view = body_part_view(config, x, x)  # x is the body part's letterbox
            views = {"served": view, "zoom": zoomed(view, ZOOM)} | {str(s): resized(view, s) for s in SIZES}
            for name, v in views.items():
                out.setdefault(name, []).append(body_part_logits(model, config, v).float().cpu())
    return {name: torch.cat(chunks) for name, chunks in out.items()}


def combined(logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([logits[v] for v in views]).mean(0).softmax(1) for name, views in COMBINATIONS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="weights folders")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--equalized-view", action="store_true", help="read every view with its equalised copy")
    args = parser.parse_args()
    tune_for_batch_work()
    splits = load_splits(args.data_root)
    for folder in args.folders:
        model, config = load_folder(folder)
        if args.equalized_view:
            config = dataclasses.replace(config, body_part_equalized_view=True)
        spec = config.training["settings"]["withhold"]
        holdout = withhold(splits["holdout"], spec)
        row = {}
        images = load_images(holdout, config.body_part_image_size)
        for name, probs in combined(scale_logits(model, config, images)).items():
            groups = body_part_by_group(config, holdout, probs)
            row[name] = {
                "holdout_images_right": round(sum(g["accuracy"] * g["images"] for g in groups.values())),
                "holdout_right_by_group": {k: round(g["accuracy"] * g["images"]) for k, g in groups.items()},
            }
        withheld = [s for s in splits["train"] + splits["holdout"] if is_withheld(s, spec)]
        if withheld:
            images = load_images(withheld, config.body_part_image_size)
            for name, probs in combined(scale_logits(model, config, images)).items():
                named = withheld_report(config, withheld, probs.numpy())
                row[name][f"withheld_{spec}_outside_its_test_share"] = {k: named[k] for k in ("accuracy", "called")}
        print(json.dumps({folder: row}, indent=1), flush=True)


if __name__ == "__main__":
    main()
