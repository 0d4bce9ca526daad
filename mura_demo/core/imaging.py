"""Image in: read an uploaded radiograph safely and turn it into one 8-bit greyscale image.

Every way a file can be unusable maps to an :class:`ImageInputError` whose message says
what is wrong in words a user understands; nothing else escapes from here.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .checks import FORMAT_NAMES, MAX_BYTES, MAX_PIXELS, RASTER_FORMATS, ImageInputError, check_content, check_size
from .dicom import dicom_views


def read_bytes(source: str | Path | bytes) -> bytes:
    """The raw bytes of an upload, with size checks before anything is decoded."""
    if isinstance(source, bytes):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageInputError(f"No file at {path.name}.")
        if path.stat().st_size > MAX_BYTES:
            raise ImageInputError(f"The file is larger than {MAX_BYTES // 2**20} MB.")
        data = path.read_bytes()
    if not data:
        raise ImageInputError("The file is empty (0 bytes).")
    if len(data) > MAX_BYTES:
        raise ImageInputError(f"The file is larger than {MAX_BYTES // 2**20} MB.")
    return data


def describe_non_image(data: bytes) -> str:
    """A specific message for common files that are not images."""
    if data.startswith(b"%PDF"):
        return f"This is a PDF document, not an image. Upload a radiograph as {FORMAT_NAMES}."
    return f"This file is not an image that can be read. Upload a radiograph as {FORMAT_NAMES}."


def to_grey8(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit greyscale; high-bit-depth data is stretched over its own range."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        lo, hi = np.percentile(a, [0.5, 99.5]) if a.size else (0.0, 1.0)
        if hi <= lo:
            lo, hi = float(a.min()), float(a.max()) or 1.0
        a = np.clip((a - lo) / max(hi - lo, 1e-9), 0.0, 1.0)
        return Image.fromarray(np.round(a * 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    return image.convert("L")


def decode_raster(data: bytes) -> Image.Image:
    """PNG / JPEG / BMP / TIFF bytes -> an upright 8-bit greyscale image, or ImageInputError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = image.format
            if fmt not in RASTER_FORMATS:
                raise ImageInputError(f"{fmt} images are not supported. Upload a radiograph as {FORMAT_NAMES}.")
            if getattr(image, "n_frames", 1) > 1 and fmt != "MPO":
                raise ImageInputError("This file holds several frames. Upload one still radiograph.")
            check_size(*image.size)
            image.load()
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageInputError(f"The image declares too many pixels (over {MAX_PIXELS // 10**6} megapixels).") from None
    except UnidentifiedImageError:
        raise ImageInputError(describe_non_image(data)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageInputError(f"The image file is truncated or corrupt ({err}).") from None
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError):
        pass  # a broken EXIF block must not stop an otherwise readable image
    return to_grey8(image)


def load_views(source: str | Path | bytes) -> list[Image.Image]:
    """Every view in an upload: one for an image file, one per frame for a multi-frame DICOM."""
    data = read_bytes(source)
    if is_dicom(data, source):
        return [check_content(view) for view in dicom_views(data)]
    return [check_content(decode_raster(data))]


def load_image(source: str | Path | bytes) -> Image.Image:
    """Decode an upload holding one radiograph into an upright 8-bit greyscale image."""
    views = load_views(source)
    if len(views) > 1:
        raise ImageInputError(f"This DICOM file holds {len(views)} frames: send it as a study to read every view.")
    return views[0]


def is_dicom(data: bytes, source) -> bool:
    """A DICOM file: the 'DICM' marker after the 128-byte preamble, or a .dcm name."""
    return data[128:132] == b"DICM" or (isinstance(source, str | Path) and str(source).lower().endswith(".dcm"))
