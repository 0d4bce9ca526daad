"""A corpus of unusable uploads, each with a fragment of the message it must produce."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def declared_png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` with a tiny (bomb-like) payload."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    payload = zlib.compress(b"\x00" * (width + 1) * 16, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", payload) + chunk(b"IEND", b"")


def textured(size=(256, 320), mode="L") -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, size[::-1], dtype=np.uint8)).convert(mode)


def animated_gif() -> bytes:
    frames = [textured((128, 128)).convert("P") for _ in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def bad_inputs() -> dict[str, tuple[bytes, str]]:
    good_png = png_bytes(textured())
    good_jpeg = jpeg_bytes(textured())
    return {
        "empty.png": (b"", "empty"),
        "random.png": (os.urandom(4096), "not an image"),
        "text.png": (b"hello, this is plain text\n" * 20, "not an image"),
        "document.png": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n" * 10, "PDF"),
        "truncated.png": (good_png[: len(good_png) // 2], "truncated or corrupt"),
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "truncated or corrupt"),
        "tiny_1x1.png": (png_bytes(Image.new("L", (1, 1), 128)), "only 1x1 pixels"),
        "thumb_10x10.png": (png_bytes(textured((10, 10))), "only 10x10 pixels"),
        "huge.png": (declared_png(20000, 20000), "megapixel"),
        "bomb.png": (declared_png(60000, 60000), "megapixel"),
        "animated.gif": (animated_gif(), "not supported"),
        "flat.png": (png_bytes(Image.new("L", (200, 200), 0)), "single flat colour"),
        "icon.ico": (_ico(), "not supported"),
        "dicom_no_pixels.dcm": (b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\x00\x00\x00\x00", "DICOM"),
        "webp.webp": (_webp(), "not supported"),
    }


def _ico() -> bytes:
    buf = io.BytesIO()
    textured((64, 64)).convert("RGB").save(buf, format="ICO")
    return buf.getvalue()


def _webp() -> bytes:
    buf = io.BytesIO()
    textured((128, 128)).convert("RGB").save(buf, format="WEBP")
    return buf.getvalue()
