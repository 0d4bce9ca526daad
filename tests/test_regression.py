"""The shipped weights still reproduce their model card on held-out real radiographs: study-level AUROC
per part, and body-part accuracy per source and part (never only pooled)."""

from __future__ import annotations

import re

import pytest
from conftest import BUNDLED, DATA, needs_data, needs_weights

from mura_demo.core.inference import score_images
from mura_demo.core.weights import load_model
from mura_demo.training.data import abnormality_rows, load_splits, model_images
from mura_demo.training.evaluate import body_part_by_group
from mura_demo.training.metrics import auroc, study_scores

pytestmark = [needs_data, needs_weights]


@pytest.fixture(scope="module")
def scored():
    loaded = load_model(str(BUNDLED))
    if "held_out" not in loaded.config.metrics:
        pytest.skip("config.json has no held-out metrics yet (run `python -m mura_demo evaluate --card`)")
    samples = load_splits(DATA)["test"]  # MURA valid, the elbow test share, the UNIFESP test share
    config = loaded.config
    bp, ab = score_images(loaded.model, config, *model_images(samples, config))
    return config, samples, bp, ab


def test_held_out_study_auroc_matches_the_model_card(scored):
    config, samples, _, ab = scored
    card = (BUNDLED / "README.md").read_text()
    rows = abnormality_rows(samples, config.body_parts)
    for part, numbers in config.metrics["held_out"].items():
        idx, col = rows[part], config.body_parts.index(part)
        _, y, p = study_scores([samples[i].study for i in idx], [samples[i].abnormal for i in idx], ab[idx, col])
        measured = auroc(y, p)
        assert measured == pytest.approx(numbers["study_auroc"], abs=0.01), part
        assert len(y) == numbers["studies"]
        # the card's YAML metadata states the same figure, for the held-out set it names
        pattern = rf"name: '{re.escape(numbers['set'])}'.*?value: ([0-9.]+)\}}"
        assert float(re.search(pattern, card, re.S).group(1)) == pytest.approx(measured, abs=0.01)


def test_body_part_per_source_and_part_matches_the_model_card(scored):
    config, samples, bp, _ = scored
    card = (BUNDLED / "README.md").read_text()
    measured = body_part_by_group(config, samples, bp)
    assert measured.keys() == config.metrics["body_part_by_group"].keys()
    for group, stated in config.metrics["body_part_by_group"].items():
        assert measured[group]["images"] == stated["images"], group
        assert measured[group]["accuracy"] == pytest.approx(stated["accuracy"], abs=0.01), group
        assert f"| {group} | {stated['images']} | {stated['accuracy']:.1%} |" in card
    for group in ("mura/forearm", "mura/humerus", "mura/elbow", "unifesp/other"):
        assert group in measured  # every source and part the held-out data has is reported
