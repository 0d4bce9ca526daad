"""Training: two-phase fine-tuning of the body-part-aware model, plain PyTorch, DDP-ready.

Phase "heads" trains the two linear heads on frozen ImageNet features; phase "finetune"
unfreezes the backbone (past its first blocks, with batch-norm statistics frozen) under a
warm-up + cosine schedule, keeping an exponential moving average (EMA) of the weights beside
them. After every epoch both are scored on a patient-level holdout of MURA ``train``; the best
by study-level AUROC is kept. On that holdout the run then decides whether test-time flips help
and from which input size the body part is read best, records how a cut fitted there would hold up against the
fixed 0.5 every part uses, and exports a weights folder. MURA ``valid`` is never read here.

The same command runs under ``torchrun`` (DistributedDataParallel: NCCL on GPUs, gloo on CPUs):
each rank trains on its shard of every epoch; rank 0 alone writes checkpoints and logs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..core.config import OTHER, ModelConfig
from ..core.inference import score_body_parts, score_images
from ..core.model import MuraNet, create_model
from ..core.preprocess import equalize, normalize
from ..core.weights import load_folder, round_as_stored, save_weights
from .augment import augment, mixing_feature_styles, randomize_style
from .data import (
    Sample,
    abnormality_rows,
    body_part_images,
    body_part_targets,
    crop_siblings,
    elbow_fold_splits,
    end_crops,
    group_of,
    load_images,
    load_splits,
    patients_of,
    single_views,
    withhold,
)
from .evaluate import body_part_merit, body_part_summary
from .metrics import auroc, binary_metrics, mean_held_out_kappas, study_scores
from .other_shift import shift_other_logit
from .settings import JOINING_SETTINGS, TrainSettings

BODY_PART_SIZES = (224, 192, 160)  # coarser views the holdout may choose to read the body part from
MIX_STYLE_BLOCKS = (1, 2, 3)  # MixStyle after these backbone stages (strides 4, 8, 16), as after ResNet's first three
METRIC_KEYS = ("body_part_accuracy", "body_part_by_group")  # the body part's holdout figures a config keeps


class Distributed:
    """Rank, world size and device, from torchrun's environment (a single process otherwise)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        if self.world > 1 and not torch_dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            torch_dist.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return DistributedDataParallel(model) if self.world > 1 else model

    def close(self) -> None:
        if torch_dist.is_initialized():
            torch_dist.barrier()
            torch_dist.destroy_process_group()


def set_phase(model: MuraNet, phase: str, freeze_blocks: int) -> list[torch.nn.Parameter]:
    """Choose what trains in ``phase`` and put modules in the right mode; returns trainable params."""
    for p in model.parameters():
        p.requires_grad = phase == "finetune"
    if phase == "finetune":
        frozen = [model.backbone.conv_stem, model.backbone.bn1, *model.backbone.blocks[:freeze_blocks]]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad = False
    for head in (model.body_part_head, model.abnormality_head):
        for p in head.parameters():
            p.requires_grad = True
    model.train()
    # Batch-norm statistics stay at their ImageNet values: small CPU batches would only add noise.
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return [p for p in model.parameters() if p.requires_grad]


class Losses:
    """Body-part cross-entropy (class-balanced) plus per-part abnormality BCE.

    An image with several candidate parts is right with any of them: its loss is minus the log of
    their summed probability. The two end crops of one image, side by side in a batch, are scored
    together: one end shows one candidate and the other end the other, so their loss is minus the
    log of the probability that they are (X, Y) or (Y, X). Alone, "elbow" (a candidate of every crop)
    would be a right answer for every crop; together, calling both ends elbow is wrong.

    With ``source_prior`` = t > 0, each whole image's body-part logits get t * log P(part | its source)
    added in the loss (the prior as drawn, see :func:`source_log_priors`), never at inference. The prior
    then carries "a MURA image is forearm or humerus", so the network is no longer pushed to turn the
    look of a source into parts it never shows there; the features are left to tell parts apart within
    each source, by anatomy.

    With ``source_mask``, each image's body-part softmax runs only over the parts its source shows anywhere in
    training (its whole images and end crops), and *other*: that a source never shows a part says how it was
    collected, not that its images are not that part, but whether an image is an upper extremity at all is known
    for every source (MURA holds nothing else). Unlike the prior, it leaves the balance between the parts a source does
    show to the features, so a MURA forearm is still taught against a MURA elbow, and a UNIFESP chest against a
    UNIFESP hand.

    With ``mask_margin`` = m, those parts stay in the softmax with their logits lowered by m: weak negative evidence
    (each such part's gradient scaled by about e^-m), so a part a source never shows is still pushed down a little on
    that source's images instead of being left free.

    Without ``abnormality`` the loss is the body part's alone: a network that reads only the body part, for a
    :class:`BodyPartPair`, spends none of its features on abnormality. Without ``body_part``, likewise, the loss is
    the abnormality's alone.

    With ``part_weights`` {class: w}, that class's images weigh w times their class-balanced weight in the body-part
    loss. For *other* (``--other-weight``): a non-arm image called an arm part gets a reading it should never get,
    which makes that error worse than the reverse one; for an arm part (``--part-weights``): its views lost to a
    neighbouring part cost more.
    """

    def __init__(
        self,
        config: ModelConfig,
        samples: list[Sample],
        draws: torch.Tensor | None = None,
        source_prior: float = 0.0,
        source_mask: bool = False,
        mask_margin: float | None = None,
        part_weights: dict[str, float] | None = None,
        abnormality: bool = True,
        body_part: bool = True,
    ):
        self.config = config
        self.abnormality, self.body_part = abnormality, body_part
        targets = body_part_targets(samples, config.body_part_classes)
        self.adjust = torch.zeros_like(targets)
        if source_prior:
            log_priors = source_log_priors(samples, targets, draws)
            for i, s in enumerate(samples):
                if s.end is None:  # end crops have candidates their source's whole images never show
                    self.adjust[i] = source_prior * log_priors[s.source]
        if source_mask:
            sources = [s.source for s in samples]
            for source in set(sources):
                rows = torch.tensor([x == source for x in sources])
                shown = targets[rows].sum(0) > 0
                shown[config.body_part_classes.index(OTHER)] = True  # every source's images are known to be arm or not
                lowered = -torch.inf if mask_margin is None else -mask_margin
                self.adjust[rows] = self.adjust[rows].masked_fill(~shown, lowered)
        self.candidates = targets > 0
        counts = targets[[s.end is None for s in samples]].sum(0).clamp_min(1)  # whole images set the balance
        class_weight = (counts.sum() / counts).sqrt()
        class_weight /= (class_weight * counts).sum() / counts.sum()
        for part, weight in (part_weights or {}).items():
            class_weight[config.body_part_classes.index(part)] *= weight
        self.sample_weight = (self.candidates * class_weight).sum(1) / self.candidates.sum(1)
        self.sibling = crop_siblings(samples)
        classes = config.body_part_classes
        self.pair_classes = torch.tensor(
            [[classes.index(p) for p in s.body_parts] if len(s.body_parts) == 2 else [0, 0] for s in samples]
        )
        self.part = torch.tensor(
            [config.body_parts.index(s.body_parts[0]) if s.abnormal is not None else -1 for s in samples]
        )
        self.abnormal = torch.tensor([float(s.abnormal) if s.abnormal is not None else -1.0 for s in samples])
        pos = torch.zeros(len(config.body_parts))
        neg = torch.zeros(len(config.body_parts))
        for p, y in zip(self.part.tolist(), self.abnormal.tolist()):
            if p >= 0:
                (pos if y == 1 else neg)[p] += 1
        self.pos_weight = torch.where(pos > 0, neg / pos.clamp_min(1), torch.ones_like(pos))
        self.parts_with_labels = [part for part, n in zip(config.body_parts, pos + neg) if n > 0]

    def __call__(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        bp_logits, ab_logits = self.config.split_logits(logits)
        if self.body_part:
            adjust = self.adjust[index].to(logits.device)
            bp_loss = self.body_part_loss(F.log_softmax(bp_logits + adjust, 1), index.to(logits.device))
        else:
            bp_loss = 0.0 * bp_logits.sum()  # keeps the untrained head in the graph (DDP wants every parameter used)
        part = self.part[index].to(logits.device)
        has = part >= 0
        if not self.abnormality or not has.any():
            return bp_loss + 0.0 * ab_logits.sum()
        chosen = ab_logits[has].gather(1, part[has, None])[:, 0]
        y = self.abnormal[index].to(logits.device)[has]
        pw = self.pos_weight.to(logits.device)[part[has]]
        ab_loss = F.binary_cross_entropy_with_logits(chosen, y, pos_weight=pw)
        return bp_loss + ab_loss

    def body_part_loss(self, log_prob: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        device = log_prob.device
        weight = self.sample_weight.to(device)[index]
        row_ll = log_prob.masked_fill(~self.candidates.to(device)[index], -torch.inf).logsumexp(1)
        # rows whose next row is their sibling crop: scored as a pair instead
        sibling = self.sibling.to(device)[index]
        first = torch.nonzero(sibling[:-1] == index[1:]).flatten()
        if len(first):
            x, y = self.pair_classes.to(device)[index[first]].unbind(1)
            a, b = log_prob[first], log_prob[first + 1]

            def pick(rows: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
                return rows.gather(1, cls[:, None])[:, 0]

            pair_ll = torch.logaddexp(pick(a, x) + pick(b, y), pick(a, y) + pick(b, x))
            row_ll = row_ll.index_put((first,), pair_ll / 2).index_put((first + 1,), pair_ll / 2)
        return -(weight * row_ll).mean()


def source_log_priors(
    samples: list[Sample], targets: torch.Tensor, draws: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Per source, the log of its body-part distribution as training draws it (whole images, weighted by
    their draw weights), with one pseudo-image per class so that a part a source lacks gets a finite,
    strongly negative log prior."""
    weights = torch.ones(len(samples), dtype=torch.float64) if draws is None else draws.double()
    out = {}
    for source in sorted({s.source for s in samples}):
        rows = torch.tensor([s.source == source and s.end is None for s in samples])
        mass = (weights[rows, None] * targets[rows].double()).sum(0)
        n = int(rows.sum())
        out[source] = ((mass / mass.sum() * n + 1) / (n + len(mass))).log().float()
    return out


def part_study_scores(config: ModelConfig, samples: list[Sample], ab_prob: torch.Tensor, join=np.mean) -> dict:
    """Per body part with abnormality labels: study-level (studies, labels, joined probabilities) of its logit
    (``join``: see :func:`study_scores`)."""
    out = {}
    for part, idx in abnormality_rows(samples, config.body_parts).items():
        col = config.body_parts.index(part)
        studies, labels = [samples[i].study for i in idx], [samples[i].abnormal for i in idx]
        out[part] = study_scores(studies, labels, ab_prob[idx, col], join)
    return out


def holdout_report(
    config: ModelConfig, samples: list[Sample], bp_prob: torch.Tensor, ab_prob: torch.Tensor, by_body_part: bool = False
) -> dict:
    """Study-level AUROC per part with labels, and body-part accuracy, on the holdout.

    ``body_part_accuracy`` is the mean of the per-group accuracies (source and part), so the
    thousands of MURA forearm and humerus images cannot hide a failing group of a few dozen.
    The ``score`` that chooses epochs is the mean AUROC, or with ``by_body_part`` that accuracy.
    """
    report: dict = {
        "auroc": {part: auroc(y, p) for part, (_, y, p) in part_study_scores(config, samples, ab_prob).items()}
    }
    report |= body_part_summary(config, samples, bp_prob)
    report["score"] = float(np.mean(list(report["auroc"].values()))) if report["auroc"] else 0.0
    if by_body_part:
        report["score"] = report["body_part_accuracy"]
    return report


def draw_weights(samples: list[Sample], settings: TrainSettings) -> torch.Tensor | None:
    """Per-image sampling weights (None: every image equally often, the plain shuffle).

    With ``group_balance`` = a, each group of whole images (source and part) is drawn in proportion
    to its size to the power a: 1 is the natural mix, 0 draws every group equally often, so the
    few dozen UNIFESP elbows are not drowned by thousands of MURA forearms. End crops then take
    ``crop_share`` of the draws, drawn as pairs (both ends of one image; see :class:`Losses`).
    With ``region_balance`` a group's share is spread over the regions of its images the same way (UNIFESP's
    non-arm images: 508 chests would otherwise drown the few dozen knees, feet and lower legs, the non-arm views
    that look like an arm and that the body part gets wrong).
    """
    if settings.group_balance is None and not settings.crop_share:
        return None
    alpha = 1.0 if settings.group_balance is None else settings.group_balance
    groups = [group_of(s) for s in samples]
    regions = [(g, s.region if settings.region_balance else "") for g, s in zip(groups, samples)]
    size, region_size, spread = Counter(groups), Counter(regions), Counter()
    for (group, _), n in region_size.items():
        spread[group] += n**alpha
    weights = torch.tensor([size[g] ** alpha * region_size[g, r] ** (alpha - 1) / spread[g] for g, r in regions],
                           dtype=torch.float64)  # fmt: skip
    crop = torch.tensor([s.end is not None for s in samples])
    weights[crop & (crop_siblings(samples) < 0)] = 0.0  # a crop pair is drawn through its first end
    for chosen, share in ((crop, settings.crop_share), (~crop, 1 - settings.crop_share)):
        if chosen.any():
            weights[chosen] *= share / weights[chosen].sum()
    return weights


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors (for safetensors) plus JSON-able hyper-parameters."""
    sd = opt.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"opt.{pid}.{key}"] = torch.as_tensor(value).contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def model_tensors(model: MuraNet, prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def load_model_tensors(model: MuraNet, tensors: dict[str, torch.Tensor], prefix: str = "model.") -> None:
    model.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)


def subsample(samples: list[Sample], limit: int | None) -> list[Sample]:
    """An evenly spaced subset (it keeps every source and part in proportion), for smoke runs."""
    if limit is None or len(samples) <= limit:
        return samples
    step = len(samples) / limit
    return [samples[int(i * step)] for i in range(limit)]


@dataclasses.dataclass
class TrainingData:
    """What every epoch reads: the samples, their letterboxed images in memory, the losses and draws."""

    train_set: list[Sample]
    holdout: list[Sample]
    images: torch.Tensor
    holdout_images: torch.Tensor
    losses: Losses
    weights: torch.Tensor | None  # draw weights (None: a plain shuffle)
    steps: int  # per epoch and rank


def run_splits(settings: TrainSettings) -> dict[str, list[Sample]]:
    """The splits a run trains and finalizes on: with an elbow fold, that fold's elbows are the elbow holdout."""
    splits = load_splits(settings.data_root)
    return splits if settings.elbow_fold is None else elbow_fold_splits(splits, settings.elbow_fold)


def load_training_data(settings: TrainSettings, config: ModelConfig, dist: Distributed) -> TrainingData:
    splits = run_splits(settings)
    train_set = subsample(withhold(splits["train"], settings.withhold), settings.limit)
    if settings.abnormality_only:  # images without an abnormality label would teach nothing
        train_set = [s for s in train_set if s.abnormal is not None]
    holdout = subsample(withhold(splits["holdout"], settings.withhold), settings.limit)
    steps = max(1, len(train_set) // dist.world // settings.batch_size)  # an epoch: the whole images once
    if settings.max_steps:
        steps = min(steps, settings.max_steps)
    if settings.split_views:
        train_set += single_views(train_set)
    if settings.crop_share:
        train_set += end_crops(train_set)
    t0 = time.time()
    draws = draw_weights(train_set, settings)
    data = TrainingData(
        train_set,
        holdout,
        load_images(train_set, config.input_size),
        load_images(holdout, config.input_size),
        Losses(
            config,
            train_set,
            draws,
            settings.source_prior,
            settings.source_mask,
            settings.mask_margin,
            settings.body_part_weights(),
            abnormality=not settings.body_part_only,
            body_part=not settings.abnormality_only,
        ),
        draws,
        steps,
    )
    log(dist, f"loaded {len(train_set)} training and {len(holdout)} holdout images in {time.time() - t0:.0f}s")
    return data


def epoch_order(data: TrainingData, settings: TrainSettings, dist: Distributed, seed: int) -> torch.Tensor:
    """This rank's sample indices for one epoch (every rank draws the same order, then takes its shard);
    a drawn end crop brings its other end right after it."""
    gen = torch.Generator().manual_seed(seed)
    n = data.steps * settings.batch_size
    if data.weights is None:
        return torch.randperm(len(data.train_set), generator=gen)[dist.rank :: dist.world][:n]
    units = torch.multinomial(data.weights, n * dist.world, True, generator=gen)[dist.rank :: dist.world]
    sibling = data.losses.sibling[units]
    pairs = torch.stack([units, sibling], 1).flatten()
    return pairs[pairs >= 0][:n]


@torch.no_grad()
def frozen_maps(model: MuraNet, images: torch.Tensor, blocks: int, batch_size: int = 32) -> torch.Tensor:
    """(N, 2, C, H, W): the maps of the stem and the first ``blocks`` backbone blocks, for each image and its mirror.
    Those layers never train past ``freeze_blocks``, so under ``--cached-maps`` they run once per image instead of
    once per step; the mirror stands in for the augmentation the images would get. Leaves the model in eval mode."""
    backbone, config, out = model.backbone, model.config, []
    model.eval()
    for batch in images.split(batch_size):
        x = normalize(batch, config).to(next(model.parameters()).device)
        views = [backbone.blocks[:blocks](backbone.bn1(backbone.conv_stem(v))) for v in (x, x.flip(-1))]
        out.append(torch.stack(views, 1).cpu())
    return torch.cat(out)


def logits_from_maps(model: MuraNet, maps: torch.Tensor, blocks: int) -> torch.Tensor:
    """The model's output row from the maps :func:`frozen_maps` makes: the rest of the backbone, then the heads."""
    backbone = model.backbone
    return model.heads(backbone.forward_head(backbone.bn2(backbone.conv_head(backbone.blocks[blocks:](maps)))))


def holdout_row(
    model, ema, config, data: TrainingData, phase: str, epoch: int, settings: TrainSettings
) -> tuple[dict, dict, MuraNet, str]:
    """Score the epoch's weights (and their moving average) on the holdout: the history row, the
    candidate's report, and the candidate with its label. The candidate is the better of the two, or
    under ``last_epoch`` the moving average whatever the holdout says (a rule fixed before the run)."""

    def report_of(net: MuraNet) -> dict:
        return holdout_report(
            config, data.holdout, *score_images(net, config, data.holdout_images), settings.body_part_only
        )

    report = report_of(model)
    row = {
        "phase": phase,
        "epoch": epoch,
        **{f"holdout_auroc_{k}": v for k, v in report["auroc"].items()},
        "holdout_body_part_accuracy": report["body_part_accuracy"],
        "holdout_score": report["score"],
    }
    candidate, label = model, f"{phase} {epoch}"
    if ema is not None:
        ema_report = report_of(ema.module)
        row["holdout_score_ema"] = ema_report["score"]
        if settings.last_epoch or ema_report["score"] > report["score"]:
            report, candidate, label = ema_report, ema.module, f"{label} (EMA)"
    return row, report, candidate, label


def train(settings: TrainSettings) -> MuraNet:
    """Run both phases, keep the best holdout epoch, calibrate and export it (rank 0).

    Returns this rank's model as the last epoch left it (the same on every rank).
    """
    dist = Distributed()
    torch.set_num_threads(settings.threads or max(1, (os.cpu_count() or 1) // dist.world))
    torch.manual_seed(settings.seed)
    if settings.imagenet_init is None and settings.init_from is None:
        raise ValueError("no ImageNet initialisation given (--imagenet-init): refusing to train from scratch")
    config = ModelConfig(architecture=settings.architecture, input_size=settings.input_size, version=settings.version,
                         body_part_equalized_input=settings.equalized_inputs)  # fmt: skip
    model = create_model(config, imagenet_init=settings.imagenet_init)
    started_from = start_from_run(model, settings) if settings.init_from else None
    out = Path(settings.out_dir)
    if dist.main:  # only a run that can start leaves a folder behind
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(json.dumps(dataclasses.asdict(settings), indent=2))
    model.to(dist.device)
    data = load_training_data(settings, config, dist)
    t_start = time.time()
    maps = None
    if settings.cached_maps:
        if dist.world > 1:
            raise ValueError("--cached-maps trains in one process: run it without torchrun")
        maps = frozen_maps(model, data.images, settings.freeze_blocks)
        log(dist, f"made the maps of the first {settings.freeze_blocks} blocks in {time.time() - t_start:.0f}s")

    ckpt_path, meta_path, best_path = out / "checkpoint.safetensors", out / "checkpoint.json", out / "best.safetensors"
    meta = {"phase": "heads", "epoch": 0, "best_score": -1.0, "best_epoch": None, "stale": 0, "history": []}
    # an interrupted run's checkpoint, read once: the generator now, the weights when their phase starts
    saved = load_file(ckpt_path) if meta_path.exists() and ckpt_path.exists() else None
    if saved is not None:
        meta = json.loads(meta_path.read_text())
        # dropout draws from the global generator: go on from where the interrupted run left it
        saved_rng = saved.get("rng.torch")
        if saved_rng is None:
            log(dist, "the checkpoint predates saved generator states: dropout will draw differently from here on")
        else:
            torch.set_rng_state(saved_rng)
        log(dist, f"resuming from {meta['phase']} epoch {meta['epoch']}")
    if started_from:
        meta["started_from"] = started_from

    phases = [("heads", settings.head_epochs, settings.head_lr), ("finetune", settings.epochs, settings.lr)]
    steps = data.steps
    for phase_no, (phase, epochs, lr) in enumerate(phases):
        if phase_no < [p[0] for p in phases].index(meta["phase"]) or epochs == 0:
            continue
        params = set_phase(model, phase, settings.freeze_blocks)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
        ema = ModelEmaV3(model, decay=settings.ema_decay) if phase == "finetune" and settings.ema_decay else None
        total = epochs * steps
        warm = min(settings.warmup_steps, total // 4)
        start_epoch = 0
        if saved is not None and meta["phase"] == phase:
            load_model_tensors(model, saved)
            unflatten_optimizer(opt, saved, meta["optimizer"])
            if ema is not None:
                load_model_tensors(ema.module, saved, prefix="ema.")
            start_epoch = meta["epoch"]
        # linear warm-up from lr / (warm + 1), then cosine decay to 0 over the remaining steps
        sched = CosineLRScheduler(opt, t_initial=max(1, total - warm), lr_min=0.0, warmup_t=warm,
                                  warmup_lr_init=lr / (warm + 1), warmup_prefix=True, t_in_epochs=False)  # fmt: skip
        sched.step_update(start_epoch * steps)
        if saved is not None and phase == "finetune" and meta["phase"] == "heads":
            load_model_tensors(model, saved)
            if ema is not None:
                load_model_tensors(ema.module, saved)
        saved = None
        net = dist.wrap(model)
        mixed_blocks = [model.backbone.blocks[i] for i in MIX_STYLE_BLOCKS]
        for epoch in range(start_epoch, epochs):
            if phase == "finetune" and meta["stale"] >= settings.patience and not settings.last_epoch:
                log(dist, f"early stop: no holdout gain for {meta['stale']} epochs")
                break
            spent = time.time() - t_start
            if settings.time_budget is not None and meta["history"] and spent > 60 * settings.time_budget:
                log(dist, f"time budget of {settings.time_budget} min spent: stopping before {phase} {epoch + 1}")
                break
            order = epoch_order(data, settings, dist, seed=settings.seed * 1000 + epoch + 100 * phase_no)
            aug_gen = torch.Generator().manual_seed(settings.seed * 7919 + dist.rank * 131 + epoch + 100 * phase_no)
            running, t_epoch = 0.0, time.time()
            bar = tqdm(range(steps), desc=f"{phase} {epoch + 1}/{epochs}", disable=not dist.main, mininterval=5,
                       file=sys.stdout)  # fmt: skip
            for step in bar:
                index = order[step * settings.batch_size : (step + 1) * settings.batch_size]
                if maps is None:
                    x = augment(data.images[index], aug_gen)
                    x = randomize_style(x, aug_gen, settings.style, settings.rank_share, settings.amplitude_share)
                    if config.body_part_equalized_input:
                        x = equalize(x)
                    with mixing_feature_styles(mixed_blocks, aug_gen, settings.mix_styles):
                        logits = net(normalize(x, config).to(dist.device))
                else:  # the image or its mirror, drawn per image
                    mirrored = torch.randint(0, 2, (len(index),), generator=aug_gen)
                    logits = logits_from_maps(model, maps[index, mirrored].to(dist.device), settings.freeze_blocks)
                loss = data.losses(logits, index)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step_update(epoch * steps + step + 1)
                if ema is not None:
                    ema.update(model)
                running += loss.item()
                bar.set_postfix(loss=f"{running / (step + 1):.3f}", refresh=False)
            row, report, candidate, label = holdout_row(model, ema, config, data, phase, epoch + 1, settings)
            row |= {"train_loss": running / steps, "seconds": time.time() - t_epoch}
            meta["history"].append(row)
            improved = settings.last_epoch or report["score"] > meta["best_score"]
            if improved:
                meta.update(best_score=report["score"], best_epoch=label, stale=0)
            elif phase == "finetune":
                meta["stale"] += 1
            meta.update(phase=phase, epoch=epoch + 1)
            set_phase(model, phase, settings.freeze_blocks)
            if dist.main:
                if improved:
                    save_file(model_tensors(candidate), best_path)
                opt_tensors, opt_meta = flatten_optimizer(opt)
                ema_tensors = model_tensors(ema.module, prefix="ema.") if ema is not None else {}
                rng = {"rng.torch": torch.get_rng_state()}
                save_file({**model_tensors(model), **opt_tensors, **ema_tensors, **rng}, ckpt_path)
                meta_path.write_text(json.dumps({**meta, "optimizer": opt_meta}, indent=1))
                log(dist, json.dumps(row))
    if dist.main:
        finalize(settings, copy.deepcopy(model), best_path, data.holdout, data.holdout_images, data.losses, meta)
        plot_curves(meta["history"], out / "curves.png")
    dist.close()
    return model


def start_from_run(model: MuraNet, settings: TrainSettings) -> dict:
    """Load the weights of the trained network in ``settings.init_from`` into ``model`` (strictly): a run that goes on
    from what another learnt. Its architecture and withheld part must be this run's, so that a leave-one-source-out
    twin never starts from a network that saw the withheld images; the input size may differ (the network is
    convolutional, and a larger input is a lever for small joint details). Returns the start's record (folder,
    version, training), which travels on in the new network's config."""
    net, cfg = load_folder(settings.init_from)
    if cfg.separate_body_part_network:
        raise ValueError(f"{settings.init_from} is a pair: start from one of its networks")
    if cfg.architecture != settings.architecture:
        raise ValueError(f"{settings.init_from} is {cfg.architecture}: this run trains {settings.architecture}")
    if cfg.training.get("settings", {}).get("withhold") != settings.withhold:
        raise ValueError(f"{settings.init_from} was not trained with the same part withheld (--withhold) as this run")
    model.load_state_dict(net.state_dict(), strict=True)
    return {"folder": settings.init_from, "version": cfg.version, "training": cfg.training}


def normalized_shares(shares: list[float] | None, n: int) -> list[float]:
    """Each of ``n`` runs' weight in an average, summing to one: equal when ``shares`` is None."""
    w = [1.0] * n if shares is None else [float(x) for x in shares]
    if len(w) != n or min(w) < 0 or sum(w) <= 0:
        raise ValueError("one non-negative share per run, not all zero")
    return [x / sum(w) for x in w]


def mean_state(states: list[dict[str, torch.Tensor]], shares: list[float] | None = None) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts of one architecture, weighted by ``shares`` (see
    ``normalized_shares``); integer buffers are taken from the first."""
    w = torch.tensor(normalized_shares(shares, len(states)), dtype=torch.float32)
    return {k: torch.einsum("n...,n->...", torch.stack([s[k].float() for s in states]), w) if v.is_floating_point()
            else v for k, v in states[0].items()}  # fmt: skip


AVERAGED_READING = ("architecture", "input_size", "body_part_equalized_input")  # what averaged runs must share


def averaged_state(loaded: list[tuple[torch.nn.Module, ModelConfig]], shares: list[float] | None = None) -> dict:
    """The mean of the loaded runs' weights (see ``mean_state``), once they are known to be runs an average can
    join: single networks that read the image alike, withheld the same part and trained for the same elbow fold."""
    first = loaded[0][1]
    withheld = {c.training.get("settings", {}).get("withhold") for _, c in loaded}
    folds = {c.training.get("settings", {}).get("elbow_fold") for _, c in loaded}
    if any(c.separate_body_part_network for _, c in loaded):
        raise ValueError("only single networks can be averaged: average the body-part networks, then pair them")
    if len(withheld) > 1 or any(getattr(c, k) != getattr(first, k) for _, c in loaded for k in AVERAGED_READING):
        raise ValueError(
            "only runs of one architecture, input size and withheld part, all with or all without equalised inputs, "
            "can be averaged"
        )
    if len(folds) > 1:  # a run of another fold trained on this fold's elbows: the average could not read them fresh
        raise ValueError(f"only runs of one elbow fold can be averaged (these have {sorted(folds, key=str)})")
    return mean_state([m.state_dict() for m, _ in loaded], shares)


def average_runs(folders: list[str], settings: TrainSettings, shares: list[float] | None = None) -> ModelConfig:
    """One network from the average of the weights of runs fine-tuned from the same ImageNet start (uniform, or
    weighted by ``shares``): a weight-space ensemble that keeps some of what each run learnt for the cost of one
    network. It is finalized on the holdout like a training run (flip, body-part input size and thresholds chosen
    again), with the runs' own settings and shares on record; ``settings`` gives what the command names
    (``JOINING_SETTINGS``), the first run the rest. The runs must agree on architecture, input size, withheld part
    and elbow fold.
    """
    shares = normalized_shares(shares, len(folders))
    loaded = [load_folder(folder) for folder in folders]
    first = loaded[0][1]
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    base = TrainSettings(**{k: v for k, v in first.training.get("settings", {}).items() if k in known})
    settings = dataclasses.replace(base, **{name: getattr(settings, name) for name in JOINING_SETTINGS})
    config = ModelConfig(**{k: getattr(first, k) for k in AVERAGED_READING}, version=settings.version)
    model = create_model(config)
    model.load_state_dict(averaged_state(loaded, shares))
    runs = [
        {"folder": str(f), "version": c.version, "best_epoch": c.training.get("best_epoch"), "share": w,
         "seconds": c.training.get("seconds", 0.0), "settings": c.training.get("settings", {})}
        for f, (_, c), w in zip(folders, loaded, shares)
    ]  # fmt: skip
    meta = {"best_epoch": f"the average of {len(runs)} runs", "history": [], "averaged": runs}
    return finalize_on_holdout(settings, model, meta)


def pair_networks(body_part_folder: str, abnormality_folder: str, settings: TrainSettings) -> ModelConfig:
    """One model from two trained networks: the body part read by the first, the abnormality by the second (a
    :class:`BodyPartPair`). Stored as int8 to keep both networks within the weights budget, it is rounded to
    int8 first and then finalized on the holdout like a run (flip, body-part input size and view, thresholds), so
    that every choice is made on the numbers that ship. ``settings`` gives the data root, folders, version and view
    choice.
    """
    (body_net, body_cfg), (abnormal_net, abnormal_cfg) = load_folder(body_part_folder), load_folder(abnormality_folder)
    shared = ("architecture", "mean", "std", "body_parts")
    if body_cfg.separate_body_part_network or abnormal_cfg.separate_body_part_network:
        raise ValueError("pair two single networks, not a pair")
    if not abnormal_cfg.reads_abnormality:
        raise ValueError(f"{abnormality_folder} was trained for the body part alone: it cannot read the abnormality")
    if not body_cfg.reads_body_part:
        raise ValueError(f"{body_part_folder} was trained for the abnormality alone: it cannot read the body part")
    if any(getattr(body_cfg, k) != getattr(abnormal_cfg, k) for k in shared):
        raise ValueError(f"the two networks must agree on {', '.join(shared)}")
    if any(c.training.get("settings", {}).get("withhold") for c in (body_cfg, abnormal_cfg)):
        raise ValueError("a network trained with a source withheld is a leave-one-source-out twin: not for serving")
    if any(c.training.get("settings", {}).get("elbow_fold") for c in (body_cfg, abnormal_cfg)):
        # its fold's elbows are all it has not seen, and a pair is finalized on the usual holdout's
        raise ValueError("a network trained for an elbow fold is read out of fold (benchmarks.elbow_folds), not paired")
    # Each network reads the image letterboxed at the size it was trained at; the maps, the abnormality network's.
    own_size = body_cfg.input_size if body_cfg.input_size != abnormal_cfg.input_size else None
    config = ModelConfig(**{k: getattr(body_cfg, k) for k in shared}, version=settings.version,
                         input_size=abnormal_cfg.input_size, body_part_letterbox_size=own_size,
                         body_part_equalized_input=body_cfg.body_part_equalized_input,
                         separate_body_part_network=True,
                         cam_layer=f"abnormality.{abnormal_cfg.cam_layer}")  # fmt: skip
    model = create_model(config)
    model.body_part.load_state_dict(body_net.state_dict())
    model.abnormality.load_state_dict(abnormal_net.state_dict())
    round_as_stored(model, int8=True)
    paired = {
        role: {"folder": str(folder), "version": c.version, "training": c.training}
        for role, folder, c in (("body_part", body_part_folder, body_cfg), ("abnormality", abnormality_folder,
                                                                           abnormal_cfg))
    }  # fmt: skip
    meta = {"best_epoch": "each network's own", "history": [], "paired": paired}
    return finalize_on_holdout(settings, model, meta)


# What an evaluation measured and decided for a pair, which its networks alone have not earned.
UNMEASURED = {"metrics": {}, "body_part_min_probability": 0.0, "body_part_confirmation": False,
              "body_part_confirmation_reason": ""}  # fmt: skip


def split_pair(folder: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """A pair's two networks as single-network folders, ``out_dir/body_part`` and ``out_dir/abnormality``, each with
    its own version and training record (and which pair it came from) and none of the pair's measured figures: a run
    can start from one (``--init-from``) and ``pair`` can take one as it is. Each is stored as the pair stores it
    (int8 with its scales): the numbers are the pair's."""
    model, config = load_folder(folder)
    if not config.separate_body_part_network:
        raise ValueError(f"{folder} holds one network, not a pair: use it as it is")
    out = []
    for role, size in (("body_part", config.body_part_image_size), ("abnormality", config.input_size)):
        record = config.training["paired"][role]
        training = record["training"] | {"split_from": {"folder": str(folder), "version": config.version}}
        alone = {"separate_body_part_network": False, "cam_layer": "backbone.bn2", "version": record["version"],
                 "input_size": size, "body_part_letterbox_size": None, "training": training, **UNMEASURED}  # fmt: skip
        out.append(Path(out_dir) / role)
        save_weights(getattr(model, role), ModelConfig.from_dict(config.to_dict() | alone), out[-1], int8=True)
    return out[0], out[1]


def finalize_on_holdout(settings: TrainSettings, model: torch.nn.Module, meta: dict) -> ModelConfig:
    """Finalize a model made of trained weights (an average, a pair) on the holdout of ``settings.data_root`` (an
    average of one elbow fold's runs on that fold's, as they were)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(model_tensors(model), out / "best.safetensors")
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # scoring follows the model's device
    splits = run_splits(settings)
    holdout = withhold(splits["holdout"], settings.withhold)
    losses = Losses(model.config, withhold(splits["train"], settings.withhold))
    images = load_images(holdout, model.config.input_size)
    return finalize(settings, model, out / "best.safetensors", holdout, images, losses, meta)


@torch.no_grad()
def borrow_transfer_guess(head: torch.nn.Linear, body_parts: tuple[str, ...], trained: list[str]) -> None:
    """Each part without abnormality labels borrows the mean of the trained parts' rows of ``head``: a transfer
    guess, flagged "not validated" everywhere it is shown."""
    rows = [body_parts.index(p) for p in trained]
    for i, part in enumerate(body_parts):
        if part not in trained and rows:
            head.weight[i] = head.weight[rows].mean(0)
            head.bias[i] = head.bias[rows].mean()


def finalize(settings, model, best_path, holdout, holdout_images, losses, meta) -> ModelConfig:
    """Load the best epoch; on the holdout, decide on test-time flips, the body part's view (not for a network
    trained for the abnormality alone, whose body-part head never learnt), with ``--other-shift`` the shift of its
    *other* logit, and per-part thresholds; export."""
    config = model.config
    load_model_tensors(model, load_file(best_path))
    own_images = body_part_images(holdout, config)
    scores = {}
    for flip in (False, True):
        config.test_time_flip = flip
        probs = score_images(model, config, holdout_images, own_images)
        scores[flip] = (holdout_report(config, holdout, *probs, settings.body_part_only)["score"], probs)
    config.test_time_flip = scores[True][0] > scores[False][0]
    bp_prob, ab_prob = scores[config.test_time_flip][1]
    body_part = {}
    if not settings.abnormality_only:  # its body-part head never learnt: no view to choose
        letterboxed = holdout_images if own_images is None else own_images
        body_part = choose_body_part_view(model, holdout, letterboxed, bp_prob, ab_prob, settings.view_choice)
        chosen_prob = body_part.pop("bp_prob")
        if settings.other_shift:
            served, body_part["training"]["other_shift"] = shift_other_logit(
                model, holdout, chosen_prob, settings.view_choice
            )
            body_part["metrics"] = {k: v for k, v in body_part_summary(config, holdout, served).items()
                                    if k in METRIC_KEYS}  # fmt: skip
    # Every part's cut is 0.5, not one fitted here: the losses balance the classes, and fitted cuts held up worse
    # on unseen patients (benchmarks/threshold_rules.py, session 46). How a fitted cut would have fared against 0.5
    # on the holdout's patient halves is kept for the card.
    config.thresholds = {part: 0.5 for part in config.body_parts}
    holdout_metrics, threshold_rules = {}, {}
    for part, (studies, y, p) in part_study_scores(config, holdout, ab_prob).items():
        if part not in losses.parts_with_labels or settings.body_part_only:  # an untrained head: no holdout figures
            continue
        kappas = mean_held_out_kappas(y, p, patients_of(holdout, studies))
        threshold_rules[part] = {"rule": "fixed_0.5", "held_out_kappa": kappas}
        holdout_metrics[part] = binary_metrics(y, p, config.thresholds[part])
    # No part is validated here: `evaluate --card` marks the parts whose held-out figures earn it.
    borrow_transfer_guess(model.abnormality_head, config.body_parts, list(holdout_metrics))
    config.trained = True
    config.metrics = {"holdout": {"study_level": holdout_metrics} | body_part.get("metrics", {})}
    config.training = {
        "settings": dataclasses.asdict(settings),
        "best_epoch": meta["best_epoch"],
        "holdout_score_without_flip": scores[False][0],
        "holdout_score_with_flip": scores[True][0],
        **body_part.get("training", {}),
        "threshold_rules": threshold_rules,
        "epochs_run": len(meta["history"]),
        "seconds": float(sum(r["seconds"] for r in meta["history"])),
    }
    for key in ("averaged", "paired", "started_from"):
        if key in meta:
            config.training[key] = meta[key]
    if settings.export_dir:
        save_weights(model, config, settings.export_dir, int8=config.separate_body_part_network)
        print(f"exported to {settings.export_dir}")
    return config


def choose_body_part_view(model, holdout, holdout_images, bp_prob, ab_prob, view_choice: str) -> dict:
    """On the holdout (``holdout_images`` letterboxed for the body part), choose the body part's input size and whether
    its equalised view joins in (set on ``model.config``, by :func:`body_part_merit`; not for a network that reads the
    equalised view alone); return the chosen view's holdout probabilities and figures and what each choice scored."""
    config = model.config
    bp_probs = {config.body_part_image_size: bp_prob}
    for size in (s for s in BODY_PART_SIZES if s < config.body_part_image_size):
        config.body_part_input_size = size
        bp_probs[size] = score_body_parts(model, config, holdout_images)
    reports = {size: holdout_report(config, holdout, p, ab_prob) for size, p in bp_probs.items()}
    merit = {size: body_part_merit(r, view_choice) for size, r in reports.items()}
    config.body_part_input_size = max(merit, key=merit.get)  # ties keep the larger size
    chosen = reports[config.body_part_input_size]
    chosen_prob = bp_probs[config.body_part_input_size]
    training = {
        "holdout_body_part_accuracy_by_size": {size: r["body_part_accuracy"] for size, r in reports.items()},
        "holdout_body_part_images_right_by_size": {size: r["body_part_images_right"] for size, r in reports.items()},
    }
    if config.body_part_equalized_input:  # it reads the equalised view alone already
        return {"bp_prob": chosen_prob, "metrics": {k: chosen[k] for k in METRIC_KEYS}, "training": training}
    config.body_part_equalized_view = True
    equalized_prob = score_body_parts(model, config, holdout_images)
    equalized = holdout_report(config, holdout, equalized_prob, ab_prob)
    config.body_part_equalized_view = body_part_merit(equalized, view_choice) > body_part_merit(chosen, view_choice)
    if config.body_part_equalized_view:
        chosen, chosen_prob = equalized, equalized_prob
    training |= {
        "holdout_body_part_accuracy_with_equalized_view": equalized["body_part_accuracy"],
        "holdout_body_part_images_right_with_equalized_view": equalized["body_part_images_right"],
    }
    return {"bp_prob": chosen_prob, "metrics": {k: chosen[k] for k in METRIC_KEYS}, "training": training}


def plot_curves(history: list[dict], path: Path) -> None:
    """Training loss and holdout metrics per epoch, as a PNG (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    x = range(1, len(history) + 1)
    labels = [f"{r['phase'][0]}{r['epoch']}" for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(x, [r["train_loss"] for r in history], marker="o")
    a.set(title="training loss", xlabel="epoch")
    for key in sorted({k for r in history for k in r if k.startswith("holdout_")} - {"holdout_score"}):
        b.plot(x, [r.get(key, float("nan")) for r in history], marker="o", label=key.removeprefix("holdout_"))
    b.set(title="holdout (patient-level split of MURA train)", xlabel="epoch")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.set_xticks(list(x), labels)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log(dist: Distributed, message: str) -> None:
    if dist.main:
        print(message, flush=True)
