"""The metric code agrees with scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as sk

from mura_demo.training.metrics import (
    auroc,
    binary_metrics,
    bootstrap_ci,
    cohen_kappa,
    cross_validated_threshold,
    paired_auroc_bootstrap,
    paired_worse_p,
    roc_curve,
    study_scores,
)


@pytest.fixture(params=[0, 1, 2])
def scored(request):
    rng = np.random.default_rng(request.param)
    y = rng.integers(0, 2, 300)
    s = np.clip(y * 0.3 + rng.normal(0.4, 0.25, 300), 0, 1)
    s = np.round(s, 2)  # ties
    return y, s


def test_metrics_follow_sklearn_and_handle_the_edges(scored):
    y, s = scored
    assert auroc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    fpr, tpr = roc_curve(y, s)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.isnan(auroc(np.ones(5), np.linspace(0, 1, 5)))  # one class: no AUROC
    assert cohen_kappa([1, 1, 1], [1, 1, 1]) == 1.0  # full agreement on one label


def test_kappa_is_sklearns_for_any_labels():
    rng = np.random.default_rng(0)
    for classes in (2, 3, 8):
        a = rng.integers(0, classes, 200)
        b = np.where(rng.random(200) < 0.6, a, rng.integers(0, classes, 200))
        assert cohen_kappa(a, b) == pytest.approx(sk.cohen_kappa_score(a, b), abs=1e-12)
    one_label = np.zeros(50, dtype=int)  # one rater constant, the other not: kappa 0, as scikit-learn says
    assert cohen_kappa(one_label, rng.integers(0, 2, 50)) == pytest.approx(0.0, abs=1e-12)
    assert cohen_kappa(["x", "y", "y"], ["x", "y", "x"]) == pytest.approx(
        sk.cohen_kappa_score(["x", "y", "y"], ["x", "y", "x"])
    )


def test_threshold_metrics_match_sklearn(scored):
    y, s = scored
    pred = (s >= 0.55).astype(int)
    m = binary_metrics(y, s, 0.55)
    assert m["kappa"] == pytest.approx(sk.cohen_kappa_score(y, pred))
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(sk.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(sk.recall_score(1 - y, 1 - pred))
    assert m["precision"] == pytest.approx(sk.precision_score(y, pred))
    assert m["f1"] == pytest.approx(sk.f1_score(y, pred))


def test_study_scores_average_views():
    keys, y, p = study_scores(["s1", "s1", "s2"], [1, 1, 0], [0.2, 0.6, 0.9])
    assert keys == ["s1", "s2"] and list(y) == [1, 0] and p == pytest.approx([0.4, 0.9])


def test_bootstrap_interval_contains_point(scored):
    y, s = scored
    ci = bootstrap_ci(y, s, 0.5, n_boot=200)
    for v in ci.values():
        lo, hi = v["ci95"]
        assert lo <= v["value"] <= hi
    assert 0.02 < ci["auroc"]["ci95"][1] - ci["auroc"]["ci95"][0] < 0.3


def test_cross_validated_threshold_picks_the_rule_that_holds_up():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 120)
    patients = np.repeat(np.arange(60), 2)  # two studies a patient
    # scores whose best cut lies far from 0.5: the kappa-maximising rule must win there
    shifted = np.where(y == 1, rng.uniform(0.8, 1.0, 120), rng.uniform(0.6, 0.8, 120))
    t, info = cross_validated_threshold(y, shifted, patients)
    assert info["rule"] == "max_kappa" and 0.75 < t < 0.85
    assert info["held_out_kappa"]["max_kappa"] > info["held_out_kappa"]["fixed_0.5"]
    # scores centred on 0.5 with much overlap: a tuned cut only chases noise, 0.5 holds up better
    noisy = np.clip(0.5 + (y - 0.5) * 0.2 + rng.normal(0, 0.25, 120), 0, 1)
    t, info = cross_validated_threshold(y, noisy, patients)
    assert info["rule"] == "fixed_0.5" and t == 0.5


def test_paired_worse_p_is_the_exact_one_sided_binomial_tail():
    assert paired_worse_p(0, 0) == 1.0
    assert paired_worse_p(5, 0) == pytest.approx(1 / 32)
    assert paired_worse_p(0, 5) == 1.0
    assert paired_worse_p(7, 2) == pytest.approx((36 + 9 + 1) / 512)  # P(X >= 7), X ~ Binomial(9, 1/2)
    assert paired_worse_p(3, 3) > 0.5


def test_the_paired_bootstrap_resamples_both_readings_together():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 150)
    patients = np.repeat(np.arange(75), 2)
    reference = np.clip(0.5 + (y - 0.5) * 0.3 + rng.normal(0, 0.3, 150), 0, 1)
    same = paired_auroc_bootstrap(y, reference, reference, patients, n_boot=200)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and same["share_ahead"] == 0
    better = np.clip(reference + (y - 0.5) * 0.3, 0, 1)  # the same noise, more signal
    ahead = paired_auroc_bootstrap(y, better, reference, patients, n_boot=200)
    assert ahead["difference"] == pytest.approx(auroc(y, better) - auroc(y, reference)) and ahead["difference"] > 0
    assert 0 < ahead["ci95"][0] < ahead["difference"] < ahead["ci95"][1] and ahead["share_ahead"] == 1.0
    behind = paired_auroc_bootstrap(y, reference, better, patients, n_boot=200)
    assert behind["share_ahead"] == 0 and behind["difference"] == pytest.approx(-ahead["difference"])
