"""Evaluation and model card end to end on a miniature data tree of real radiographs.

The tree keeps MURA's official layout and CSVs and the UNIFESP labels file, with every tenth
study (and every tenth UNIFESP image) linked from ../shared/data, so the whole command runs in
about a minute: test scoring, the frozen-feature baseline, bootstrap intervals, plots and the card.
"""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import yaml
from conftest import BUNDLED, MURA, UNIFESP, needs_data, needs_weights

from mura_demo.card import write_model_card
from mura_demo.evaluate import EvalSettings, evaluate

pytestmark = [needs_data, needs_weights]


def write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def link(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "MURA-v1.1").mkdir()
    for split in ("train", "valid"):
        with open(MURA / f"{split}_labeled_studies.csv", newline="") as fh:
            studies = list(csv.reader(fh))[::10]
        kept = {study.rstrip("/") for study, _ in studies}
        with open(MURA / f"{split}_image_paths.csv", newline="") as fh:
            images = [row for row in csv.reader(fh) if row[0].rsplit("/", 1)[0] in kept]
        write_csv(root / "MURA-v1.1" / f"{split}_labeled_studies.csv", studies)
        write_csv(root / "MURA-v1.1" / f"{split}_image_paths.csv", images)
        for (rel,) in images:
            link(MURA.parent / rel, root / rel)
    with open(UNIFESP / "labels.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    link(UNIFESP / "images", root / "unifesp-bodypart" / "images")
    write_csv(root / "unifesp-bodypart" / "labels.csv", [rows[0], *rows[1::10]])
    return root


def test_evaluate_writes_report_plots_and_card(mini_data, imagenet_init, tmp_path):
    weights = shutil.copytree(BUNDLED, tmp_path / "weights")
    settings = EvalSettings(
        data_root=str(mini_data),
        weights=str(weights),
        out_dir=str(tmp_path / "eval"),
        imagenet_init=imagenet_init,
        n_boot=50,
    )
    report = evaluate(settings)
    assert json.loads((tmp_path / "eval" / "report.json").read_text()) == json.loads(json.dumps(report))
    for png in ("roc_study_level.png", "body_part_confusion.png"):
        assert (tmp_path / "eval" / png).stat().st_size > 5000
    metrics = {"auroc", "kappa", "accuracy", "sensitivity", "specificity", "precision", "f1"}
    for part in ("forearm", "humerus"):
        for level in ("image_level", "study_level"):
            assert set(report["abnormality"][part][level]) == metrics
            for m in report["abnormality"][part][level].values():
                low, high = m["ci95"]
                assert low <= high, (part, level)
        assert set(report["baseline"][part]) == {"l2", "threshold", "study_level"}
    body = report["body_part"]
    matrix = body["confusion_matrix"]
    assert sum(map(sum, matrix)) == body["upper_extremity_images"] + body["other_images"]

    write_model_card(weights, report | {"n_boot": settings.n_boot})
    card = (weights / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "timm"
    results = {r["dataset"]["name"]: r for r in front["model-index"][0]["results"]}
    config = json.loads((weights / "config.json").read_text())
    for part in ("forearm", "humerus"):
        auroc = report["abnormality"][part]["study_level"]["auroc"]["value"]
        assert config["metrics"]["valid"][part]["study_auroc"] == auroc
        stated = [m["value"] for r in results.values() if part in r["dataset"]["name"] for m in r["metrics"]]
        assert round(auroc, 4) in stated
    assert f"Body part: {body['accuracy_upper_extremity']:.3f} accuracy on {body['upper_extremity_images']}" in card
