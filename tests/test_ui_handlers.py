"""What the page does, through its handlers alone (no browser, no layout): a reading, a bad file, a
cleared upload, a new threshold, the confirm click, another body part and the report."""

from __future__ import annotations

import gradio as gr
import pytest
from conftest import doctored_weights, needs_weights

from mura_demo.core.weights import load_model
from mura_demo.serving.predictor import Predictor
from mura_demo.serving.ui import START_TEXT, Handlers

pytestmark = needs_weights
SETTINGS = ("auto", ["gradcam"], 0.5, "jet", 0.0)  # body part, methods, opacity, colour map, threshold


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    folder = doctored_weights(tmp_path_factory.mktemp("w") / "forearm", "forearm", {
        "body_part_confirmation": True, "body_part_confirmation_reason": "named 40% right"
    })  # fmt: skip
    return Handlers(Predictor(load_model(str(folder))))


def test_an_upload_is_read_and_analysed(handlers, images, monkeypatch, tmp_path):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    stored, summary, parts, views, gallery, raw, analysis, confirm = handlers.upload([str(images["a"])], *SETTINGS)
    assert stored == [images["a"].read_bytes()]
    assert summary.startswith("### ") and "Body part: forearm (needs confirmation" in summary
    assert parts["forearm"] > 0.99 and "| 1 | forearm 100% | forearm |" in views
    assert len(gallery) == 1 and gallery[0][1] == "1 · Grad-CAM"
    assert raw == analysis.study and confirm["visible"] and confirm["value"] == "Confirm body part: forearm"
    assert handlers.confirm(analysis) == "forearm"  # the click names the detected part as the user's choice
    # the dropdown then reads the reading on screen again at the named part, maps kept
    chosen = handlers.analyse(stored, "forearm", ["gradcam"], 0.5, "jet", 0.0, shown=analysis)
    assert "Validated reading: yes" in chosen[0] and chosen[-1]["visible"] is False
    assert chosen[-2].views[0].maps["gradcam"] is analysis.views[0].maps["gradcam"]
    assert handlers.analyse(stored, "forearm", ["gradcam"], 0.5, "jet", 0.0)[0] == chosen[0]  # afresh: the same


def test_a_bad_file_is_said_in_the_reading_and_nothing_else_shows(handlers, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not an image" * 10)
    stored, summary, parts, views, gallery, raw, analysis, confirm = handlers.upload([str(bad)], *SETTINGS)
    assert stored is not None and summary.startswith("### Cannot analyse this") and "not an image" in summary
    assert (parts, views, gallery, raw, analysis, confirm["visible"]) == (None, "", [], None, None, False)
    cleared = handlers.upload(None, *SETTINGS)
    assert cleared[0] is None and cleared[1] == START_TEXT


def test_a_new_threshold_and_the_report_use_the_reading_on_screen(handlers, images, monkeypatch, tmp_path):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    analysis = handlers.upload([str(images["b"])], *SETTINGS)[-2]
    summary, views, study, redecided = handlers.rethreshold(analysis, 0.01)
    assert study["verdict"] == "abnormal" and "Decision threshold: 0.010" in summary and "abnormal |" in views
    report = handlers.report_on_screen(redecided, 0.5, "jet", "png")
    assert report["visible"] and report["value"].endswith("mura-demo-report.png")
    with pytest.raises(gr.Error, match="no reading on screen"):
        handlers.report_on_screen(None, 0.5, "jet", "pdf")
