"""Presentation: heatmaps cropped back to the radiograph's own framing and blended over it."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image
from pytorch_grad_cam.utils.image import show_cam_on_image

from .preprocess import Box

DISPLAY_MAX_SIDE = 768
DISCLAIMER = (
    "Research and teaching software only. Not a medical device. It must not be used for diagnosis, "
    "triage or any clinical decision."
)
COLORMAPS = {
    "jet": cv2.COLORMAP_JET,
    "inferno": cv2.COLORMAP_INFERNO,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "turbo": cv2.COLORMAP_TURBO,
}


def display_image(image: Image.Image) -> Image.Image:
    """The radiograph at display size (longest side at most DISPLAY_MAX_SIDE), aspect kept."""
    w, h = image.size
    scale = min(1.0, DISPLAY_MAX_SIDE / max(w, h))
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)


def crop_to_content(cam: np.ndarray, box: Box, size: tuple[int, int]) -> np.ndarray:
    """Cut the letterbox padding off a model-input-sized map and resize it to ``size`` (w, h)."""
    inner = cam[box.top : box.top + box.height, box.left : box.left + box.width]
    return cv2.resize(inner.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)


def overlay(image: Image.Image, cam: np.ndarray, box: Box, opacity: float = 0.5, colormap: str = "jet") -> np.ndarray:
    """RGB uint8 overlay of ``cam`` on the greyscale ``image`` at display size, undistorted."""
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colour map {colormap!r}; choose from {list(COLORMAPS)}")
    base = display_image(image)
    rgb = np.asarray(base.convert("RGB"), dtype=np.float32) / 255.0
    mask = np.clip(crop_to_content(cam, box, base.size), 0, 1)
    return show_cam_on_image(rgb, mask, use_rgb=True, colormap=COLORMAPS[colormap], image_weight=1.0 - opacity)
