"""Which holdout images of one source and part each weights folder names wrong, side by side.

A lever that moves a group's count by two images says little alone: the images tell whether two networks miss the
same views (hard cases every recipe shares), different ones that follow a lever (its own errors), or scattered ones
(seed noise). Each folder is read as its config says, the way the app reads a view's body part. The first folder is
the reference: the summary counts each other folder's misses shared with it, fixed and added, and gives the
one-sided exact McNemar p that the folder is worse than the reference on this group (the images only one of the two
names right decide it; session 36's holdout rule in ``benchmarks/plans/session-36.md`` reads it). Paths print to the
terminal only, so no image of the research data ends up in a file; MURA ``valid`` is never read.

    python -m benchmarks.holdout_misses weights runs/s35/pairF0/weights runs/s35/F0/weights --group mura/forearm
"""

from __future__ import annotations

import argparse
import functools

from mura_demo.core.inference import score_body_parts
from mura_demo.core.malloc import tune_for_batch_work
from mura_demo.core.weights import load_folder
from mura_demo.training.data import group_of, load_images, load_splits
from mura_demo.training.evaluate import named_right
from mura_demo.training.metrics import paired_worse_p


def misses(folder: str, samples: list, images_at) -> dict[str, str]:
    """Each sample this folder's network names wrong: its path -> the part it was called."""
    model, config = load_folder(folder)
    probs = score_body_parts(model, config, images_at(config.body_part_image_size))
    called = [config.body_part_classes[k] for k in probs.argmax(1).tolist()]
    return {str(s.path): c for s, c, right in zip(samples, called, named_right(config, samples, probs)) if not right}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="weights folders; the first is the reference")
    parser.add_argument("--group", default="mura/forearm", help="source/part as the card's table names it")
    parser.add_argument("--data-root", default="../shared/data")
    args = parser.parse_args()
    tune_for_batch_work()

    samples = [s for s in load_splits(args.data_root)["holdout"] if group_of(s) == args.group]
    if not samples:
        raise SystemExit(f"no holdout image in group {args.group!r} under {args.data_root}")
    images_at = functools.cache(lambda size: load_images(samples, size))
    missed = {folder: misses(folder, samples, images_at) for folder in args.folders}

    print(" | ".join(args.folders), "| image")
    for path in sorted(set().union(*missed.values())):
        print(" | ".join(m.get(path, "-") for m in missed.values()), "|", path)
    reference = set(missed[args.folders[0]])
    print(f"\n{args.group}: {len(samples)} holdout images; misses (shared with / fixed from / added to the first):")
    for folder, m in missed.items():
        shared, fixed, added = len(reference & set(m)), len(reference - set(m)), len(set(m) - reference)
        p = paired_worse_p(added, fixed)
        print(f"  {folder}: {len(m)} ({shared} / {fixed} / {added}); net {added - fixed:+d}, p(worse) = {p:.3f}")


if __name__ == "__main__":
    main()
