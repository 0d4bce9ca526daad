"""What ``--other-shift`` would do to weights folders, judged on cross-fitted holdout predictions.

For each folder (finalized without a shift): the shift its holdout chooses, the shift each half of the holdout
chooses, and the body-part count per source and part as served, with the whole holdout's shift, and cross-fitted
(each half read with the other half's shift; see ``mura_demo/training/other_shift.py``). Against the reference
folder, image by image on the cross-fitted predictions, each MURA group's images fixed and added and the one-sided
exact McNemar p that the folder is worse (session 36's holdout rule in ``benchmarks/plans/session-36.md``). For a
leave-one-source-out twin (trained with ``--withhold``), the shift is chosen on its holdout, where the withheld
source is absent, and the withheld images outside the test share are read with it. MURA ``valid`` is never read; no
path is printed.

    python -m benchmarks.other_shift runs/s35/pairF0/weights runs/s35/F0-loso/weights --reference weights
"""

from __future__ import annotations

import argparse
import functools
import json

import numpy as np

from mura_demo.core.inference import score_body_parts
from mura_demo.core.malloc import tune_for_batch_work
from mura_demo.core.weights import load_folder
from mura_demo.training.data import group_of, is_withheld, load_images, load_splits, withhold
from mura_demo.training.evaluate import body_part_summary, named_right, withheld_report
from mura_demo.training.metrics import paired_worse_p
from mura_demo.training.other_shift import choose_other_shift, shifted_other
from mura_demo.training.settings import TrainSettings

JUDGED_GROUPS = ("mura/elbow", "mura/forearm", "mura/humerus", "unifesp/other")


def counts(summary: dict) -> dict[str, str]:
    return {g: f"{round(v['accuracy'] * v['images'])}/{v['images']}" for g, v in summary["body_part_by_group"].items()}


def against(config, holdout, probs, reference_right: np.ndarray) -> dict:
    """Per judged group: images fixed and added against the reference, net, and the McNemar p of being worse."""
    right = named_right(config, holdout, probs)
    out = {}
    for group in JUDGED_GROUPS:
        rows = np.array([group_of(s) == group for s in holdout])
        fixed = int((right & ~reference_right & rows).sum())
        added = int((~right & reference_right & rows).sum())
        out[group] = {
            "fixed": fixed,
            "added": added,
            "net_worse": added - fixed,
            "p_worse": paired_worse_p(added, fixed),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="weights folders finalized without a shift")
    parser.add_argument("--reference", default="weights", help="the folder pairs are judged against image by image")
    parser.add_argument("--data-root", default="../shared/data")
    args = parser.parse_args()
    tune_for_batch_work()

    splits = load_splits(args.data_root)
    images_at = functools.cache(lambda spec, size: load_images(withhold(splits["holdout"], spec), size))
    reference_model, reference_config = load_folder(args.reference)
    reference_right = named_right(
        reference_config,
        splits["holdout"],
        score_body_parts(reference_model, reference_config, images_at(None, reference_config.body_part_image_size)),
    )
    out = {}
    for folder in args.folders:
        model, config = load_folder(folder)
        if "other_shift" in config.training:
            raise SystemExit(f"{folder} was finalized with --other-shift already: give its folder without")
        known = {k: v for k, v in config.training.get("settings", {}).items() if k in ("withhold", "view_choice")}
        settings = TrainSettings(**known)
        holdout = withhold(splits["holdout"], settings.withhold)
        bp = score_body_parts(model, config, images_at(settings.withhold, config.body_part_image_size))
        choice = choose_other_shift(config, holdout, bp, settings.view_choice)
        served, shifted = (
            body_part_summary(config, holdout, bp),
            body_part_summary(config, holdout, shifted_other(bp, choice["shift"])),
        )
        cross = body_part_summary(config, holdout, choice["cross_fitted"])
        row = {
            "view_choice": settings.view_choice,
            "shift": choice["shift"],
            "half_shifts": choice["half_shifts"],
            "counts": {"served": counts(served), "shifted": counts(shifted), "cross_fitted": counts(cross)},
            "mean_per_source_and_part": {
                "served": served["body_part_accuracy"],
                "shifted": shifted["body_part_accuracy"],
                "cross_fitted": cross["body_part_accuracy"],
            },
            "images_right_cross_fitted": cross["body_part_images_right"],
        }
        if settings.withhold:
            withheld = [s for s in splits["train"] + splits["holdout"] if is_withheld(s, settings.withhold)]
            w_bp = score_body_parts(model, config, load_images(withheld, config.body_part_image_size))
            row[f"withheld_{settings.withhold}_outside_its_test_share"] = {
                "served": withheld_report(config, withheld, w_bp.numpy())["accuracy"],
                "shifted": withheld_report(config, withheld, shifted_other(w_bp, choice["shift"]).numpy())["accuracy"],
                "images": len(withheld),
            }
        else:
            row["cross_fitted_against_reference"] = against(config, holdout, choice["cross_fitted"], reference_right)
        out[folder] = row
        print(json.dumps({folder: row}, indent=1), flush=True)


if __name__ == "__main__":
    main()
