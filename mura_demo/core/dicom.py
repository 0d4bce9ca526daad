"""DICOM in: pixel data to display-ready 8-bit views, the way a viewer would show them.

Modality LUT (rescale slope/intercept), then the VOI LUT or window centre/width, then
MONOCHROME1 inversion, then scaling to 8 bits over the output range. Only pixel data and the
tags that shape it are read; patient-identifying tags are never touched, shown or logged.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .checks import ImageInputError, check_size

DECODER_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"


def dicom_views(data: bytes) -> list[Image.Image]:
    """Each frame of a DICOM file as an 8-bit greyscale image."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise ImageInputError("DICOM support needs pydicom: pip install pydicom") from None
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as err:
        raise ImageInputError(f"This DICOM file could not be read ({type(err).__name__}).") from None
    if "PixelData" not in ds:
        raise ImageInputError("This DICOM file holds no image (no pixel data).")
    check_size(int(ds.get("Columns", 0)), int(ds.get("Rows", 0)))
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ImageInputError("This DICOM image is in colour; radiographs are greyscale (MONOCHROME1/2).")
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError) as err:
        syntax = getattr(ds.file_meta, "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise ImageInputError(f"This DICOM is compressed ({name}) and no decoder is installed: {DECODER_HINT}.") from (
            err
        )
    except (ValueError, AttributeError, KeyError, TypeError) as err:
        raise ImageInputError(f"The DICOM pixel data is corrupt or incomplete ({err}).") from None
    frames = pixels if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels[None]
    return [to_display(frame, ds, apply_modality_lut, apply_voi_lut) for frame in frames]


def to_display(frame: np.ndarray, ds, apply_modality_lut, apply_voi_lut) -> Image.Image:
    """One frame through the modality and VOI transforms, scaled to 8 bits over their output range."""
    bits = int(ds.get("BitsStored", 8))
    signed = bool(int(ds.get("PixelRepresentation", 0)))
    values = apply_modality_lut(frame, ds)  # stays integer without rescale, as a VOI LUT needs
    if "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds, index=0).astype(np.float64)
        lo, hi = 0.0, 2.0 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
    elif "WindowCenter" in ds:
        values = apply_voi_lut(values, ds, index=0).astype(np.float64)
        lo, hi = representable(bits, signed)  # pydicom windows into the stored value range
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
        lo, hi = float(values.min()), float(values.max())  # physical units: no natural range
    else:
        lo, hi = representable(bits, signed)
    values = np.asarray(values, dtype=np.float64)
    scaled = np.clip((values - lo) / max(hi - lo, 1e-9), 0, 1)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        scaled = 1.0 - scaled  # MONOCHROME1: low values are bright
    return Image.fromarray(np.round(scaled * 255).astype(np.uint8))


def representable(bits: int, signed: bool) -> tuple[float, float]:
    return (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) if signed else (0.0, 2.0**bits - 1)
