"""Which threshold rule holds up on unseen patients? Session 46's screen of the near ties.

`train` and `pair` choose each part's decision threshold on the training holdout: the kappa-maximising cut replaces
0.5 when its mean held-out kappa over 100 patient half splits is higher (``cross_validated_threshold``). A win by
0.003 moved 3.2.0's forearm cut to 0.762. This judges that choice itself, nested: the holdout's patients are split in
half many times; each variant of the rule runs on one half (with its own inner half splits) and sets a threshold
there, and the study kappa of that threshold is measured on the other half. Variants:

- ``fixed_0.5`` and ``max_kappa``: one rule always;
- ``mean``: the served rule (max-kappa when its mean inner kappa is higher);
- ``share>=Q``: max-kappa only when it is ahead in at least a share Q of the inner splits;
- ``margin>=M``: max-kappa only when its mean inner kappa is ahead by at least M.

Printed per network and part (mean outer kappa of each variant, and how often it chose max-kappa), then pooled.
No test image is read.

    python -m benchmarks.threshold_rules weights runs/s45/F/weights --parts forearm humerus
"""

from __future__ import annotations

import argparse

import numpy as np

from mura_demo.core.inference import score_images
from mura_demo.core.malloc import tune_for_batch_work
from mura_demo.core.weights import load_folder
from mura_demo.training.data import load_splits, model_images, patients_of
from mura_demo.training.metrics import THRESHOLD_RULES, cohen_kappa, held_out_kappas
from mura_demo.training.train import part_study_scores


def variants() -> dict:
    """Each variant: inner per-split kappas -> whether the kappa-maximising cut replaces 0.5."""
    out = {"fixed_0.5": lambda k: False, "max_kappa": lambda k: True}
    out["mean"] = lambda k: k["max_kappa"].mean() >= k["fixed_0.5"].mean()
    for q in (0.6, 0.75, 0.9):
        out[f"share>={q}"] = lambda k, q=q: (k["max_kappa"] > k["fixed_0.5"]).mean() >= q
    for m in (0.01, 0.02, 0.05):
        out[f"margin>={m}"] = lambda k, m=m: k["max_kappa"].mean() - k["fixed_0.5"].mean() >= m
    return out


def nested(y, s, patients, n_outer: int, seed: int = 1) -> dict[str, tuple[float, float]]:
    """Each variant's mean kappa on the held-out halves, and the share of halves where it chose max-kappa."""
    rules = variants()
    kappa: dict[str, list[float]] = {name: [] for name in rules}
    chose: dict[str, list[bool]] = {name: [] for name in rules}
    unique = np.unique(patients)
    rng = np.random.default_rng(seed)
    for _ in range(n_outer):
        half = np.isin(patients, rng.choice(unique, len(unique) // 2, replace=False))
        if len(np.unique(y[half])) < 2 or len(np.unique(y[~half])) < 2:
            continue
        inner = held_out_kappas(y[half], s[half], patients[half])
        if not all(len(v) for v in inner.values()):
            continue
        cut = {name: rule(y[half], s[half]) for name, rule in THRESHOLD_RULES.items()}
        for name, rule in rules.items():
            choice = bool(rule(inner))
            chose[name].append(choice)
            threshold = cut["max_kappa" if choice else "fixed_0.5"]
            kappa[name].append(cohen_kappa(y[~half], (s[~half] >= threshold).astype(int)))
    return {name: (float(np.mean(kappa[name])), float(np.mean(chose[name]))) for name in rules}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="weights folders (abnormality networks or pairs)")
    parser.add_argument("--parts", nargs="+", default=["forearm", "humerus"])
    parser.add_argument("--outer", type=int, default=200, help="outer half splits of the holdout's patients")
    parser.add_argument("--data-root", default="../shared/data")
    args = parser.parse_args()
    tune_for_batch_work()

    holdout = load_splits(args.data_root)["holdout"]
    pooled: dict[str, list[float]] = {}
    for folder in args.folders:
        model, config = load_folder(folder)
        _, ab_prob = score_images(model, config, *model_images(holdout, config))
        for part, (studies, y, p) in part_study_scores(config, holdout, ab_prob).items():
            if part not in args.parts:
                continue
            figures = nested(np.asarray(y), np.asarray(p), np.asarray(patients_of(holdout, studies)), args.outer)
            print(f"{folder} {part} ({len(studies)} studies):")
            for name, (k, share) in figures.items():
                pooled.setdefault(name, []).append(k)
                print(f"  {name:<14} held-out kappa {k:.3f}  chose max-kappa in {share:.0%} of halves")
    print(f"pooled over {len(next(iter(pooled.values())))} network-part pairs (mean held-out kappa, and against mean):")
    for name, ks in pooled.items():
        print(f"  {name:<14} {np.mean(ks):.3f}  {np.mean(ks) - np.mean(pooled['mean']):+.4f}")


if __name__ == "__main__":
    main()
