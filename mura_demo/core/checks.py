"""What an input must satisfy: the accepted formats, the limits, and the two kinds of user error.

The one owner of these rules: decoding, the upload box, batch runs and the API all read them
from here, so no two places can disagree about what is accepted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

MAX_PIXELS = 50_000_000
MIN_SIDE = 64
MAX_BYTES = 50 * 1024 * 1024
RASTER_FORMATS = {"PNG", "JPEG", "MPO", "BMP", "TIFF"}  # as Pillow names them
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
FORMAT_NAMES = "PNG, JPEG, BMP, TIFF or DICOM"


def find_images(folder: Path) -> list[Path]:
    """The files under ``folder`` with an accepted suffix, sorted (what a folder given as input means)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


class UserError(ValueError):
    """Something the user sent that cannot be served; the message is meant for them (no traceback)."""


class ImageInputError(UserError):
    """An upload that cannot be analysed as a radiograph."""


class RequestError(UserError):
    """A request whose options are wrong: threshold, body part, method, report format."""


def check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageInputError(f"The image is {width}x{height} pixels, over the {MAX_PIXELS // 10**6} megapixel limit.")
    if min(width, height) < MIN_SIDE:
        raise ImageInputError(
            f"The image is only {width}x{height} pixels. Upload a radiograph at least {MIN_SIDE} pixels on each side."
        )


def check_content(image: Image.Image) -> Image.Image:
    if np.ptp(np.asarray(image)) == 0:
        raise ImageInputError("The image is a single flat colour: there is nothing to analyse.")
    return image
