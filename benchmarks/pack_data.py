"""Pack the training images small enough to travel to a leased GPU machine (64 MiB with the repo).

Writes a data root that ``train --data-root`` and ``benchmarks.body_part_probe --data-root`` read unchanged:
the training and holdout images of ``../shared/data`` (never a test image: MURA ``valid`` is left out, its
CSVs written empty, and the elbow and UNIFESP test shares are not copied), decoded by the app's own decoder,
shrunk to ``--side`` pixels on the long side and stored as greyscale JPEG under their original names (PIL
reads a file by its content, not its name). Training letterboxes them to the input size as it does the
originals; the JPEG round trip is milder than the one style randomisation applies. The packed folder holds
research-use data: keep it out of git (``.git/info/exclude``) and delete it after the lease.

    python -m benchmarks.pack_data .gpu/data --side 288 --quality 90
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

from mura_demo.core.checks import ImageInputError
from mura_demo.core.imaging import load_image
from mura_demo.training.data import load_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write the packed data root to")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--side", type=int, default=288, help="long side in pixels")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    args = parser.parse_args()

    source, out = Path(args.data_root), Path(args.out)
    splits = load_splits(source)
    keep = splits["train"] + splits["holdout"]
    (out / "MURA-v1.1").mkdir(parents=True, exist_ok=True)
    for name in ("train_image_paths.csv", "train_labeled_studies.csv"):
        shutil.copy(source / "MURA-v1.1" / name, out / "MURA-v1.1" / name)
    for name in ("valid_image_paths.csv", "valid_labeled_studies.csv"):
        (out / "MURA-v1.1" / name).write_text("")
    with open(source / "unifesp-bodypart" / "labels.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    (out / "unifesp-bodypart").mkdir(parents=True, exist_ok=True)
    with open(out / "unifesp-bodypart" / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    total = 0
    for sample in keep:
        target = out / sample.path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        image = load_image(sample.path)
        image.thumbnail((args.side, args.side))
        image.save(target, "JPEG", quality=args.quality)
        try:
            load_image(target)
        except ImageInputError:  # too thin or too flat once shrunk: the original travels as it is
            shutil.copy(sample.path, target)
        total += target.stat().st_size
    print(f"{len(keep)} images, {total / 2**20:.1f} MiB in {out}")


if __name__ == "__main__":
    main()
