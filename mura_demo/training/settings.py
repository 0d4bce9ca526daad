"""The settings of a training run and of an evaluation: plain dataclasses, importable without the
training machinery (the command line builds its options from them)."""

from __future__ import annotations

import dataclasses

from ..core.config import BODY_PARTS, OTHER

# What the body part's serving size and view maximise on the holdout: the mean accuracy per source and part, or the
# images named right (small UNIFESP groups then weigh by their images, not as much as hundreds of MURA images).
VIEW_CHOICES = ("groups", "images")

# What a command that joins trained networks (`average`, `pair`) takes from its own command line; an average takes
# the rest from its first run.
JOINING_SETTINGS = ("data_root", "out_dir", "export_dir", "version", "threads", "view_choice", "other_shift")


@dataclasses.dataclass
class TrainSettings:
    """Everything a training run depends on; saved beside its checkpoints and in config.json."""

    data_root: str = "../shared/data"
    out_dir: str = "runs/train"
    export_dir: str | None = "weights"
    imagenet_init: str | None = None
    init_from: str | None = None  # a trained network's weights folder to start from instead of ImageNet alone
    architecture: str = "tf_efficientnet_lite0"
    input_size: int = 224
    version: str = "dev"
    head_epochs: int = 1
    epochs: int = 6
    batch_size: int = 32
    head_lr: float = 3e-3
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 30
    freeze_blocks: int = 2
    patience: int = 3
    ema_decay: float = 0.995  # per step, finetune phase only; 0 turns the average off
    seed: int = 0
    withhold: str | None = None  # "mura:elbow": leave that source's part out (leave-one-source-out run)
    elbow_fold: int | None = None  # 1..5: that patient fold of the non-test MURA elbows is the elbow holdout
    style: float = 0.0  # strength of cross-source style randomisation (0: off, 1: every trait at its rate)
    rank_share: float = 0.15  # with style: the rate of the ranking trait (augment.rank_equalize), scaled by style
    amplitude_share: float = 0.0  # with style: the rate of the Fourier amplitude mix (augment.mix_amplitudes)
    group_balance: float | None = None  # draw each source-and-part group by size**this (None: plain shuffle)
    region_balance: bool = False  # with group_balance: a group's draws spread over its regions (non-arm) the same way
    crop_share: float = 0.0  # share of draws from MURA end crops (elbow/wrist/shoulder candidates)
    source_prior: float = 0.0  # body-part loss: add this times log P(part | source) to the logits (0: off)
    source_mask: bool = False  # body-part loss: each image's softmax only over the parts its source shows in training
    mask_margin: float | None = None  # with source_mask: lower the never-shown parts by this (None: leave them out)
    other_weight: float = 1.0  # body-part loss: non-arm images weigh this many times their class weight
    part_weights: str | None = None  # body-part loss: "forearm=2": that part's images weigh 2 times their class weight
    split_views: bool = False  # UNIFESP films holding several views side by side also train as each view alone
    mix_styles: float = 0.0  # MixStyle: share of images whose early feature statistics are mixed (0: off)
    body_part_only: bool = False  # no abnormality loss, epochs chosen by body part: a network for `pair --body-part`
    # with body_part_only: every training image histogram-equalised after augmentation, and the body part read from
    # the equalised view alone (config.body_part_equalized_input): a canonical look instead of randomised ones
    equalized_inputs: bool = False
    abnormality_only: bool = False  # no body-part loss, trained on labelled images only: for `pair --abnormality`
    view_choice: str = "groups"  # the body part's size and view on the holdout: "groups" or "images" (see train)
    other_shift: bool = False  # finalize: add to the *other* logit the shift the holdout chooses (other_shift.py)
    cached_maps: bool = False  # train what follows the frozen blocks on their maps, made once per image and mirror
    last_epoch: bool = False  # keep the last epoch (its EMA) instead of the best holdout one, no early stop
    time_budget: float | None = None  # minutes: start no epoch after this (one always runs), export the best so far
    limit: int | None = None  # smoke runs: at most this many train and holdout images
    max_steps: int | None = None  # smoke runs: at most this many steps per epoch
    threads: int | None = None

    def __post_init__(self):
        """Refuse contradictory settings before a run makes anything."""
        if self.body_part_only and self.abnormality_only:
            raise ValueError("--body-part-only and --abnormality-only exclude each other")
        if self.equalized_inputs and not self.body_part_only:
            raise ValueError("--equalized-inputs hides grey levels from the body part: it needs --body-part-only")
        if self.abnormality_only and self.crop_share:
            raise ValueError("--crop-share adds end crops without an abnormality label: --abnormality-only skips them")
        if self.elbow_fold is not None and self.withhold == "mura:elbow":
            raise ValueError("--elbow-fold scores a fold of the MURA elbows that --withhold mura:elbow leaves out")
        if self.region_balance and self.group_balance is None:
            raise ValueError("--region-balance spreads each group's share of the draws: it needs --group-balance")
        if self.other_weight <= 0:
            raise ValueError("--other-weight must be positive: it multiplies the non-arm images' weight in the loss")
        parse_part_weights(self.part_weights)
        if self.view_choice not in VIEW_CHOICES:
            raise ValueError(f"--view-choice: {self.view_choice!r} is not one of {', '.join(VIEW_CHOICES)}")
        if self.cached_maps and (self.style or self.mix_styles or self.equalized_inputs):
            raise ValueError("--cached-maps trains on maps made once from the unaltered images (and their mirrors): "
                             "--style, --mix-styles and --equalized-inputs need the images of every step")  # fmt: skip
        for name in ("rank_share", "amplitude_share"):
            if not 0 <= getattr(self, name) <= 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} is the rate of one style trait, the share of images it is drawn for: 0 to 1")
        if not 0 <= self.mix_styles <= 1:
            raise ValueError("--mix-styles is the share of images whose feature statistics are mixed: from 0 to 1")

    def body_part_weights(self) -> dict[str, float]:
        """The multiplier of each body-part class's weight in the loss: ``--part-weights`` and ``--other-weight``."""
        return {**parse_part_weights(self.part_weights), OTHER: self.other_weight}


def parse_part_weights(text: str | None) -> dict[str, float]:
    """``--part-weights "forearm=2,wrist=1.5"`` -> {"forearm": 2.0, "wrist": 1.5}; refused with the reason when a
    name is not an arm part (*other* has its own ``--other-weight``) or a weight is not a positive number."""
    weights = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        part, _, value = item.partition("=")
        part = part.strip()
        if part not in BODY_PARTS:
            raise ValueError(f"--part-weights: {part!r} is not one of {', '.join(BODY_PARTS)} (other: --other-weight)")
        try:
            weights[part] = float(value)
        except ValueError:
            raise ValueError(f"--part-weights: {item.strip()!r} is not PART=WEIGHT") from None
        if not weights[part] > 0:
            raise ValueError(f"--part-weights: {part}'s weight must be positive: it multiplies its images' weight")
    return weights


@dataclasses.dataclass
class EvalSettings:
    """What an evaluation reads and writes."""

    data_root: str = "../shared/data"
    weights: str = "weights"
    out_dir: str = "runs/eval"
    imagenet_init: str | None = None  # for the baseline; skipped when absent
    loso_weights: str | None = None  # a run trained with a source withheld (train --withhold): its figures
    # or an evaluated weights folder that reads the body part as these weights do: its figures carry over
    loso_from: str | None = None
    n_boot: int = 1000
    threads: int | None = None

    def __post_init__(self):
        if self.loso_weights and self.loso_from:
            raise ValueError("--loso-weights measures the leave-one-source-out figures, --loso-from carries them over: "
                             "give one")  # fmt: skip
