"""Batched training augmentation on letterboxed greyscale tensors.

Geometry (rotation, horizontal flip, zoom and shift: a random resized crop of the letterboxed
square) and gamma/contrast/brightness jitter, done on whole batches with one ``grid_sample`` so
that augmentation costs little next to the network on a CPU.

:func:`randomize_style` goes further, for the body part's sake: the two sources differ in look
(MURA films are grey, low in contrast, tilted, with burned-in letters; UNIFESP exports are crisp,
dark-backgrounded, high in contrast), and a network left alone learns the look instead of the
anatomy. Each image gets a random mix of the other source's traits, so look stops telling parts apart.
:func:`mixing_feature_styles` does the same inside the network, on the statistics of its early features.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont


def uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (hi - lo) + lo


def chance(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """(n,) booleans, each true with probability ``p``."""
    return torch.rand(n, generator=generator) < p


def augment(batch: torch.Tensor, generator: torch.Generator, max_rotation: float = 15.0) -> torch.Tensor:
    """uint8 (N, 1, S, S) -> augmented float (N, 1, S, S) in [0, 1]."""
    n = batch.shape[0]
    angle = uniform(n, -max_rotation, max_rotation, generator) * math.pi / 180
    zoom = uniform(n, 0.8, 1.15, generator)  # < 1 zooms in (crops), > 1 zooms out
    flip = torch.where(chance(n, 0.5, generator), -1.0, 1.0)
    tx, ty = uniform(n, -0.08, 0.08, generator), uniform(n, -0.08, 0.08, generator)
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    x = batch.float() / 255.0
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma = torch.exp(uniform(n, -0.3, 0.3, generator)).view(n, 1, 1, 1)
    contrast = uniform(n, 0.8, 1.2, generator).view(n, 1, 1, 1)
    brightness = uniform(n, -0.08, 0.08, generator).view(n, 1, 1, 1)
    x = x.clamp_min(0).pow(gamma)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + brightness).clamp(0, 1)


def pixel_ranks(flat: torch.Tensor) -> torch.Tensor:
    """(N, P) -> each value's place in its row's sort, 0 to P - 1 (ties in the sort's order): the inverse of the sort's
    permutation, scattered rather than sorted a second time."""
    order = flat.argsort(1)
    return torch.empty_like(order).scatter_(1, order, torch.arange(flat.shape[1]).expand_as(order))


def rank_equalize(x: torch.Tensor) -> torch.Tensor:
    """Each pixel its rank among the image's pixels, in [0, 1], ties broken by the sort's own order: an equalisation
    that also turns every flat region (the letterbox, a flat background) into bands of many grey levels. A style
    trait, not ``preprocess.equalize``: it was that function until session 49, and the twins trained since, with the
    tie-keeping one drawn instead, named far fewer unseen-source elbows (benchmarks/README.md, session 50)."""
    flat = x.flatten(1)
    return (pixel_ranks(flat).float() / (flat.shape[1] - 1)).view_as(x)


def match_histograms(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each image of ``x`` given the grey-level distribution of the same row of ``reference`` (its pixels ranked as
    by :func:`rank_equalize`, so a flat region takes many of the reference's values)."""
    ref = reference.flatten(1).sort(1).values
    return ref.gather(1, pixel_ranks(x.flatten(1))).view_as(x)


def mix_amplitudes(x: torch.Tensor, reference: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each image's Fourier amplitude spectrum mixed with ``weight`` (per image, 0 to 1) of the same row of
    ``reference``'s, its phase kept (the amplitude mix of Xu et al., CVPR 2021). The phase carries where edges and
    shapes are, the amplitude how sharp, noisy and contrasty the film is, so the anatomy stays and the look moves."""
    own, other = torch.fft.rfft2(x), torch.fft.rfft2(reference)
    amplitude = (1 - weight) * own.abs() + weight * other.abs()
    return torch.fft.irfft2(torch.polar(amplitude, own.angle()), s=x.shape[-2:])


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


@functools.lru_cache(maxsize=8)
def marker_glyphs(size: int) -> tuple[torch.Tensor, ...]:
    """Masks of the side markers burned into radiographs ('L', 'R', a filled square), ``size`` px high."""
    font = ImageFont.load_default(size=size)
    masks = []
    for text in ("L", "R", "LT", "RT", None):
        canvas = Image.new("L", (size * 2, size + 4), 0)
        draw = ImageDraw.Draw(canvas)
        if text is None:
            draw.rectangle((0, 0, size // 2, size // 2), fill=255)
        else:
            draw.text((0, 0), text, fill=255, font=font)
        box = canvas.getbbox() or (0, 0, 1, 1)
        masks.append(torch.from_numpy(np.asarray(canvas.crop(box), dtype=np.float32) / 255.0))
    return tuple(masks)


def burn_in_markers(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A bright side marker at a random place of each image."""
    x = x.clone()
    side = x.shape[-1]
    for i in range(len(x)):
        glyphs = marker_glyphs(int(uniform(1, side * 0.05, side * 0.11, generator)))
        mask = glyphs[int(torch.randint(len(glyphs), (1,), generator=generator))]
        h, w = mask.shape
        top = int(torch.randint(0, max(1, side - h), (1,), generator=generator))
        left = int(torch.randint(0, max(1, side - w), (1,), generator=generator))
        level = float(uniform(1, 0.7, 1.0, generator))
        patch = x[i, 0, top : top + h, left : left + w]
        x[i, 0, top : top + h, left : left + w] = torch.maximum(patch, mask[: patch.shape[0], : patch.shape[1]] * level)
    return x


def collimation_frame(n: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 1, side, side) masks of a randomly placed and tilted rectangle (1 inside, 0 outside)."""
    half_w, half_h = uniform(n, 0.55, 0.95, generator), uniform(n, 0.55, 0.95, generator)
    cx, cy = uniform(n, -0.15, 0.15, generator), uniform(n, -0.15, 0.15, generator)
    angle = uniform(n, -0.5, 0.5, generator)
    axis = torch.linspace(-1, 1, side)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    dx, dy = xx[None] - cx.view(n, 1, 1), yy[None] - cy.view(n, 1, 1)
    c, s = torch.cos(angle).view(n, 1, 1), torch.sin(angle).view(n, 1, 1)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return ((u.abs() <= half_w.view(n, 1, 1)) & (v.abs() <= half_h.view(n, 1, 1))).float()[:, None]


def randomize_style(
    x: torch.Tensor, generator: torch.Generator, p: float, rank_share: float, amplitude_share: float = 0.0
) -> torch.Tensor:
    """Float (N, 1, S, S) in [0, 1] -> the same anatomy in a random mix of looks; each trait is
    drawn for each image with a probability scaled by ``p`` (0 leaves the batch as it is). ``rank_share`` is the rate
    of :func:`rank_equalize`, the trait that textures flat regions, apart so that it can be screened as a lever
    (``TrainSettings.rank_share`` holds the recipe's rate before 3.3.0; 3.3.0's body-part runs drew it at 0.45).
    ``amplitude_share`` is the rate of :func:`mix_amplitudes` with another image of the batch, up to half of its
    spectrum (beyond, the other image's shapes show through); at 0 nothing is drawn for it, so the runs before it
    draw exactly as they did."""
    if p <= 0:
        return x
    x = x.clone()
    n, side = x.shape[0], x.shape[-1]

    def apply(q: float, change) -> None:  # ``change`` on the images drawn with probability q * p
        rows = torch.nonzero(chance(n, q * p, generator)).flatten()
        if len(rows):
            x[rows] = change(x[rows], rows).clamp(0, 1)

    def per_image(lo: float, hi: float, rows: torch.Tensor) -> torch.Tensor:
        return uniform(len(rows), lo, hi, generator).view(-1, 1, 1, 1)

    reference = x[torch.randperm(n, generator=generator)]
    apply(0.3, lambda v, rows: match_histograms(v, reference[rows]))
    apply(rank_share, lambda v, _: rank_equalize(v))
    if amplitude_share:
        apply(amplitude_share, lambda v, rows: mix_amplitudes(v, reference[rows], per_image(0.0, 0.5, rows)))
    apply(1.0, lambda v, rows: v.pow(torch.exp(per_image(-0.6, 0.6, rows))))
    apply(0.3, lambda v, rows: (lift := per_image(0.0, 0.35, rows)) + (1 - lift) * v)  # a grey film base
    apply(0.2, lambda v, rows: (v - 0.5) * per_image(1.2, 1.6, rows) + 0.5)  # a crisper, harder export
    factor = float(uniform(1, 1.5, 3.0, generator))  # resolution round trip

    def round_trip(v, _):
        small = F.interpolate(v, scale_factor=1 / factor, mode="bilinear", antialias=True, align_corners=False)
        return F.interpolate(small, size=(side, side), mode="bilinear", align_corners=False)

    apply(0.25, round_trip)
    sigma = float(uniform(1, 0.6, 1.6, generator))
    apply(0.2, lambda v, _: blur(v, sigma))

    def frame(v, rows):
        inside = collimation_frame(len(rows), side, generator)
        return v * inside + per_image(0.0, 0.5, rows) * (1 - inside)

    apply(0.25, frame)
    apply(0.35, lambda v, _: burn_in_markers(v, generator))
    apply(0.3, lambda v, rows: v + torch.randn(v.shape, generator=generator) * per_image(0.0, 0.04, rows))
    return x


def mix_feature_styles(x: torch.Tensor, generator: torch.Generator, p: float, alpha: float = 0.1) -> torch.Tensor:
    """MixStyle (Zhou et al., ICLR 2021) on a batch of features (N, C, H, W): each image drawn with probability
    ``p`` gets its per-channel mean and spread replaced by a Beta(alpha, alpha) mix of its own and those of another
    image of the batch. Early channel statistics carry an image's look more than its layout, and a balanced batch
    holds both sources, so the look stops being a reliable cue while the anatomy stays where it is."""
    n = x.shape[0]
    rows = chance(n, p, generator)
    if n < 2 or not rows.any():
        return x
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    lam = torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, n)).to(x.device, x.dtype).view(n, 1, 1, 1)
    partner = torch.randperm(n, generator=generator).to(x.device)
    mean = x.mean((2, 3), keepdim=True).detach()
    spread = (x.var((2, 3), keepdim=True) + 1e-6).sqrt().detach()
    mixed = (x - mean) / spread * (lam * spread + (1 - lam) * spread[partner]) + lam * mean + (1 - lam) * mean[partner]
    return torch.where(rows.to(x.device).view(n, 1, 1, 1), mixed, x)


@contextlib.contextmanager
def mixing_feature_styles(modules: list[torch.nn.Module], generator: torch.Generator, p: float):
    """Inside the ``with`` statement, the outputs of ``modules`` go through :func:`mix_feature_styles` (training
    steps only: the hooks are registered here and always released on the way out, so scoring and export never see
    them)."""
    hooks = [] if p <= 0 else [m.register_forward_hook(lambda _m, _in, out: mix_feature_styles(out, generator, p))
                               for m in modules]  # fmt: skip
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
