"""Can the elbow logit be fitted on a network's frozen features? A screen of session 43's lever.

A network trained without MURA elbows reads them with a transfer guess: its elbow logit is the mean of the trained
parts' weights. This fits that one row on the network's own pooled features (image and mirror averaged, as served),
as a class-balanced logistic regression whose Gaussian prior is centred on the guess, the prior's strength chosen by
patient-level 5-fold log loss. Two screens, neither reading a test image:

- train -> holdout: strength chosen and row fitted on the training elbows, scored on the holdout's;
- pooled, nested: all non-test elbows (train and holdout) in 5 patient folds; in each, the strength is chosen by an
  inner 5-fold split of the other four and the fold is scored out of fold.

Each is printed beside the transfer guess on the same images (study AUROC, the mean of the views' probabilities).

    python -m benchmarks.elbow_head weights
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from mura_demo.core.malloc import tune_for_batch_work
from mura_demo.core.model import explained_network
from mura_demo.core.preprocess import normalize
from mura_demo.core.weights import load_folder
from mura_demo.training.data import bucket, load_images, load_splits, patients_of
from mura_demo.training.metrics import auroc, paired_auroc_bootstrap, study_scores

STRENGTHS = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
FOLDS = 5


@torch.no_grad()
def served_features(net, config, samples, batch_size: int = 32) -> torch.Tensor:
    """Pooled features whose head output is the served logit: the mean of the image's and its mirror's."""
    images = load_images(samples, config.input_size)
    out = []
    for i in range(0, len(images), batch_size):
        x = normalize(images[i : i + batch_size], config)
        out.append((net.backbone(x) + net.backbone(x.flip(-1))) / 2 if config.test_time_flip else net.backbone(x))
    return torch.cat(out).double()


def fit_row(x, y, strength: float, prior: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """MAP logistic regression: class-balanced log loss + strength / 2 * |w - prior weight|^2 (the bias is free)."""
    w0, b0 = prior
    delta = torch.zeros_like(w0, requires_grad=True)
    bias = b0.clone().requires_grad_(True)
    balance = torch.where(y > 0, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    optimizer = torch.optim.LBFGS([delta, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = x @ (w0 + delta) + bias
        loss = (balance * F.binary_cross_entropy_with_logits(logits, y, reduction="none")).mean()
        loss = loss + strength / 2 * delta.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return (w0 + delta).detach(), bias.detach()


def folds_of(samples, salt: str = "") -> np.ndarray:
    return np.array([bucket(f"{salt}{s.patient}") % FOLDS for s in samples])


def chosen_strength(x, y, samples, prior, salt: str = "") -> float:
    """The prior strength with the lowest patient-level 5-fold log loss on these images."""
    folds = folds_of(samples, salt)

    def loss(strength):
        losses = []
        for f in range(FOLDS):
            w, b = fit_row(x[folds != f], y[folds != f], strength, prior)
            losses.append(F.binary_cross_entropy_with_logits(x[folds == f] @ w + b, y[folds == f]).item())
        return np.mean(losses)

    return min(STRENGTHS, key=loss)


def study_figures(samples, y, probabilities) -> tuple[float, int]:
    """Study AUROC (the mean of the views' probabilities) and the number of studies."""
    _, labels, scores = study_scores([s.study for s in samples], np.asarray(y), np.asarray(probabilities))
    return auroc(labels, scores), len(labels)


def study_auroc(samples, y, logits) -> str:
    value, studies = study_figures(samples, y, torch.sigmoid(logits))
    return f"study AUROC {value:.3f} ({studies} studies)"


def versus(samples, y, probabilities, reference, n_boot: int = 2000) -> str:
    """The study AUROC of ``probabilities`` minus the ``reference``'s on the same images, with a paired bootstrap
    over patients: with about 150 studies a difference of 0.02-0.03 is about one standard error."""
    studies = [s.study for s in samples]
    keys, labels, scores = study_scores(studies, np.asarray(y), np.asarray(probabilities))
    _, _, base = study_scores(studies, np.asarray(y), np.asarray(reference))
    r = paired_auroc_bootstrap(labels, scores, base, patients_of(samples, keys), n_boot)
    return (f"difference {r['difference']:+.3f} (95% interval {r['ci95'][0]:+.3f} to {r['ci95'][1]:+.3f}; "
            f"ahead in {r['share_ahead']:.0%} of {r['draws']} patient resamples)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", help="a weights folder (a pair's abnormality network is the one read)")
    parser.add_argument("--part", default="elbow")
    parser.add_argument("--data-root", default="../shared/data")
    args = parser.parse_args()
    tune_for_batch_work()

    model, config = load_folder(args.weights)
    net = explained_network(model).eval()
    k = config.body_parts.index(args.part)
    prior = (net.abnormality_head.weight.detach().double()[k], net.abnormality_head.bias.detach().double()[k])
    splits = load_splits(args.data_root)
    part = {n: [s for s in splits[n] if s.source == "mura" and s.body_parts == (args.part,)] for n in splits}
    x = {n: served_features(net, config, part[n]) for n in ("train", "holdout")}
    y = {n: torch.tensor([float(s.abnormal) for s in part[n]], dtype=torch.float64) for n in x}

    strength = chosen_strength(x["train"], y["train"], part["train"], prior)
    w, b = fit_row(x["train"], y["train"], strength, prior)
    print(f"train -> holdout ({len(part['train'])} -> {len(part['holdout'])} images; strength {strength:g}):")
    print(f"  transfer guess: {study_auroc(part['holdout'], y['holdout'], x['holdout'] @ prior[0] + prior[1])}")
    print(f"  fitted row:     {study_auroc(part['holdout'], y['holdout'], x['holdout'] @ w + b)}")
    guess = torch.sigmoid(x["holdout"] @ prior[0] + prior[1])
    print(f"  {versus(part['holdout'], y['holdout'], torch.sigmoid(x['holdout'] @ w + b), guess)}")

    samples = part["train"] + part["holdout"]
    xs, ys = torch.cat([x["train"], x["holdout"]]), torch.cat([y["train"], y["holdout"]])
    folds, out_of_fold, strengths = folds_of(samples), torch.zeros(len(samples), dtype=torch.float64), []
    for f in range(FOLDS):
        inside = np.flatnonzero(folds != f)
        strengths.append(chosen_strength(xs[inside], ys[inside], [samples[i] for i in inside], prior, "inner:"))
        w, b = fit_row(xs[inside], ys[inside], strengths[-1], prior)
        out_of_fold[folds == f] = xs[folds == f] @ w + b
    print(f"pooled, nested ({len(samples)} images; strengths by fold {strengths}):")
    print(f"  transfer guess: {study_auroc(samples, ys, xs @ prior[0] + prior[1])}")
    print(f"  fitted row:     {study_auroc(samples, ys, out_of_fold)}")
    print(f"  {versus(samples, ys, torch.sigmoid(out_of_fold), torch.sigmoid(xs @ prior[0] + prior[1]))}")
    print(f"  strength on all of them: {chosen_strength(xs, ys, samples, prior, 'inner:'):g}")


if __name__ == "__main__":
    main()
