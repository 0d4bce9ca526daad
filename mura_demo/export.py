"""Export: a weights folder (float16 safetensors + config.json) that serving loads strictly."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import WEIGHTS_NAME, ModelConfig


def export_weights(model: torch.nn.Module, config: ModelConfig, folder: str | Path) -> Path:
    """Write ``model.safetensors`` (float tensors as float16) and ``config.json`` to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, value in model.state_dict().items():
        value = value.detach().cpu()
        tensors[name] = (value.half() if value.is_floating_point() else value).contiguous()
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt", "version": config.version})
    config.save(folder)
    return folder / WEIGHTS_NAME
