"""Reading uploads: every supported kind decodes, every bad kind gets its own message."""

from __future__ import annotations

import io

import numpy as np
import pytest
from bad_inputs import bad_inputs, png_bytes, textured
from PIL import Image

from mura_demo.core.imaging import ImageInputError, load_image
from mura_demo.core.preprocess import letterbox


@pytest.mark.parametrize("name", sorted(bad_inputs()))
def test_bad_input_messages(name):
    data, fragment = bad_inputs()[name]
    with pytest.raises(ImageInputError) as err:
        load_image(data)
    assert fragment.lower() in str(err.value).lower()


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("L", "PNG"),
        ("RGB", "PNG"),
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("LA", "PNG"),
        ("L", "JPEG"),
        ("RGB", "JPEG"),
        ("CMYK", "JPEG"),
        ("L", "BMP"),
        ("RGB", "TIFF"),
        ("L", "TIFF"),
    ],
)
def test_supported_modes_decode_to_grey(mode, fmt):
    base = textured((200, 150))
    out = load_image(encode(base.convert(mode), fmt))
    assert out.mode == "L" and out.size == (200, 150)
    if fmt in ("PNG", "BMP", "TIFF") and mode in ("L", "RGB", "LA"):
        assert np.array_equal(np.asarray(out), np.asarray(base))


def test_sixteen_bit_grey_is_stretched_not_clipped():
    ramp = np.tile(np.linspace(1000, 4000, 256).astype(np.uint16), (128, 1))
    out = np.asarray(load_image(encode(Image.fromarray(ramp), "PNG")))
    assert out.min() <= 2 and out.max() >= 253  # uses the full 8-bit range
    assert np.all(np.diff(out[0].astype(int)) >= 0)  # order kept


def test_exif_orientation_is_applied():
    base = textured((300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = load_image(encode(base.convert("RGB"), "JPEG", exif=exif, quality=95))
    assert out.size == (200, 300)


def test_path_and_bytes_agree(tmp_path):
    data = png_bytes(textured())
    path = tmp_path / "x.png"
    path.write_bytes(data)
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(load_image(data)))


def test_letterbox_keeps_aspect_and_centres():
    square, box = letterbox(Image.new("L", (400, 200), 255), 224)
    assert square.size == (224, 224)
    assert (box.width, box.height) == (224, 112) and box.top == 56 and box.left == 0
    a = np.asarray(square)
    assert a[:56].max() == 0 and a[56:168].min() == 255 and a[168:].max() == 0
