"""One configuration object shared by training, export and serving.

It is stored as ``config.json`` beside ``model.safetensors`` so that everything needed to
rebuild and interpret the model travels with its weights (as timm's pretrained configs do).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

BODY_PARTS: tuple[str, ...] = ("elbow", "finger", "forearm", "hand", "humerus", "shoulder", "wrist")
OTHER = "other"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclasses.dataclass
class ModelConfig:
    """Architecture, preprocessing and calibration of one body-part-aware MURA model."""

    architecture: str = "tf_efficientnet_lite0"
    input_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    body_parts: tuple[str, ...] = BODY_PARTS
    cam_layer: str = "backbone.bn2"
    drop_rate: float = 0.2
    test_time_flip: bool = False  # average the logits of the image and its mirror image
    body_part_input_size: int | None = None  # read the body part from its letterbox resized to this size
    # A pair whose body-part network was trained at another size reads the body part from the image letterboxed
    # at that size (None: from the model input), so that it reads exactly as it did alone.
    body_part_letterbox_size: int | None = None
    body_part_equalized_view: bool = False  # body-part logits: the mean of the image's and its equalised view's
    # The body part read from the equalised view alone: its network was trained on equalised images only
    # (`train --equalized-inputs`), so no grey-level style reaches it in training or serving.
    body_part_equalized_input: bool = False
    # The body part read by a network of its own (a BodyPartPair: one network per head), so that choosing a
    # body-part network never costs the abnormality reading, and the reverse.
    separate_body_part_network: bool = False
    thresholds: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(BODY_PARTS, 0.5))
    validated: dict[str, bool] = dataclasses.field(default_factory=lambda: dict.fromkeys(BODY_PARTS, False))
    # A detected body part counts towards a validated reading only at or above this probability (chosen
    # so that views of a source the model never saw rarely pass misrouted), and, where detection alone
    # cannot be trusted even then, only once the user confirms it; the reason is shown to the user.
    body_part_min_probability: float = 0.0
    body_part_confirmation: bool = False
    body_part_confirmation_reason: str = ""
    version: str = "untrained"
    trained: bool = False
    model_card_url: str = ""
    metrics: dict = dataclasses.field(default_factory=dict)
    training: dict = dataclasses.field(default_factory=dict)

    @property
    def model_name(self) -> str:
        """What the page and the API name the model ("2 x ...": one network per head)."""
        return f"2 x {self.architecture}" if self.separate_body_part_network else self.architecture

    @property
    def body_part_image_size(self) -> int:
        """The size the image is letterboxed at for the body part (the model input's, unless a pair's body-part
        network has a size of its own)."""
        return self.body_part_letterbox_size or self.input_size

    @property
    def own_body_part_letterbox(self) -> bool:
        """Whether the body part is read from a letterbox of its own, passed beside the model input."""
        return self.body_part_image_size != self.input_size

    @property
    def body_part_resized(self) -> bool:
        """Whether the body part is read from its letterbox resized to a coarser size (``body_part_input_size``)."""
        return bool(self.body_part_input_size) and self.body_part_input_size != self.body_part_image_size

    @property
    def body_part_own_pass(self) -> bool:
        """Whether the body part needs a forward pass of its own, not the model input's: it is read from another
        image (its own letterbox, a coarser size), by a network of its own (a pair's forward pass leaves it out),
        or from the equalised view alone."""
        return (
            self.own_body_part_letterbox
            or self.body_part_resized
            or self.separate_body_part_network
            or self.body_part_equalized_input
        )

    @property
    def body_part_classes(self) -> tuple[str, ...]:
        """Classes of the body-part head: the upper-extremity parts plus 'other'."""
        return (*self.body_parts, OTHER)

    @property
    def num_outputs(self) -> int:
        """Width of the model's output: body-part logits, then one abnormality logit per part."""
        return len(self.body_part_classes) + len(self.body_parts)

    @property
    def reads_abnormality(self) -> bool:
        """False for a network trained for the body part alone (`train --body-part-only`): its abnormality head
        never learnt, so it serves only as the body-part half of a pair."""
        return not self.training.get("settings", {}).get("body_part_only", False)

    @property
    def reads_body_part(self) -> bool:
        """False for a network trained for the abnormality alone (`train --abnormality-only`): its body-part head
        never learnt, so it serves only as the abnormality half of a pair."""
        return not self.training.get("settings", {}).get("abnormality_only", False)

    def abnormality_index(self, body_part: str) -> int:
        """Column of the model output holding ``body_part``'s abnormality logit."""
        return len(self.body_part_classes) + self.body_parts.index(body_part)

    def split_logits(self, logits):
        """The model output (N, num_outputs) -> (body-part logits, abnormality logits): the one place
        that knows the layout."""
        n = len(self.body_part_classes)
        return logits[:, :n], logits[:, n:]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config.json has unknown keys: {', '.join(unknown)}")
        data = dict(data)
        for key in ("mean", "std", "body_parts"):
            if key in data:
                data[key] = tuple(data[key])
        cfg = cls(**data)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Reject configs whose per-part tables do not match the part list."""
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("config.json: mean and std need three values")
        for name in ("thresholds", "validated"):
            table = getattr(self, name)
            if set(table) != set(self.body_parts):
                raise ValueError(f"config.json: '{name}' must name exactly the parts {list(self.body_parts)}")
        if self.body_part_letterbox_size is not None and not self.separate_body_part_network:
            raise ValueError("config.json: body_part_letterbox_size is for a pair, whose body-part network has a size")
        letterboxed, size = self.body_part_image_size, self.body_part_input_size
        if letterboxed < 32:
            raise ValueError(f"config.json: the body part's letterbox must be at least 32 px, got {letterboxed}")
        if size is not None and not 32 <= size <= letterboxed:
            raise ValueError(f"config.json: body_part_input_size must lie in [32, {letterboxed}], got {size}")
        for part, t in self.thresholds.items():
            if not 0.0 < float(t) < 1.0:
                raise ValueError(f"config.json: threshold for {part} must lie in (0, 1), got {t}")
        if not 0.0 <= self.body_part_min_probability < 1.0:
            raise ValueError("config.json: body_part_min_probability must lie in [0, 1)")
        if self.body_part_equalized_input and self.body_part_equalized_view:
            raise ValueError("config.json: a body part read from equalised images alone has no plain view to average")
        if self.separate_body_part_network and not self.cam_layer.startswith("abnormality."):
            raise ValueError("config.json: a model with a separate body-part network explains its abnormality network")

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return cls.from_dict(data)
