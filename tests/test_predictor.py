"""The pipeline without Gradio: studies, test-time flips, the body-part view and the report, on real radiographs."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from conftest import needs_data, needs_weights
from PIL import Image

from mura_demo.imaging import ImageInputError, load_image
from mura_demo.predictor import MAX_VIEWS, Predictor
from mura_demo.preprocess import to_model_input
from mura_demo.report import PAGE, VERDICT_COLOURS, render_report, save_report

pytestmark = [needs_weights, needs_data]


@pytest.fixture(scope="module")
def study(radiographs):
    return sorted(radiographs["forearm"].parent.glob("*.png"))


def predictor_with(predictor, **config_changes) -> Predictor:
    loaded = copy.copy(predictor.loaded)
    loaded.config = dataclasses.replace(predictor.config, **config_changes)
    return Predictor(loaded)


def test_flip_averages_logits_of_image_and_mirror(predictor, radiographs):
    plain = predictor_with(predictor, test_time_flip=False, body_part_input_size=None)
    flipping = predictor_with(predictor, test_time_flip=True, body_part_input_size=None)
    image = load_image(radiographs["humerus"])
    x, _ = to_model_input(image, predictor.config)
    with torch.no_grad():
        expected = (predictor.model(x) + predictor.model(x.flip(-1))) / 2
        assert torch.allclose(plain.input_logits(x), predictor.model(x), atol=1e-5)
    assert torch.allclose(flipping.input_logits(x), expected, atol=1e-5)
    without = plain.predict(radiographs["humerus"], "humerus").abnormality_probability
    flipped = flipping.predict(radiographs["humerus"], "humerus").abnormality_probability
    # the maps path gives the same answer as the forward-only path, flips included
    assert flipping.analyze(radiographs["humerus"], "humerus").prediction.abnormality_probability == flipped
    assert flipped != without


def test_body_part_is_read_from_the_coarser_view(predictor, radiographs):
    size = 160
    coarse = predictor_with(predictor, test_time_flip=True, body_part_input_size=size)
    full = predictor_with(predictor, test_time_flip=True, body_part_input_size=None)
    x, _ = to_model_input(load_image(radiographs["forearm"]), predictor.config)
    small = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    n_parts = len(predictor.config.body_part_classes)
    answer, at_full_size = coarse.input_logits(x), full.input_logits(x)
    with torch.no_grad():
        small_logits = (predictor.model(small) + predictor.model(small.flip(-1))) / 2
    assert torch.allclose(answer[:, :n_parts], small_logits[:, :n_parts], atol=1e-5)
    assert torch.allclose(answer[:, n_parts:], at_full_size[:, n_parts:], atol=1e-5)
    assert not torch.allclose(answer[:, :n_parts], at_full_size[:, :n_parts], atol=1e-3)
    # the maps path routes and answers from the same coarse body-part view
    predicted = coarse.predict(radiographs["forearm"])
    analysis = coarse.analyze(radiographs["forearm"])
    assert analysis.prediction.body_part_probabilities == predicted.body_part_probabilities
    assert analysis.prediction.abnormality_probability == predicted.abnormality_probability


@pytest.mark.parametrize("coarse_size", [None, 224])
def test_maps_alone_run_only_the_passes_they_need(predictor, radiographs, coarse_size):
    """`/explain` serves maps alone: they must equal the full analysis's, from fewer images through the
    network (no mirror for the abnormality probability; no body-part view when the part is given)."""
    flipping = predictor_with(predictor, test_time_flip=True, body_part_input_size=coarse_size)
    seen = []
    hook = predictor.model.register_forward_hook(lambda _m, args, _out: seen.append(len(args[0])))
    try:
        for name, part in [("forearm", "auto"), ("humerus", "humerus"), ("chest", "auto"), ("chest", "forearm")]:
            seen.clear()
            full = flipping.analyze(radiographs[name], part, ("gradcam", "saliency"))
            full_passes, seen[:] = sum(seen), []
            alone = flipping.explain(radiographs[name], part, ("gradcam", "saliency"))
            assert alone.maps.keys() == full.maps.keys() and alone.box == full.box
            for method, cam in full.maps.items():
                np.testing.assert_allclose(alone.maps[method], cam, atol=1e-5)
            # images through the network: the shared pass, plus what routing "auto" reads the part from
            routing = 0 if part != "auto" else 2 if coarse_size else 1
            assert sum(seen) == 1 + routing
            assert full_passes == 2 + (2 if coarse_size else 0)  # image and mirror, both again at the coarse size
        assert not flipping.explain(radiographs["chest"], "auto").maps  # not an arm: nothing to explain
    finally:
        hook.remove()


def test_study_reads_every_view_at_the_study_part(predictor, study):
    analysis = predictor.analyze_study(study, "auto", ("gradcam", "saliency"))
    st = analysis.study
    assert st["n_views"] == len(study) == len(analysis.views) >= 2
    assert st["body_part"] == "forearm"
    for view, path in zip(analysis.views, study):
        assert view.prediction.body_part == "forearm" and set(view.maps) == {"gradcam", "saliency"}
        alone = predictor.analyze(path, "forearm", ())
        assert abs(view.prediction.abnormality_probability - alone.prediction.abnormality_probability) < 1e-4
    mean = np.mean([v.prediction.abnormality_probability for v in analysis.views])
    assert abs(st["abnormality_probability"] - mean) < 1e-3
    assert analysis.to_dict() == predictor.analyze_study(study, "auto", ()).to_dict()


def test_a_new_threshold_reads_as_a_fresh_analysis_at_it(predictor, study, radiographs):
    """Moving the threshold re-decides the reading on screen without the model; the result must be what
    analysing again at that threshold gives, the verdicts following the probabilities shown."""
    analysis = predictor.analyze_study(study, "auto", ("gradcam",))
    before = analysis.to_dict()
    views = [v.prediction.abnormality_probability for v in analysis.views]
    probabilities = sorted({*views, analysis.study["abnormality_probability"]})
    for threshold in [None, 0.01, 0.99, *probabilities, *(p + 1e-4 for p in probabilities)]:
        fresh = predictor.analyze_study(study, "auto", (), threshold)  # maps do not enter the reading
        assert predictor.at_threshold(analysis, threshold).to_dict() == fresh.to_dict()
    assert predictor.at_threshold(analysis, 0.01).study["verdict"] == "abnormal"
    assert predictor.at_threshold(analysis, 0.99).study["verdict"] == "normal"
    assert analysis.to_dict() == before  # the analysis it started from is left as it was
    chest = [radiographs["chest"]]
    other = predictor.analyze_study(chest, "auto", ())
    assert predictor.at_threshold(other, 0.3).to_dict() == predictor.analyze_study(chest, "auto", (), 0.3).to_dict()
    with pytest.raises(ImageInputError, match="strictly between 0 and 1"):
        predictor.at_threshold(analysis, 1.5)


def test_study_errors_name_the_file_and_limit_views(predictor, study):
    with pytest.raises(ImageInputError, match="File 2 of 2: The file is empty"):
        predictor.analyze_study([study[0], b""], "auto")
    with pytest.raises(ImageInputError, match=f"at most {MAX_VIEWS} views"):
        predictor.analyze_study([study[0]] * (MAX_VIEWS + 1), "auto", ())


def test_report_page_shows_the_verdict_and_every_picture(predictor, study, tmp_path):
    methods = ("gradcam", "gradcam++", "saliency")
    analysis = predictor.analyze_study(study, "auto", methods)
    page = render_report(analysis)
    assert page.size == PAGE and page.mode == "RGB"
    pixels = np.asarray(page)
    colour = VERDICT_COLOURS[analysis.study["verdict"]]
    verdict_band = pixels[200:360]  # the verdict is written large under the disclaimer
    assert (verdict_band == colour).all(-1).sum() > 200
    # one row per view: the radiograph and its three maps, side by side
    lit = (pixels.astype(int).sum(-1) < 600).sum(0)  # non-white pixels per column of the page
    width = (PAGE[0] - 120) // (1 + len(methods))
    for col in range(1 + len(methods)):
        assert lit[60 + col * width + width // 3] > 100, col
    pdf = save_report(page, tmp_path / "r.pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    png = save_report(page, tmp_path / "r.png")
    with Image.open(png) as im:
        assert im.size == PAGE
    with pytest.raises(ValueError, match="report format"):
        save_report(page, tmp_path / "r.gif")
