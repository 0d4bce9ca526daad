"""Metrics for binary abnormality and body-part classification, on scikit-learn's definitions.

Study-level scores follow the MURA paper: a study's probability is the mean of its views'.
Confidence intervals resample studies (the unit a radiologist reads), not images. Two models
read on the same images are compared image by image (an exact McNemar test), not by their counts.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from sklearn import metrics as sk


def auroc(labels, scores) -> float:
    """Area under the ROC curve; NaN with one class (a bootstrap resample can draw one)."""
    y = np.asarray(labels, dtype=int)
    return float(sk.roc_auc_score(y, np.asarray(scores, dtype=float))) if len(np.unique(y)) == 2 else float("nan")


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    fpr, tpr, _ = sk.roc_curve(np.asarray(labels, dtype=int), np.asarray(scores, dtype=float), drop_intermediate=False)
    return fpr, tpr


def cohen_kappa(a, b) -> float:
    """Cohen's kappa between two label vectors (scikit-learn's, from the confusion counts: the threshold searches
    call it thousands of times, where scikit-learn's checks took most of the time); 1 when both give one and the
    same label throughout."""
    a, b = np.asarray(a), np.asarray(b)
    labels, codes = np.unique(np.concatenate([a, b]), return_inverse=True)
    if len(labels) == 1:
        return 1.0
    n, k = len(a), len(labels)
    confusion = np.bincount(codes[:n] * k + codes[n:], minlength=k * k).reshape(k, k)
    observed = np.trace(confusion) / n
    expected = confusion.sum(1) @ confusion.sum(0) / n**2
    return float((observed - expected) / (1 - expected))


def binary_metrics(labels, scores, threshold: float) -> dict[str, float]:
    """AUROC, kappa, accuracy, sensitivity, specificity, precision and F1 at ``threshold``."""
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    pred = (s >= threshold).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())

    def ratio(a, b):
        return a / b if b else float("nan")

    precision, sensitivity = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "auroc": auroc(y, s),
        "kappa": cohen_kappa(y, pred),
        "accuracy": ratio(tp + tn, len(y)),
        "sensitivity": sensitivity,
        "specificity": ratio(tn, tn + fp),
        "precision": precision,
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


def study_scores(studies, labels, scores, join=np.mean) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Each study's view probabilities joined into one score: their mean, as in the MURA paper, unless ``join``
    says otherwise (benchmarks.abnormality_scales screens other joins)."""
    grouped: dict[str, list[float]] = defaultdict(list)
    label_of = {}
    for st, y, s in zip(studies, labels, scores):
        grouped[st].append(float(s))
        label_of[st] = int(y)
    keys = sorted(grouped)
    return keys, np.array([label_of[k] for k in keys]), np.array([join(grouped[k]) for k in keys])


def best_kappa_threshold(labels, scores) -> float:
    """The threshold that maximises Cohen's kappa (midpoints between distinct scores)."""
    s = np.unique(np.asarray(scores, dtype=float))
    candidates = np.r_[(s[:-1] + s[1:]) / 2.0, 0.5] if len(s) > 1 else np.array([0.5])
    kappas = [cohen_kappa(labels, (np.asarray(scores) >= t).astype(int)) for t in candidates]
    return float(np.clip(candidates[int(np.argmax(kappas))], 1e-4, 1 - 1e-4))


THRESHOLD_RULES = {"max_kappa": best_kappa_threshold, "fixed_0.5": lambda *_: 0.5}


def held_out_kappas(labels, scores, groups, n_splits: int = 100, seed: int = 0) -> dict[str, np.ndarray]:
    """Each threshold rule's Cohen's kappa on unseen patients, split by split.

    Over repeated splits of the ``groups`` (patients) in half, each rule sets its threshold on one
    half and is scored on the other; both rules see the same halves, so the arrays pair up.
    """
    y, s, g = np.asarray(labels, dtype=int), np.asarray(scores, dtype=float), np.asarray(groups)
    patients = np.unique(g)
    rng = np.random.default_rng(seed)
    kappas: dict[str, list[float]] = {name: [] for name in THRESHOLD_RULES}
    for _ in range(n_splits):
        half = np.isin(g, rng.choice(patients, len(patients) // 2, replace=False))
        if len(np.unique(y[half])) < 2 or len(np.unique(y[~half])) < 2:
            continue
        for name, rule in THRESHOLD_RULES.items():
            predicted = (s[~half] >= rule(y[half], s[half])).astype(int)
            kappas[name].append(cohen_kappa(y[~half], predicted))
    return {name: np.array(v) for name, v in kappas.items()}


def mean_held_out_kappas(labels, scores, groups, n_splits: int = 100, seed: int = 0) -> dict[str, float]:
    """Each threshold rule's mean :func:`held_out_kappas` (nan for a rule no split could score)."""
    kappas = held_out_kappas(labels, scores, groups, n_splits, seed)
    return {name: float(np.mean(v)) if len(v) else float("nan") for name, v in kappas.items()}


def cross_validated_threshold(labels, scores, groups, n_splits: int = 100, seed: int = 0) -> tuple[float, dict]:
    """A decision threshold for scores that have no natural cut, chosen by the rule that holds up on unseen patients.

    The kappa-maximising threshold of the data competes with a fixed 0.5; the rule with the higher
    :func:`mean_held_out_kappas` sets the threshold on all the data. For the frozen-feature baseline,
    whose logistic regression does not balance the classes. Returns the threshold and the means.
    """
    means = mean_held_out_kappas(labels, scores, groups, n_splits, seed)
    best = "fixed_0.5" if means["fixed_0.5"] > means["max_kappa"] else "max_kappa"
    threshold = THRESHOLD_RULES[best](np.asarray(labels, dtype=int), np.asarray(scores, dtype=float))
    return float(np.clip(threshold, 1e-4, 1 - 1e-4)), {"rule": best, "held_out_kappa": means}


def paired_worse_p(worse: int, better: int) -> float:
    """One-sided exact McNemar p that a model is worse than a reference on the same images.

    ``worse`` counts the images the reference names right and the model wrong, ``better`` the
    reverse; images both name alike say nothing about the difference and are left out.
    """
    n = worse + better
    return sum(math.comb(n, k) for k in range(worse, n + 1)) / 2**n


def bootstrap_ci(labels, scores, threshold: float, groups=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Point estimates and 95% percentile intervals of :func:`binary_metrics`.

    Resamples ``groups`` (e.g. the study of each image) with replacement, taking all their
    members; without groups each item is its own group.
    """
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    point = binary_metrics(y, s, threshold)
    if groups is None:
        members = [np.array([i]) for i in range(len(y))]
    else:
        index: dict = defaultdict(list)
        for i, g in enumerate(groups):
            index[g].append(i)
        members = [np.array(v) for v in index.values()]
    rng = np.random.default_rng(seed)
    draws = defaultdict(list)
    for _ in range(n_boot):
        i = np.concatenate([members[j] for j in rng.integers(0, len(members), len(members))])
        for k, v in binary_metrics(y[i], s[i], threshold).items():
            if not np.isnan(v):
                draws[k].append(v)
    out = {}
    for k, v in point.items():
        lo, hi = np.percentile(draws[k], [2.5, 97.5]) if draws[k] else (float("nan"),) * 2
        out[k] = {"value": v, "ci95": [float(lo), float(hi)]}
    return out


def paired_auroc_bootstrap(labels, scores, reference, groups, n_boot: int = 2000, seed: int = 0) -> dict:
    """AUROC of ``scores`` minus that of ``reference`` on the same items, with a 95% percentile interval and the
    share of draws where ``scores`` is ahead. Both are resampled together by ``groups`` (e.g. the patient of each
    study), so the two readings' shared luck in the draw cancels out of the difference."""
    y, s, r = (np.asarray(v, dtype=float) for v in (labels, scores, reference))
    index: dict = defaultdict(list)
    for i, g in enumerate(groups):
        index[g].append(i)
    members = list(index.values())
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        i = np.concatenate([members[j] for j in rng.integers(0, len(members), len(members))])
        d = auroc(y[i], s[i]) - auroc(y[i], r[i])
        if not np.isnan(d):
            draws.append(d)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {
        "difference": auroc(y, s) - auroc(y, r),
        "ci95": [float(lo), float(hi)],
        "share_ahead": float(np.mean(np.array(draws) > 0)),
        "draws": len(draws),
    }
