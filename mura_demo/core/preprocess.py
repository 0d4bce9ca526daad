"""Preprocessing shared by training and serving: letterbox to a square, then normalise.

Radiographs come in every aspect ratio; squashing them would distort anatomy, so the image is
scaled to fit and padded with black (the radiograph background). The content box is kept so
that heatmaps can be cropped back to the original framing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from PIL import Image

from .config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Box:
    """Where the scaled radiograph sits inside the square model input."""

    left: int
    top: int
    width: int
    height: int


def letterbox(image: Image.Image, size: int) -> tuple[Image.Image, Box]:
    """Scale a greyscale image to fit ``size`` x ``size`` without distortion, padding with black."""
    w, h = image.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = image.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
    canvas = Image.new("L", (size, size), 0)
    box = Box((size - nw) // 2, (size - nh) // 2, nw, nh)
    canvas.paste(resized, (box.left, box.top))
    return canvas, box


def normalize(batch: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """uint8 or [0, 1] grey batch (N, 1, H, W) -> normalised 3-channel float batch (N, 3, H, W)."""
    x = batch.float()
    if batch.dtype == torch.uint8:
        x = x / 255.0
    mean = torch.tensor(config.mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation: each pixel becomes the share of the image's pixels at or below its grey level,
    the darkest level 0 and the brightest 1 (as OpenCV's ``equalizeHist``). Pixels of one level stay one level, so
    the black letterbox stays black; any strictly monotonic change of grey levels (gamma, contrast, a film's base)
    gives the same image."""
    flat = x.flatten(1).contiguous()
    at_or_below = torch.searchsorted(flat.sort(1).values, flat, right=True).float()
    darkest = at_or_below.min(1, keepdim=True).values
    return ((at_or_below - darkest) / (flat.shape[1] - darkest).clamp_min(1)).view_as(x)


def equalized_view(x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """A normalised batch -> the same images histogram-equalised, normalised again (grey: one channel says all)."""
    return normalize(equalize(x[:, :1]), config)


def letterboxed_input(image: Image.Image, config: ModelConfig, size: int) -> tuple[torch.Tensor, Box]:
    """A greyscale PIL image letterboxed at ``size`` -> a normalised (1, 3, size, size) input and its content box."""
    square, box = letterbox(image, size)
    grey = torch.from_numpy(np.asarray(square, dtype=np.uint8).copy())[None, None]
    return normalize(grey, config), box


def to_model_input(image: Image.Image, config: ModelConfig) -> tuple[torch.Tensor, Box]:
    """A greyscale PIL image -> the (1, 3, S, S) model input and its content box."""
    return letterboxed_input(image, config, config.input_size)


def body_part_input(image: Image.Image, config: ModelConfig) -> torch.Tensor | None:
    """The image letterboxed for the body part where a pair's body-part network reads a size of its own
    (None: the body part is read from the model input)."""
    if not config.own_body_part_letterbox:
        return None
    return letterboxed_input(image, config, config.body_part_image_size)[0]
