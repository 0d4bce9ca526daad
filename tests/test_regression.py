"""The shipped weights still reproduce the model card's study-level AUROC on MURA valid and its body-part accuracy."""

from __future__ import annotations

import json
import re

import pytest
from conftest import BUNDLED, DATA, needs_data, needs_weights

from mura_demo.data import abnormality_rows, load_images, load_splits
from mura_demo.evaluate import body_part_report
from mura_demo.inference import score_images
from mura_demo.metrics import auroc, study_scores
from mura_demo.weights import load_model

pytestmark = [needs_data, needs_weights]


def test_valid_study_auroc_and_body_part_accuracy_match_model_card():
    loaded = load_model(str(BUNDLED))
    config = loaded.config
    claimed = config.metrics.get("valid")
    if not claimed:
        pytest.skip("config.json has no `valid` metrics yet (run `mura-demo evaluate --card`)")
    card = (BUNDLED / "README.md").read_text()
    samples = load_splits(DATA)["test"]  # MURA valid and the UNIFESP test share, as `evaluate` reads them
    bp, ab = score_images(loaded.model, config, load_images(samples, config.input_size))
    rows = abnormality_rows(samples, config.body_parts)
    for part, numbers in claimed.items():
        idx = rows[part]
        col = config.body_parts.index(part)
        _, y, p = study_scores([samples[i].study for i in idx], [samples[i].abnormal for i in idx], ab[idx, col])
        measured = auroc(y, p)
        assert measured == pytest.approx(numbers["study_auroc"], abs=0.01), part
        # the card's YAML metadata states the same figure
        pattern = rf"MURA v1.1 valid \({part}\).*?value: ([0-9.]+)\}}"
        assert float(re.search(pattern, card, re.S).group(1)) == pytest.approx(measured, abs=0.01)
    body = body_part_report(config, samples, bp.numpy())
    stated = re.search(r"Body part: ([0-9.]+) accuracy on (\d+) held-out", card)
    assert int(stated.group(2)) == body["upper_extremity_images"]
    assert body["accuracy_upper_extremity"] == pytest.approx(float(stated.group(1)), abs=0.002)
    assert json.loads((BUNDLED / "config.json").read_text())["trained"] is True
