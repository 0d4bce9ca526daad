"""Batched training augmentation on letterboxed greyscale tensors.

Rotation, horizontal flip, zoom and shift (a random resized crop of the letterboxed square)
and gamma/contrast/brightness jitter, done on whole batches with one ``grid_sample`` so that
augmentation costs little next to the network on a CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(batch: torch.Tensor, generator: torch.Generator, max_rotation: float = 15.0) -> torch.Tensor:
    """uint8 (N, 1, S, S) -> augmented float (N, 1, S, S) in [0, 1]."""
    n = batch.shape[0]

    def uniform(lo, hi):
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    angle = uniform(-max_rotation, max_rotation) * math.pi / 180
    zoom = uniform(0.8, 1.15)  # < 1 zooms in (crops), > 1 zooms out
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    tx, ty = uniform(-0.08, 0.08), uniform(-0.08, 0.08)
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    x = batch.float() / 255.0
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma = torch.exp(uniform(-0.3, 0.3)).view(n, 1, 1, 1)
    contrast = uniform(0.8, 1.2).view(n, 1, 1, 1)
    brightness = uniform(-0.08, 0.08).view(n, 1, 1, 1)
    x = x.clamp_min(0).pow(gamma)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + brightness).clamp(0, 1)
