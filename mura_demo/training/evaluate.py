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
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..core.config import OTHER, ModelConfig
from ..core.inference import score_body_parts, score_images
from ..core.model import body_part_network, create_model
from ..core.preprocess import normalize
from ..core.weights import LoadedModel, load_folder, load_model, round_as_stored
from .data import (
    Sample,
    abnormality_rows,
    end_crops,
    group_of,
    is_withheld,
    load_images,
    load_splits,
    model_images,
    patients_of,
)
from .metrics import auroc, bootstrap_ci, cohen_kappa, cross_validated_threshold, roc_curve, study_scores
from .settings import EvalSettings


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


def named_right(config: ModelConfig, samples: list[Sample], bp_probs) -> np.ndarray:
    """Whether the body-part head's top class is one of each image's parts (an image labelled with
    two parts, or an end crop, is right as either): the one definition every body-part figure uses."""
    predicted = np.asarray(bp_probs).argmax(1)
    return np.array([config.body_part_classes[k] in s.body_parts for k, s in zip(predicted, samples)], dtype=bool)


def body_part_report(config: ModelConfig, samples: list[Sample], bp_probs: np.ndarray) -> dict:
    classes = config.body_part_classes
    predicted = bp_probs.argmax(1)
    ue = [i for i, s in enumerate(samples) if s.body_parts != (OTHER,)]
    other = [i for i, s in enumerate(samples) if s.body_parts == (OTHER,)]
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    for i, s in enumerate(samples):
        confusion[classes.index(s.body_parts[0]), predicted[i]] += 1
    return {
        "classes": list(classes),
        "upper_extremity_images": len(ue),
        "accuracy_upper_extremity": float(named_right(config, samples, bp_probs)[ue].mean()) if ue else None,
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


def part_xy(feats: np.ndarray, samples: list[Sample], rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return feats[rows], np.array([samples[i].abnormal for i in rows])


def study_probabilities(feats, samples, rows, classifier):
    """Study-level labels and mean probabilities of a fitted classifier."""
    x, y = part_xy(feats, samples, rows)
    return study_scores([samples[i].study for i in rows], y, classifier.predict_proba(x)[:, 1])


def baseline_report(settings: EvalSettings, splits: dict, config: ModelConfig, n_boot: int) -> dict:
    """Frozen ImageNet features + per-part logistic regression (its C and threshold chosen on the holdout)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    base_cfg = ModelConfig(architecture=config.architecture, input_size=config.input_size)
    model = create_model(base_cfg, imagenet_init=settings.imagenet_init)
    feats, meta = {}, {}
    for split in ("train", "holdout", "test"):
        chosen = [s for s in splits[split] if s.abnormal is not None]
        feats[split] = backbone_features(model, base_cfg, load_images(chosen, base_cfg.input_size)).numpy()
        meta[split] = chosen
    scaler = StandardScaler().fit(feats["train"])
    feats = {k: scaler.transform(v) for k, v in feats.items()}
    report = {"description": f"frozen ImageNet {config.architecture} features + logistic regression"}
    rows_by_split = {k: abnormality_rows(v, config.body_parts) for k, v in meta.items()}
    for part in config.body_parts:
        rows = {k: r.get(part) for k, r in rows_by_split.items()}
        if not all(rows.values()):
            continue
        best = None
        for c in (1e-3, 1e-2, 1e-1, 1.0):
            classifier = LogisticRegression(C=c, max_iter=2000).fit(
                *part_xy(feats["train"], meta["train"], rows["train"])
            )
            studies, hy, hp = study_probabilities(feats["holdout"], meta["holdout"], rows["holdout"], classifier)
            score = auroc(hy, hp)
            if best is None or score > best[0]:
                best = (score, c, classifier, studies, hy, hp)
        _, c, classifier, studies, hy, hp = best
        t, _ = cross_validated_threshold(hy, hp, patients_of(meta["holdout"], studies))  # the model's rule
        _, ty, tp = study_probabilities(feats["test"], meta["test"], rows["test"], classifier)
        report[part] = {"C": c, "threshold": t, "study_level": bootstrap_ci(ty, tp, t, n_boot=n_boot)}
    return report


def plot_report(curves: dict, body: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for part, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, label=part)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="Study-level ROC, held-out studies")
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


def body_part_by_group(config: ModelConfig, samples: list[Sample], bp_prob) -> dict[str, dict]:
    """Body-part accuracy per source and part (see :func:`data.group_of`), with each group's size and what
    its images were called (top class: count, most first), so a miss says where it went."""
    top = np.asarray(bp_prob).argmax(1)
    groups: dict[str, list[tuple[bool, str]]] = {}
    for right, k, s in zip(named_right(config, samples, bp_prob), top, samples):
        groups.setdefault(group_of(s), []).append((bool(right), config.body_part_classes[k]))
    return {
        g: {
            "images": len(v),
            "accuracy": float(np.mean([right for right, _ in v])),
            "called": dict(Counter(called for _, called in v).most_common()),
        }
        for g, v in sorted(groups.items())
    }


def body_part_summary(config: ModelConfig, samples: list[Sample], bp_prob) -> dict:
    """Body-part figures of a holdout read as ``bp_prob``: accuracy per source and part, their mean (so the
    thousands of MURA forearm and humerus images cannot hide a failing group of a few dozen) and the images right."""
    by_group = body_part_by_group(config, samples, bp_prob)
    return {
        "body_part_by_group": by_group,
        "body_part_accuracy": float(np.mean([g["accuracy"] for g in by_group.values()])),
        "body_part_images_right": int(named_right(config, samples, bp_prob).sum()),
    }


def body_part_merit(summary: dict, view_choice: str):
    """What the holdout's body-part choices (serving size, view, *other* shift) maximise: "groups", the mean
    accuracy per source and part (one of UNIFESP's 5 holdout shoulders weighs as much as 57 MURA forearms);
    "images", the images named right, ties broken by that mean, so a group's say follows its images."""
    if view_choice == "images":
        return summary["body_part_images_right"], summary["body_part_accuracy"]
    return summary["body_part_accuracy"]


def withheld_report(config: ModelConfig, samples: list[Sample], bp_probs: np.ndarray) -> dict:
    """How a model that never saw these images' source-and-part names them: the share called their part,
    what else it called them, and how confident the misroutes were (top-class probability quantiles)."""
    classes = config.body_part_classes
    predicted = bp_probs.argmax(1)
    right = named_right(config, samples, bp_probs)
    wrong = bp_probs.max(1)[~right]
    return {
        "images": len(samples),
        "accuracy": float(right.mean()) if len(samples) else None,
        "called": {c: int((predicted == i).sum()) for i, c in enumerate(classes) if (predicted == i).any()},
        "misrouted_top_probability_quantiles": {q: float(np.quantile(wrong, q / 100)) for q in (5, 25, 50, 75, 95)}
        if len(wrong)
        else {},
    }


MISROUTED_PASS_RATE = 0.05  # at most this share of misrouted views may clear the confidence level
LOSO_TRUST = 0.90  # below this leave-one-source-out accuracy, a detected part must be confirmed


def confidence_level(top: np.ndarray, right: np.ndarray) -> float:
    """The lowest level (from 0.5 up) that at most MISROUTED_PASS_RATE of the misrouted views clear."""
    wrong = np.sort(top[~right])
    if not len(wrong):
        return 0.5
    level = float(wrong[min(len(wrong) - 1, int(np.floor(len(wrong) * (1 - MISROUTED_PASS_RATE))))])
    return float(np.clip(np.nextafter(level, 1.0), 0.5, 0.999))


def body_part_gate(settings: EvalSettings, splits: dict, config: ModelConfig, test_bp: np.ndarray) -> dict:
    """The leave-one-source-out figures and what they decide for the shipped weights.

    The run named by ``loso_weights`` never saw one source's part (``mura:elbow``). On those images
    from patients outside the part's test share it sets the confidence level; on the test share it
    gives the headline figure and how often misrouted views clear the level. Below LOSO_TRUST a
    confident detection cannot be trusted either, so the shipped weights then ask the user to confirm.
    The shipped model's held-out images say how many correct detections clear the level. The withheld run reads
    the body part the way the shipped weights do (with or without the equalised view; at int8 where they store
    their networks so), or it would stand in for another reading."""
    loso = load_model(settings.loso_weights, body_part_alone=True)
    if config.separate_body_part_network:
        round_as_stored(loso.model, int8=True)
    if loso.config.body_part_equalized_input != config.body_part_equalized_input:
        raise ValueError(f"{settings.loso_weights} and the weights evaluated were not both trained on equalised images "
                         "(train --equalized-inputs): the withheld run would stand in for another network")  # fmt: skip
    reading = dataclasses.replace(loso.config, body_part_equalized_view=config.body_part_equalized_view)
    spec = loso.config.training.get("settings", {}).get("withhold")
    if not spec:
        raise ValueError(f"{settings.loso_weights} was not trained with a source withheld (train --withhold)")
    shares = {
        "selection": [s for s in splits["train"] + splits["holdout"] if is_withheld(s, spec)],
        "test": [s for s in splits["test"] if is_withheld(s, spec)],
    }
    report: dict = {"withheld": spec, "weights": loso.source, "training": loso.config.training}
    tops = {}
    for name, samples in shares.items():
        bp = score_body_parts(loso.model, reading, load_images(samples, loso.config.input_size)).numpy()
        report[name] = withheld_report(loso.config, samples, bp)
        tops[name] = (bp.max(1), named_right(loso.config, samples, bp))
    level = confidence_level(*tops["selection"])
    top, right = tops["test"]
    report["level"] = level
    report["test"]["misrouted_clearing_level"] = float(((top >= level) & ~right).sum() / max(1, (~right).sum()))
    report["test"]["share_misrouted_and_clearing"] = float(((top >= level) & ~right).mean())
    report["shipped_held_out_mura"] = correct_clearing(config, splits["test"], test_bp, level)
    accuracy = report["test"]["accuracy"]
    report["confirmation_required"] = accuracy < LOSO_TRUST
    report["reason"] = (
        f"with MURA {spec.split(':')[1]} images left out of its training, the body-part model named "
        f"{accuracy:.0%} of them right (this project's stand-in for the MURA wrists, hands, fingers and shoulders "
        "it has never seen)"
    )
    return report


def correct_clearing(config: ModelConfig, test: list[Sample], test_bp: np.ndarray, level: float) -> dict:
    """How many held-out MURA images the shipped weights detect right at or above the confidence level."""
    upper = [i for i, s in enumerate(test) if s.body_parts != (OTHER,) and s.source == "mura"]
    correct = named_right(config, [test[i] for i in upper], test_bp[upper])
    return {"images": len(upper), "correct_clearing_level": float((correct & (test_bp[upper].max(1) >= level)).mean())}


# What the body part's reading depends on besides the body-part network's tensors.
BODY_PART_READING = ("architecture", "body_part_image_size", "mean", "std", "body_parts", "test_time_flip",
                     "body_part_input_size", "body_part_equalized_view", "body_part_equalized_input")  # fmt: skip


def carried_gate(folder: str, loaded: LoadedModel) -> dict:
    """The leave-one-source-out figures of the evaluated weights in ``folder``, which read the body part with the
    same network the same way as ``loaded`` (checked tensor for tensor, before any scoring): the withheld run's figures
    and the level they chose depend on nothing else, so a version that changes only the abnormality reading keeps them
    without its withheld run being kept or trained again. What the evaluated weights make of the level is measured
    anew (``correct_clearing``)."""
    earlier_model, earlier = load_folder(folder)
    record = earlier.metrics.get("leave_one_source_out")
    if not record:
        raise ValueError(f"{folder} has no leave-one-source-out figures to carry over")
    differs = [k for k in BODY_PART_READING if getattr(loaded.config, k) != getattr(earlier, k)]
    mine, other = body_part_network(loaded.model).state_dict(), body_part_network(earlier_model).state_dict()
    if mine.keys() != other.keys() or not all(torch.equal(mine[k], other[k]) for k in mine):
        differs.append("the body-part network's tensors")
    if differs:
        raise ValueError(f"{folder} reads the body part differently ({', '.join(differs)}): its leave-one-source-out "
                         "figures are not these weights'; measure them with --loso-weights")  # fmt: skip
    measured_in = record.get("carried_from", {}).get("measured_in", earlier.version)
    return {
        **record,
        "confirmation_required": earlier.body_part_confirmation,
        "reason": earlier.body_part_confirmation_reason,
        "carried_from": {"folder": folder, "version": earlier.version, "measured_in": measured_in},
    }


def end_crop_calls(model, config: ModelConfig, samples: list[Sample]) -> dict:
    """What the model calls the two end crops of held-out MURA forearm and humerus images: a check that
    the end-crop lever taught anatomy (about half elbow, half wrist/shoulder), not "every end is an elbow"."""
    crops = end_crops([s for s in samples if s.source == "mura"])
    bp = score_body_parts(model, config, load_images(crops, config.body_part_image_size)).numpy()
    out: dict = {}
    for s, k in zip(crops, bp.argmax(1)):
        called = out.setdefault("+".join(s.body_parts), {})
        name = config.body_part_classes[k]
        called[name] = called.get(name, 0) + 1
    return out


def evaluate(settings: EvalSettings) -> dict:
    """Score the weights on the held-out test data; write report.json and plots to out_dir."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    t0 = time.time()
    loaded = load_model(settings.weights)
    config = loaded.config
    carried = carried_gate(settings.loso_from, loaded) if settings.loso_from else None
    splits = load_splits(settings.data_root)
    test = splits["test"]
    bp, ab = score_images(loaded.model, config, *model_images(test, config))
    abnormality, curves = abnormality_report(config, test, ab.numpy(), config.thresholds, settings.n_boot)
    report = {
        "weights": loaded.source,
        "test_set": "MURA v1.1 valid (forearm, humerus), the MURA elbow test share (a fixed quarter of the elbow "
        "patients of MURA train), and the UNIFESP test share (body part, 'other')",
        "abnormality": abnormality,
        "body_part": body_part_report(config, test, bp.numpy()) | {"by_group": body_part_by_group(config, test, bp)},
        "end_crops": end_crop_calls(loaded.model, config, test),
    }
    if settings.imagenet_init:
        report["baseline"] = baseline_report(settings, splits, config, settings.n_boot)
    if settings.loso_weights:
        report["body_part_gate"] = body_part_gate(settings, splits, config, bp.numpy())
    elif carried:
        report["body_part_gate"] = carried | {
            "shipped_held_out_mura": correct_clearing(config, test, bp.numpy(), carried["level"])
        }
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
