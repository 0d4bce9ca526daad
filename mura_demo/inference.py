"""Batched scoring of preprocessed images: the path shared by training, evaluation and benchmarks."""

from __future__ import annotations

import torch

from .config import ModelConfig
from .model import split_logits
from .preprocess import normalize


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
        logits = model(x)
        bp, ab = split_logits(config, logits.float().cpu())
        body.append(bp.softmax(1))
        abnormal.append(ab.sigmoid())
    model.train(was_training)
    return torch.cat(body), torch.cat(abnormal)
