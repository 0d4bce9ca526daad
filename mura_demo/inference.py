"""Forward passes shared by training, evaluation, serving and benchmarks.

With ``config.test_time_flip`` the model's answer for an image is the mean of its logits for the
image and its mirror image (a left and a right arm are the same question to the model).
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .model import split_logits
from .preprocess import normalize


def model_logits(model: torch.nn.Module, config: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """Normalised batch -> logits, averaged with the mirrored batch's when the config asks for it."""
    if not config.test_time_flip:
        return model(x)
    return model(torch.cat([x, x.flip(-1)])).unflatten(0, (2, len(x))).mean(0)


@torch.inference_mode()
def score_images(
    model: torch.nn.Module, config: ModelConfig, images: torch.Tensor, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 1, S, S) letterboxed images -> (body-part probabilities, abnormality probabilities)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    body, abnormal = [], []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size], config).to(device)
        bp, ab = split_logits(config, model_logits(model, config, x).float().cpu())
        body.append(bp.softmax(1))
        abnormal.append(ab.sigmoid())
    model.train(was_training)
    return torch.cat(body), torch.cat(abnormal)
