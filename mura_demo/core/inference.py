"""Forward passes shared by training, evaluation, serving and benchmarks.

The model's answer for an image is more than one forward pass when its config asks for it:
with ``config.test_time_flip`` the logits are the mean of the image's and its mirror image's
(a left and a right arm are the same question to the model), and with a
``config.body_part_input_size`` below the size the body part's image is letterboxed at, the body-part logits come
from that image resized (the holdout showed the part is told better from a coarser view). With
``config.body_part_equalized_view`` the body-part logits are the mean of that view's and of the same view
histogram-equalised: equalising hides a source's grey levels, not the anatomy; with
``config.body_part_equalized_input`` (a network trained on equalised images) the equalised view alone. A pair
whose body-part network was trained at a size of its own reads the body part from the image letterboxed at that
size (``config.body_part_letterbox_size``), passed beside the model input, so that it reads exactly as it did alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .preprocess import equalized_view, normalize


def flip_mean(forward: Callable[[torch.Tensor], torch.Tensor], config: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """``forward(x)``, averaged with the mirrored batch's when the config asks for test-time flips."""
    if not config.test_time_flip:
        return forward(x)
    return forward(torch.cat([x, x.flip(-1)])).unflatten(0, (2, len(x))).mean(0)


def equalized_body_part_logits(model: torch.nn.Module, config: ModelConfig, view: torch.Tensor) -> torch.Tensor:
    """Body-part logits of ``view`` histogram-equalised (its flip mean when the config asks for flips)."""
    return flip_mean(model.body_part_logits, config, equalized_view(view, config))


def body_part_logits(model: torch.nn.Module, config: ModelConfig, view: torch.Tensor) -> torch.Tensor:
    """Body-part logits read from ``view`` alone: its flip mean, averaged with its equalised copy's when the
    config asks for that view, or its equalised copy's alone for a network trained on equalised images. Only the
    body-part columns are computed (with a separate body-part network, only that network runs)."""
    if config.body_part_equalized_input:
        return equalized_body_part_logits(model, config, view)
    logits = flip_mean(model.body_part_logits, config, view)
    if config.body_part_equalized_view:
        logits = (logits + equalized_body_part_logits(model, config, view)) / 2
    return logits


def resized(view: torch.Tensor, size: int) -> torch.Tensor:
    """``view`` resized to ``size`` px square (antialiased, so that a coarser view averages rather than skips)."""
    return F.interpolate(view, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def body_part_view(config: ModelConfig, x: torch.Tensor, letterboxed: torch.Tensor | None = None) -> torch.Tensor:
    """The view the body part is read from: the image letterboxed for the body part (the model input ``x``, or
    ``letterboxed`` where a pair's body-part network reads a size of its own), resized to the config's
    ``body_part_input_size`` when that is smaller (the letterbox itself when it is that size)."""
    if config.own_body_part_letterbox:
        x = letterboxed
    if x is None or x.shape[-1] != config.body_part_image_size:
        raise ValueError(f"the body part is read from the image letterboxed at {config.body_part_image_size} px")
    if not config.body_part_resized:
        return x
    return resized(x, config.body_part_input_size)


def answer_from(
    model: torch.nn.Module,
    config: ModelConfig,
    x: torch.Tensor,
    body_part: bool = True,
    abnormality: bool = True,
    letterboxed: torch.Tensor | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Run the passes that complete the answer for ``x`` beyond its own forward pass (the mirror
    image, the body part's own or coarser view, its equalised copy) and return the map from ``x``'s own logits to
    the answer.

    The explanation maps need ``x``'s own pass with gradients; every other pass runs here without.
    ``body_part`` and ``abnormality`` say which columns of the answer must be complete: a caller that
    only routes on the body part, or not even that, is spared the passes it would not read. ``letterboxed``: the
    body part's own letterbox, for a pair that reads it (see :func:`body_part_view`).
    """
    view = body_part_view(config, x, letterboxed) if body_part else x
    own_pass = body_part and config.body_part_own_pass
    with torch.no_grad():
        mirror = config.test_time_flip and (abnormality or (body_part and not own_pass))
        mirrored = model(x.flip(-1)) if mirror else None
        own = body_part_logits(model, config, view) if own_pass else None
        equalized = None
        if body_part and not own_pass and config.body_part_equalized_view:
            equalized = equalized_body_part_logits(model, config, x)

    def answer(logits: torch.Tensor) -> torch.Tensor:
        if mirrored is not None:
            logits = (logits + mirrored) / 2
        if own is not None:
            logits = torch.cat([own, config.split_logits(logits)[1]], 1)
        if equalized is not None:
            body, abnormal = config.split_logits(logits)
            logits = torch.cat([(body + equalized) / 2, abnormal], 1)
        return logits

    return answer


def model_logits(
    model: torch.nn.Module, config: ModelConfig, x: torch.Tensor, letterboxed: torch.Tensor | None = None
) -> torch.Tensor:
    """Normalised batch -> the model's answer (test-time flip and body-part view included)."""
    return answer_from(model, config, x, letterboxed=letterboxed)(model(x))


@contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode for the block (scoring runs during training too), its own mode back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def batched(images: torch.Tensor, config: ModelConfig, device: torch.device, batch_size: int):
    """uint8 (N, 1, S, S) letterboxed images -> normalised batches on ``device``."""
    for start in range(0, len(images), batch_size):
        yield normalize(images[start : start + batch_size], config).to(device)


def body_part_batches(images: torch.Tensor | None, config: ModelConfig, device: torch.device, batch_size: int):
    """The batches of the body part's own letterboxes beside :func:`batched`'s (None each where there are none)."""
    return itertools.repeat(None) if images is None else batched(images, config, device, batch_size)


@torch.inference_mode()
def score_images(
    model: torch.nn.Module,
    config: ModelConfig,
    images: torch.Tensor,
    body_part_images: torch.Tensor | None = None,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 1, S, S) letterboxed images -> (body-part probabilities, abnormality probabilities).
    ``body_part_images``: the same images letterboxed for the body part, for a pair that reads its own size."""
    body, abnormal = [], []
    device = next(model.parameters()).device
    with eval_mode(model):
        for x, own in zip(batched(images, config, device, batch_size),
                          body_part_batches(body_part_images, config, device, batch_size)):  # fmt: skip
            bp, ab = config.split_logits(model_logits(model, config, x, own).float().cpu())
            body.append(bp.softmax(1))
            abnormal.append(ab.sigmoid())
    return torch.cat(body), torch.cat(abnormal)


@torch.inference_mode()
def score_body_parts(
    model: torch.nn.Module, config: ModelConfig, images: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """uint8 (N, 1, S, S) images letterboxed for the body part (``config.body_part_image_size``) -> body-part
    probabilities, the same as ``score_images``' first half without the passes only the abnormality answer reads
    (for choices and probes on the part alone)."""
    with eval_mode(model):
        body = [  # x is the body part's letterbox whether or not the model input is too
            body_part_logits(model, config, body_part_view(config, x, x)).float().cpu().softmax(1)
            for x in batched(images, config, next(model.parameters()).device, batch_size)
        ]
    return torch.cat(body)
