"""Evaluation on held-out data: MURA ``valid`` and the UNIFESP test share.

Image- and study-level abnormality metrics per body part and overall (with 95% bootstrap
intervals that resample studies), body-part accuracy and confusion matrix, the share of
non-upper-extremity radiographs answered "other", and beside it all a frozen-ImageNet-feature
logistic-regression baseline fitted on the training split, so every gain is visible.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from .config import OTHER, ModelConfig
from .data import Sample, abnormality_rows, load_images, load_splits, patients_of
from .inference import score_images
from .metrics import auroc, bootstrap_ci, cohen_kappa, cross_validated_threshold, roc_curve, study_scores
from .model import create_model
from .preprocess import normalize
from .weights import load_model


@dataclasses.dataclass
class EvalSettings:
    data_root: str = "../shared/data"
    weights: str = "weights"
    out_dir: str = "runs/eval"
    imagenet_init: str | None = None  # for the baseline; skipped when absent
    n_boot: int = 1000
    threads: int | None = None


def abnormality_report(config: ModelConfig, samples: list[Sample], probs: np.ndarray, thresholds: dict, n_boot: int):
    """Metrics per part and overall, at image and study level. ``probs`` is (N, parts)."""
    report, curves = {}, {}
    pooled = {"image": ([], [], []), "study": ([], [], [])}  # labels, predictions, probabilities
    for part, idx in abnormality_rows(samples, config.body_parts).items():
        col = config.body_parts.index(part)
        y = np.array([samples[i].abnormal for i in idx])
        p = probs[idx, col]
        studies = [samples[i].study for i in idx]
        t = thresholds[part]
        _, sy, sp = study_scores(studies, y, p)
        report[part] = {
            "images": len(idx),
            "studies": len(sy),
            "threshold": t,
            "image_level": bootstrap_ci(y, p, t, groups=studies, n_boot=n_boot),
            "study_level": bootstrap_ci(sy, sp, t, n_boot=n_boot),
        }
        curves[part] = roc_curve(sy, sp)
        for level, (ly, lp) in (("image", (y, p)), ("study", (sy, sp))):
            pooled[level][0].extend(ly)
            pooled[level][1].extend((np.asarray(lp) >= t).astype(int))
            pooled[level][2].extend(lp)
    if report:
        overall = {}
        for level, (ly, lpred, lp) in pooled.items():
            ly, lpred, lp = map(np.asarray, (ly, lpred, lp))
            # Each part has its own threshold: score the pooled decisions, rank by probability.
            ci = bootstrap_ci(ly, lpred.astype(float), 0.5, n_boot=n_boot)
            ci["auroc"] = bootstrap_ci(ly, lp, 0.5, n_boot=n_boot)["auroc"]
            overall[f"{level}_level"] = ci
        report["overall"] = overall
    return report, curves


def body_part_report(config: ModelConfig, samples: list[Sample], bp_probs: np.ndarray) -> dict:
    classes = config.body_part_classes
    predicted = bp_probs.argmax(1)
    ue = [i for i, s in enumerate(samples) if s.body_parts != (OTHER,)]
    other = [i for i, s in enumerate(samples) if s.body_parts == (OTHER,)]
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    for i, s in enumerate(samples):
        confusion[classes.index(s.body_parts[0]), predicted[i]] += 1
    correct = [classes[predicted[i]] in samples[i].body_parts for i in ue]
    return {
        "classes": list(classes),
        "upper_extremity_images": len(ue),
        "accuracy_upper_extremity": float(np.mean(correct)) if ue else None,
        "other_images": len(other),
        "other_recall": float(np.mean([predicted[i] == len(classes) - 1 for i in other])) if other else None,
        "confusion_matrix": confusion.tolist(),
        "kappa": cohen_kappa([classes.index(samples[i].body_parts[0]) for i in range(len(samples))], predicted),
    }


@torch.inference_mode()
def backbone_features(model, config: ModelConfig, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat(
        [model.backbone(normalize(images[i : i + batch_size], config)) for i in range(0, len(images), batch_size)]
    )


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression by L-BFGS on standardised features; returns (w, b)."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def part_xy(feats: torch.Tensor, samples: list[Sample], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return feats[rows], torch.tensor([float(samples[i].abnormal) for i in rows])


def study_probabilities(feats, samples, rows, w, b):
    """Study-level labels and mean probabilities of a fitted logistic regression."""
    x, y = part_xy(feats, samples, rows)
    return study_scores([samples[i].study for i in rows], y.numpy(), torch.sigmoid(x @ w + b).numpy())


def baseline_report(settings: EvalSettings, splits: dict, config: ModelConfig, n_boot: int) -> dict:
    """Frozen ImageNet features + per-part logistic regression (L2 and threshold chosen on the holdout)."""
    base_cfg = ModelConfig(architecture=config.architecture, input_size=config.input_size)
    model = create_model(base_cfg, imagenet_init=settings.imagenet_init)
    feats, meta = {}, {}
    for split in ("train", "holdout", "test"):
        chosen = [s for s in splits[split] if s.abnormal is not None]
        feats[split] = backbone_features(model, base_cfg, load_images(chosen, base_cfg.input_size))
        meta[split] = chosen
    mu, sd = feats["train"].mean(0), feats["train"].std(0) + 1e-6
    feats = {k: (v - mu) / sd for k, v in feats.items()}
    report = {"description": f"frozen ImageNet {config.architecture} features + logistic regression"}
    rows_by_split = {k: abnormality_rows(v, config.body_parts) for k, v in meta.items()}
    for part in config.body_parts:
        rows = {k: r.get(part) for k, r in rows_by_split.items()}
        if not all(rows.values()):
            continue
        best = None
        for l2 in (1e-3, 1e-2, 1e-1, 1.0):
            w, b = fit_logistic(*part_xy(feats["train"], meta["train"], rows["train"]), l2)
            studies, hy, hp = study_probabilities(feats["holdout"], meta["holdout"], rows["holdout"], w, b)
            score = auroc(hy, hp)
            if best is None or score > best[0]:
                best = (score, l2, w, b, studies, hy, hp)
        _, l2, w, b, studies, hy, hp = best
        t, _ = cross_validated_threshold(hy, hp, patients_of(meta["holdout"], studies))  # the model's rule
        _, ty, tp = study_probabilities(feats["test"], meta["test"], rows["test"], w, b)
        report[part] = {"l2": l2, "threshold": t, "study_level": bootstrap_ci(ty, tp, t, n_boot=n_boot)}
    return report


def plot_report(curves: dict, body: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for part, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, label=part)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="Study-level ROC, MURA valid")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "roc_study_level.png", dpi=100)
    plt.close(fig)
    m = np.array(body["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(np.log1p(m), cmap="Blues")
    ax.set_xticks(range(len(body["classes"])), body["classes"], rotation=45)
    ax.set_yticks(range(len(body["classes"])), body["classes"])
    for (r, c), v in np.ndenumerate(m):
        if v:
            ax.text(c, r, str(v), ha="center", va="center", fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title="Body part, held-out images")
    fig.tight_layout()
    fig.savefig(out / "body_part_confusion.png", dpi=100)
    plt.close(fig)


def evaluate(settings: EvalSettings) -> dict:
    """Score the weights on the held-out test data; write report.json and plots to out_dir."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    t0 = time.time()
    loaded = load_model(settings.weights)
    config = loaded.config
    splits = load_splits(settings.data_root)
    test = splits["test"]
    bp, ab = score_images(loaded.model, config, load_images(test, config.input_size))
    abnormality, curves = abnormality_report(config, test, ab.numpy(), config.thresholds, settings.n_boot)
    report = {
        "weights": loaded.source,
        "test_set": "MURA v1.1 valid (abnormality, body part) + UNIFESP test share (body part, 'other')",
        "abnormality": abnormality,
        "body_part": body_part_report(config, test, bp.numpy()),
    }
    if settings.imagenet_init:
        report["baseline"] = baseline_report(settings, splits, config, settings.n_boot)
    report["seconds"] = round(time.time() - t0, 1)
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plot_report(curves, report["body_part"], out)
    return report


def summary_table(report: dict) -> str:
    """Markdown table of the study-level headline metrics (model vs baseline)."""
    rows = [
        "| part | studies | AUROC (95% CI) | kappa (95% CI) | sensitivity | specificity "
        "| baseline AUROC | baseline kappa |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(m):
        return f"{m['value']:.3f} ({m['ci95'][0]:.3f}-{m['ci95'][1]:.3f})"

    for part, r in report["abnormality"].items():
        if part == "overall":
            continue
        s = r["study_level"]
        b = report.get("baseline", {}).get(part, {}).get("study_level")
        rows.append(
            f"| {part} | {r['studies']} | {fmt(s['auroc'])} | {fmt(s['kappa'])} | {s['sensitivity']['value']:.3f} | "
            f"{s['specificity']['value']:.3f} | {fmt(b['auroc']) if b else '-'} | {fmt(b['kappa']) if b else '-'} |"
        )
    return "\n".join(rows)
