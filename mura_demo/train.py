"""Training: two-phase fine-tuning of the body-part-aware model, plain PyTorch, DDP-ready.

Phase "heads" trains the two linear heads on frozen ImageNet features; phase "finetune"
unfreezes the backbone (past its first blocks, with batch-norm statistics frozen) under a
warm-up + cosine schedule, keeping an exponential moving average (EMA) of the weights beside
them. After every epoch both are scored on a patient-level holdout of MURA ``train``; the best
by study-level AUROC is kept. On that holdout the run then decides whether test-time flips help
and from which input size the body part is read best, chooses per-part thresholds (by a rule
cross-validated over its patients), and exports a weights folder. MURA ``valid`` is never read here.

The same command runs under ``torchrun`` (DistributedDataParallel: NCCL on GPUs, gloo on CPUs):
each rank trains on its shard of every epoch; rank 0 alone writes checkpoints and logs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .augment import augment
from .config import OTHER, ModelConfig
from .data import Sample, abnormality_rows, body_part_targets, load_images, load_splits, patients_of
from .export import export_weights
from .inference import score_images
from .metrics import auroc, binary_metrics, cross_validated_threshold, study_scores
from .model import MuraNet, create_model, split_logits
from .preprocess import normalize

BODY_PART_SIZES = (224, 192, 160)  # coarser views the holdout may choose to read the body part from


@dataclasses.dataclass
class TrainSettings:
    """Everything a training run depends on; saved beside its checkpoints and in config.json."""

    data_root: str = "../shared/data"
    out_dir: str = "runs/train"
    export_dir: str | None = "weights"
    imagenet_init: str | None = None
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
    limit: int | None = None  # smoke runs: at most this many train and holdout images
    max_steps: int | None = None  # smoke runs: at most this many steps per epoch
    threads: int | None = None


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
    """Body-part cross-entropy (class-balanced, soft targets) plus per-part abnormality BCE."""

    def __init__(self, config: ModelConfig, samples: list[Sample]):
        self.config = config
        self.targets = body_part_targets(samples, config.body_part_classes)
        counts = self.targets.sum(0).clamp_min(1)
        self.class_weight = (counts.sum() / counts).sqrt()
        self.class_weight /= (self.class_weight * counts).sum() / counts.sum()
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
        bp_logits, ab_logits = split_logits(self.config, logits)
        target = self.targets[index].to(logits.device)
        weight = self.class_weight.to(logits.device)
        bp_loss = -(target * weight * F.log_softmax(bp_logits, 1)).sum(1).mean()
        part = self.part[index].to(logits.device)
        has = part >= 0
        if not has.any():
            return bp_loss + 0.0 * ab_logits.sum()
        chosen = ab_logits[has].gather(1, part[has, None])[:, 0]
        y = self.abnormal[index].to(logits.device)[has]
        pw = self.pos_weight.to(logits.device)[part[has]]
        ab_loss = F.binary_cross_entropy_with_logits(chosen, y, pos_weight=pw)
        return bp_loss + ab_loss


def part_study_scores(config: ModelConfig, samples: list[Sample], ab_prob: torch.Tensor) -> dict:
    """Per body part with abnormality labels: study-level (studies, labels, mean probabilities) of its logit."""
    out = {}
    for part, idx in abnormality_rows(samples, config.body_parts).items():
        col = config.body_parts.index(part)
        studies, labels = [samples[i].study for i in idx], [samples[i].abnormal for i in idx]
        out[part] = study_scores(studies, labels, ab_prob[idx, col])
    return out


def holdout_report(config: ModelConfig, samples: list[Sample], bp_prob: torch.Tensor, ab_prob: torch.Tensor) -> dict:
    """Study-level AUROC per part with labels, and body-part accuracy, on the holdout."""
    report: dict = {
        "auroc": {part: auroc(y, p) for part, (_, y, p) in part_study_scores(config, samples, ab_prob).items()}
    }
    predicted = [config.body_part_classes[i] for i in bp_prob.argmax(1).tolist()]
    report["body_part_accuracy"] = float(np.mean([p in s.body_parts for p, s in zip(predicted, samples)]))
    report["score"] = float(np.mean(list(report["auroc"].values()))) if report["auroc"] else 0.0
    return report


def warmup_cosine(warm: int, total: int):
    """Learning-rate factor per step: linear warm-up over ``warm`` steps, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return factor


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


def train(settings: TrainSettings) -> MuraNet:
    """Run both phases, keep the best holdout epoch, calibrate and export it (rank 0).

    Returns this rank's model as the last epoch left it (the same on every rank).
    """
    dist = Distributed()
    torch.set_num_threads(settings.threads or max(1, (os.cpu_count() or 1) // dist.world))
    torch.manual_seed(settings.seed)
    out = Path(settings.out_dir)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(json.dumps(dataclasses.asdict(settings), indent=2))

    if settings.imagenet_init is None:
        raise ValueError("no ImageNet initialisation given (--imagenet-init): refusing to train from scratch")
    config = ModelConfig(architecture=settings.architecture, input_size=settings.input_size, version=settings.version)
    model = create_model(config, imagenet_init=settings.imagenet_init).to(dist.device)

    splits = load_splits(settings.data_root)
    train_set = subsample(splits["train"], settings.limit)
    holdout = subsample(splits["holdout"], settings.limit)
    t0 = time.time()
    images = load_images(train_set, config.input_size)
    holdout_images = load_images(holdout, config.input_size)
    losses = Losses(config, train_set)
    log(dist, f"loaded {len(train_set)} training and {len(holdout)} holdout images in {time.time() - t0:.0f}s")

    ckpt_path, meta_path, best_path = out / "checkpoint.safetensors", out / "checkpoint.json", out / "best.safetensors"
    meta = {"phase": "heads", "epoch": 0, "best_score": -1.0, "best_epoch": None, "stale": 0, "history": []}
    resume = meta_path.exists() and ckpt_path.exists()
    if resume:
        meta = json.loads(meta_path.read_text())
        log(dist, f"resuming from {meta['phase']} epoch {meta['epoch']}")

    phases = [("heads", settings.head_epochs, settings.head_lr), ("finetune", settings.epochs, settings.lr)]
    per_rank = len(train_set) // dist.world
    steps = max(1, per_rank // settings.batch_size)
    if settings.max_steps:
        steps = min(steps, settings.max_steps)
    for phase_no, (phase, epochs, lr) in enumerate(phases):
        if phase_no < [p[0] for p in phases].index(meta["phase"]) or epochs == 0:
            continue
        params = set_phase(model, phase, settings.freeze_blocks)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
        ema = ModelEmaV3(model, decay=settings.ema_decay) if phase == "finetune" and settings.ema_decay else None
        total = epochs * steps
        warm = min(settings.warmup_steps, total // 4)
        start_epoch = 0
        if resume and meta["phase"] == phase:
            tensors = load_file(ckpt_path)
            load_model_tensors(model, tensors)
            unflatten_optimizer(opt, tensors, meta["optimizer"])
            if ema is not None:
                load_model_tensors(ema.module, tensors, prefix="ema.")
            start_epoch = meta["epoch"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warm, total), last_epoch=start_epoch * steps - 1)
        if resume and phase == "finetune" and meta["phase"] == "heads":
            tensors = load_file(ckpt_path)
            load_model_tensors(model, tensors)
            if ema is not None:
                load_model_tensors(ema.module, tensors)
        resume = False
        net = dist.wrap(model)
        for epoch in range(start_epoch, epochs):
            if phase == "finetune" and meta["stale"] >= settings.patience:
                log(dist, f"early stop: no holdout gain for {meta['stale']} epochs")
                break
            gen = torch.Generator().manual_seed(settings.seed * 1000 + epoch + 100 * phase_no)
            order = torch.randperm(len(train_set), generator=gen)[dist.rank :: dist.world][
                : steps * settings.batch_size
            ]
            aug_gen = torch.Generator().manual_seed(settings.seed * 7919 + dist.rank * 131 + epoch + 100 * phase_no)
            running, t_epoch = 0.0, time.time()
            bar = tqdm(
                range(steps),
                desc=f"{phase} {epoch + 1}/{epochs}",
                disable=not dist.main,
                mininterval=5,
                file=sys.stdout,
            )
            for step in bar:
                index = order[step * settings.batch_size : (step + 1) * settings.batch_size]
                x = augment(images[index], aug_gen)
                logits = net(normalize(x, config).to(dist.device))
                loss = losses(logits, index)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if ema is not None:
                    ema.update(model)
                running += loss.item()
                bar.set_postfix(loss=f"{running / (step + 1):.3f}", refresh=False)
            report = holdout_report(config, holdout, *score_images(model, config, holdout_images))
            row = {
                "phase": phase,
                "epoch": epoch + 1,
                "train_loss": running / steps,
                "seconds": time.time() - t_epoch,
                **{f"holdout_auroc_{k}": v for k, v in report["auroc"].items()},
                "holdout_body_part_accuracy": report["body_part_accuracy"],
                "holdout_score": report["score"],
            }
            candidate, label = model, f"{phase} {epoch + 1}"
            if ema is not None:
                ema_report = holdout_report(config, holdout, *score_images(ema.module, config, holdout_images))
                row["holdout_score_ema"] = ema_report["score"]
                if ema_report["score"] > report["score"]:
                    report, candidate, label = ema_report, ema.module, f"{label} (EMA)"
            meta["history"].append(row)
            improved = report["score"] > meta["best_score"]
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
                save_file({**model_tensors(model), **opt_tensors, **ema_tensors}, ckpt_path)
                meta_path.write_text(json.dumps({**meta, "optimizer": opt_meta}, indent=1))
                log(dist, json.dumps(row))
    if dist.main:
        finalize(settings, copy.deepcopy(model), best_path, holdout, holdout_images, losses, meta)
        plot_curves(meta["history"], out / "curves.png")
    dist.close()
    return model


def finalize(settings, model, best_path, holdout, holdout_images, losses, meta) -> ModelConfig:
    """Load the best epoch; on the holdout, decide on test-time flips and the body part's input
    size, and choose per-part thresholds; export the weights folder."""
    config = model.config
    load_model_tensors(model, load_file(best_path))
    scores = {}
    for flip in (False, True):
        config.test_time_flip = flip
        probs = score_images(model, config, holdout_images)
        scores[flip] = (holdout_report(config, holdout, *probs)["score"], probs)
    config.test_time_flip = scores[True][0] > scores[False][0]
    bp_prob, ab_prob = scores[config.test_time_flip][1]
    bp_probs = {config.input_size: bp_prob}
    for size in (s for s in BODY_PART_SIZES if s < config.input_size):
        config.body_part_input_size = size
        bp_probs[size] = score_images(model, config, holdout_images)[0]
    part_accuracy = {s: holdout_report(config, holdout, p, ab_prob)["body_part_accuracy"] for s, p in bp_probs.items()}
    config.body_part_input_size = max(part_accuracy, key=part_accuracy.get)  # ties keep the larger size
    bp_prob = bp_probs[config.body_part_input_size]
    holdout_metrics, threshold_rules = {}, {}
    for part, (studies, y, p) in part_study_scores(config, holdout, ab_prob).items():
        if part not in losses.parts_with_labels:
            continue
        config.thresholds[part], threshold_rules[part] = cross_validated_threshold(y, p, patients_of(holdout, studies))
        config.validated[part] = True
        holdout_metrics[part] = binary_metrics(y, p, config.thresholds[part])
    validated = [p for p in config.body_parts if config.validated[p]]
    with torch.no_grad():
        head = model.abnormality_head
        rows = [config.body_parts.index(p) for p in validated]
        for part in config.body_parts:
            if not config.validated[part] and rows:
                # No abnormality labels for this part: it borrows the mean of the trained parts'
                # weights (a transfer guess, flagged "not validated" everywhere it is shown).
                i = config.body_parts.index(part)
                head.weight[i] = head.weight[rows].mean(0)
                head.bias[i] = head.bias[rows].mean()
                config.thresholds[part] = float(np.mean([config.thresholds[p] for p in validated]))
    other_idx = [i for i, s in enumerate(holdout) if s.body_parts == (OTHER,)]
    config.trained = True
    config.metrics = {
        "holdout": {
            "study_level": holdout_metrics,
            "body_part_accuracy": holdout_report(config, holdout, bp_prob, ab_prob)["body_part_accuracy"],
            "other_recall": float((bp_prob[other_idx].argmax(1) == len(config.body_parts)).float().mean())
            if other_idx
            else None,
        }
    }
    config.training = {
        "settings": dataclasses.asdict(settings),
        "best_epoch": meta["best_epoch"],
        "holdout_score_without_flip": scores[False][0],
        "holdout_score_with_flip": scores[True][0],
        "holdout_body_part_accuracy_by_size": part_accuracy,
        "threshold_rules": threshold_rules,
        "epochs_run": len(meta["history"]),
        "seconds": float(sum(r["seconds"] for r in meta["history"])),
    }
    if settings.export_dir:
        export_weights(model, config, settings.export_dir)
        print(f"exported to {settings.export_dir}")
    return config


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
