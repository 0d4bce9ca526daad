"""The pipeline without Gradio, on synthetic images and the bundled weights: studies, test-time flips,
the body-part view, maps, thresholds and the report."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from conftest import backbone_passes, doctored_weights, images_through, needs_weights
from PIL import Image

from mura_demo.core.checks import ImageInputError, RequestError
from mura_demo.core.imaging import load_image
from mura_demo.core.inference import model_logits, score_body_parts, score_images
from mura_demo.core.model import BodyPartPair
from mura_demo.core.preprocess import equalized_view, letterbox, to_model_input
from mura_demo.core.weights import load_model
from mura_demo.serving.predictor import MAX_VIEWS, Predictor
from mura_demo.serving.reading import NEEDS_CONFIRMATION, UNCERTAIN
from mura_demo.serving.report import PAGE, VERDICT_COLOURS, render_report, save_report

pytestmark = needs_weights


@pytest.fixture(scope="module")
def study(images):
    return [images["a"], images["b"], images["c"]]


@pytest.fixture(scope="module")
def forearm_predictor(tmp_path_factory):
    """The bundled network with its body-part head doctored to answer forearm for every image."""
    return Predictor(load_model(str(doctored_weights(tmp_path_factory.mktemp("w") / "forearm", "forearm"))))


def predictor_with(predictor, **config_changes) -> Predictor:
    loaded = copy.copy(predictor.loaded)
    loaded.config = dataclasses.replace(predictor.config, **config_changes)
    return Predictor(loaded)


def full_row(model, x: torch.Tensor) -> torch.Tensor:
    """The model's output row with every column read from ``x`` by one plain pass (a pair's own forward pass leaves
    the body-part columns to its body-part network)."""
    row = model(x)
    if isinstance(model, BodyPartPair):
        row = torch.cat([model.body_part_logits(x), model.config.split_logits(row)[1]], 1)
    return row


def answer_logits(predictor: Predictor, x: torch.Tensor) -> torch.Tensor:
    """The model's answer for ``x`` as its config asks (mirror, body-part view), without gradients."""
    with torch.no_grad():
        return model_logits(predictor.model, predictor.config, x)


def test_flip_averages_logits_of_image_and_mirror(predictor, images):
    plain = predictor_with(predictor, test_time_flip=False, body_part_input_size=None, body_part_equalized_view=False)
    flipping = predictor_with(plain, test_time_flip=True)
    x, _ = to_model_input(load_image(images["a"]), predictor.config)
    with torch.no_grad():
        expected = (full_row(predictor.model, x) + full_row(predictor.model, x.flip(-1))) / 2
        assert torch.allclose(answer_logits(plain, x), full_row(predictor.model, x), atol=1e-5)
    assert torch.allclose(answer_logits(flipping, x), expected, atol=1e-5)
    without = plain.predict(images["a"], "humerus").abnormality_probability
    flipped = flipping.predict(images["a"], "humerus").abnormality_probability
    assert flipped == round(float(torch.sigmoid(expected[0, predictor.config.abnormality_index("humerus")])), 4)
    # the maps path gives the same answer as the forward-only path, flips included
    assert flipping.analyze(images["a"], "humerus").prediction.abnormality_probability == flipped
    assert flipped != without


def test_body_part_is_read_from_the_coarser_view(predictor, images):
    size = 160
    coarse = predictor_with(predictor, test_time_flip=True, body_part_input_size=size, body_part_equalized_view=False)
    full = predictor_with(coarse, body_part_input_size=None)
    x, _ = to_model_input(load_image(images["a"]), predictor.config)
    small = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    split = predictor.config.split_logits
    answer, at_full_size = answer_logits(coarse, x), answer_logits(full, x)
    with torch.no_grad():
        small_logits = (full_row(predictor.model, small) + full_row(predictor.model, small.flip(-1))) / 2
    assert torch.allclose(split(answer)[0], split(small_logits)[0], atol=1e-5)
    assert torch.allclose(split(answer)[1], split(at_full_size)[1], atol=1e-5)
    assert not torch.allclose(split(answer)[0], split(at_full_size)[0], atol=1e-3)
    # the maps path routes and answers from the same coarse body-part view
    predicted = coarse.predict(images["a"])
    analysis = coarse.analyze(images["a"])
    assert analysis.prediction.body_part_probabilities == predicted.body_part_probabilities
    assert analysis.prediction.abnormality_probability == predicted.abnormality_probability


def test_the_equalized_view_joins_the_body_part_only_and_ignores_grey_levels(predictor, images):
    """With the equalised view, the body-part logits are the mean of the image's and its equalised view's; the
    abnormality logits are untouched; the view is the same whatever monotonic change of grey levels came before."""
    plain = predictor_with(predictor, test_time_flip=False, body_part_input_size=None, body_part_equalized_view=False)
    viewing = predictor_with(plain, body_part_equalized_view=True)
    x, _ = to_model_input(load_image(images["a"]), predictor.config)
    split = predictor.config.split_logits
    view = equalized_view(x, predictor.config)
    assert torch.equal(view, equalized_view(x**3 * 0.5 + 0.2, predictor.config))
    with torch.no_grad():
        expected = (split(full_row(predictor.model, x))[0] + split(full_row(predictor.model, view))[0]) / 2
    answer, before = answer_logits(viewing, x), answer_logits(plain, x)
    assert torch.allclose(split(answer)[0], expected, atol=1e-5)
    assert torch.allclose(split(answer)[1], split(before)[1], atol=1e-5)
    assert not torch.allclose(split(answer)[0], split(before)[0], atol=1e-3)
    predicted, analysis = viewing.predict(images["a"]), viewing.analyze(images["a"])
    assert analysis.prediction.body_part_probabilities == predicted.body_part_probabilities


def test_a_network_trained_on_equalized_images_reads_the_body_part_from_them_alone(predictor, images):
    """With ``body_part_equalized_input`` the body part is read from the equalised view alone (and its mirror), so
    no monotonic change of grey levels moves it; the abnormality is read from the image as before; the config
    refuses to average that view with a plain one it never trained on."""
    plain = predictor_with(predictor, test_time_flip=True, body_part_input_size=None, body_part_equalized_view=False)
    reading = predictor_with(plain, body_part_equalized_input=True)
    x, _ = to_model_input(load_image(images["a"]), predictor.config)
    split, view = predictor.config.split_logits, equalized_view(x, predictor.config)
    with torch.no_grad():
        expected = (split(full_row(predictor.model, view))[0] + split(full_row(predictor.model, view.flip(-1)))[0]) / 2
    answer = answer_logits(reading, x)
    assert torch.allclose(split(answer)[0], expected, atol=1e-5)
    assert torch.allclose(split(answer)[1], split(answer_logits(plain, x))[1], atol=1e-5)
    assert torch.allclose(split(answer_logits(reading, x**3 * 0.5 + 0.2))[0], expected, atol=1e-5)
    alone = score_body_parts(reading.model, reading.config, ((x[:, :1] + 1) * 127.5).round().to(torch.uint8))
    assert torch.allclose(alone, split(answer)[0].softmax(1), atol=1e-5)
    with pytest.raises(ValueError, match="no plain view to average"):
        dataclasses.replace(predictor.config, body_part_equalized_input=True, body_part_equalized_view=True).check()


def test_a_pair_reads_each_network_at_the_size_it_was_trained_at(predictor, images):
    """A pair whose abnormality network reads a larger letterbox than its body-part network: the body part is read
    from the body-part network's own letterbox (so every figure measured for that reading holds), never from the
    larger image; the abnormality and the maps come from the larger letterbox."""
    config = predictor.config
    if not config.separate_body_part_network:
        pytest.skip("the bundled weights hold one network: a size per network is a pair's")
    loaded = copy.copy(predictor.loaded)
    loaded.model = copy.deepcopy(predictor.model)
    larger = config.input_size + 32
    loaded.config = loaded.model.config = dataclasses.replace(
        config, input_size=larger, body_part_letterbox_size=config.input_size
    )
    sized = Predictor(loaded)
    with backbone_passes(sized.model) as seen:
        analysis = sized.analyze(images["a"], methods=("gradcam", "saliency"))
    assert images_through(seen, "body_part") == images_through(seen, "body_part", config.input_size) > 0
    assert images_through(seen, "abnormality") == images_through(seen, "abnormality", larger) > 0
    same = predictor.analyze(images["a"], methods=()).scores.body_part  # the body-part network's own reading
    assert analysis.scores.body_part == pytest.approx(same, abs=1e-6)  # to float rounding: passes batched otherwise
    x, _ = to_model_input(load_image(images["a"]), sized.config)
    with torch.no_grad():
        abnormal = config.split_logits((sized.model(x) + sized.model(x.flip(-1))) / 2)[1].sigmoid()[0]
        assert config.split_logits(sized.model(x))[0].isnan().all()  # never a body part read at the wrong size
    assert [analysis.scores.abnormality[p] for p in config.body_parts] == pytest.approx(abnormal.tolist(), abs=1e-5)
    assert all(m.shape == (larger, larger) for m in analysis.maps.values())
    with pytest.raises(ValueError, match=f"letterboxed at {config.input_size} px"):
        model_logits(sized.model, sized.config, x)  # the body part's own letterbox is not optional


@pytest.mark.parametrize(("flip", "coarse_size", "equalized"), [(False, None, False), (True, None, True),
                                                             (True, 160, False), (True, 160, True)])  # fmt: skip
def test_body_parts_alone_match_the_full_answer_from_fewer_passes(predictor, images, flip, coarse_size, equalized):
    """Finalize and the probes score the body part alone: the same probabilities as the full answer's, without the
    passes only the abnormality reads (a single network's full-size image and mirror when the part has a coarser
    view; a pair's body-part network runs only its view's passes either way)."""
    reading = predictor_with(predictor, test_time_flip=flip, body_part_input_size=coarse_size,
                             body_part_equalized_view=equalized)  # fmt: skip
    size = reading.config.input_size
    batch = torch.stack([torch.from_numpy(np.asarray(letterbox(load_image(images[k]), size)[0]).copy())[None]
                         for k in ("a", "b", "c")])  # fmt: skip
    reading.model.train()  # scoring runs during training too: eval mode for the passes, the caller's mode back
    try:
        with backbone_passes(reading.model) as seen:
            full = score_images(reading.model, reading.config, batch)[0]
        full_images = images_through(seen, "body_part")
        with backbone_passes(reading.model) as seen:
            alone = score_body_parts(reading.model, reading.config, batch)
        assert reading.model.training
    finally:
        reading.model.eval()
    assert torch.allclose(alone, full, atol=1e-5)
    assert images_through(seen, "body_part", size) == (0 if coarse_size else len(batch) * (1 + flip) * (1 + equalized))
    pair = reading.config.separate_body_part_network
    plain_passes = len(batch) * (1 + flip) if coarse_size and not pair else 0  # the full answer's own, unread
    assert images_through(seen, "body_part") == full_images - plain_passes
    if pair:
        assert images_through(seen, "abnormality") == 0  # the abnormality network does not run at all


@pytest.mark.parametrize(("coarse_size", "equalized"), [(None, False), (224, False), (None, True), (224, True)])
def test_maps_alone_run_only_the_passes_they_need(forearm_predictor, images, coarse_size, equalized):
    """`/explain` serves maps alone: they must equal the full analysis's, from fewer images through the
    network (no mirror for the abnormality probability; no body-part view when the part is given)."""
    flipping = predictor_with(forearm_predictor, test_time_flip=True, body_part_input_size=coarse_size,
                              body_part_equalized_view=equalized)  # fmt: skip
    for part in ("auto", "humerus"):
        with backbone_passes(flipping.model) as seen:
            full = flipping.analyze(images["a"], part, ("gradcam", "saliency"))
        full_passes = images_through(seen, "body_part")
        with backbone_passes(flipping.model) as seen:
            alone = flipping.explain(images["a"], part, ("gradcam", "saliency"))
        assert alone.maps.keys() == full.maps.keys() == {"gradcam", "saliency"} and alone.box == full.box
        for method, cam in full.maps.items():
            np.testing.assert_allclose(alone.maps[method], cam, atol=1e-5)
        views = 2 if equalized else 0
        if flipping.config.separate_body_part_network:
            # a pair: the abnormality network runs the shared pass alone; the body-part network only what routing
            # "auto" reads the part from (its view and mirror in one batch; the equalised view's two when asked for)
            assert images_through(seen, "body_part") == (2 + views if part == "auto" else 0)
            assert images_through(seen, "abnormality") == 1
            # one view: the body part's passes without gradients, the same for a given part
            assert full_passes == 2 + views
            continue
        # one network: the shared pass, plus what routing "auto" reads the part from (the mirror image or the
        # coarse view and its mirror; the equalised view and its mirror when asked for)
        routing = 0 if part != "auto" else (2 if coarse_size else 1) + views
        assert images_through(seen, "body_part") == images_through(seen, "abnormality") == 1 + routing
        # one view: the mirror (and both at the coarse size, and the equalised view's two) without gradients,
        # then the shared pass, whose forward is also the image's own pass of the answer
        assert full_passes == 1 + (2 if coarse_size else 0) + views + 1


def test_no_maps_for_an_image_the_head_calls_other(tmp_path, images):
    other = Predictor(load_model(str(doctored_weights(tmp_path / "other", "other"))))
    assert not other.explain(images["a"], "auto").maps  # not an arm: nothing to explain
    analysis = other.analyze(images["a"])
    assert analysis.maps == {} and analysis.prediction.body_part is None
    assert other.explain(images["a"], "forearm", ("gradcam",)).maps  # a part given: explained anyway


def test_study_reads_every_view_at_the_study_part(forearm_predictor, study):
    analysis = forearm_predictor.analyze_study(study, "auto", ("gradcam", "saliency"))
    st = analysis.study
    assert st["n_views"] == len(study) == len(analysis.views) == 3
    assert st["body_part"] == "forearm" and st["views_answered_other"] == []
    for view, path in zip(analysis.views, study):
        assert view.prediction.body_part == "forearm" and set(view.maps) == {"gradcam", "saliency"}
        alone = forearm_predictor.predict(path, "forearm")
        assert abs(view.prediction.abnormality_probability - alone.abnormality_probability) < 1e-4
    mean = np.mean([v.prediction.abnormality_probability for v in analysis.views])
    assert abs(st["abnormality_probability"] - mean) < 1e-3
    assert analysis.to_dict() == forearm_predictor.analyze_study(study, "auto", ()).to_dict()


def test_a_new_threshold_reads_as_a_fresh_analysis_at_it(forearm_predictor, study, tmp_path):
    """Moving the threshold re-decides the reading on screen without the model; the result must be what
    analysing again at that threshold gives, the verdicts following the probabilities shown."""
    analysis = forearm_predictor.analyze_study(study, "auto", ("gradcam",))
    before = analysis.to_dict()
    views = [v.prediction.abnormality_probability for v in analysis.views]
    probabilities = sorted({*views, analysis.study["abnormality_probability"]})
    for threshold in [None, 0.01, 0.99, *probabilities, *(p + 1e-4 for p in probabilities)]:
        fresh = forearm_predictor.analyze_study(study, "auto", (), threshold)  # maps do not enter the reading
        assert forearm_predictor.revise(analysis, "auto", ("gradcam",), threshold).to_dict() == fresh.to_dict()
    assert forearm_predictor.revise(analysis, "auto", (), 0.01).study["verdict"] == "abnormal"
    assert forearm_predictor.revise(analysis, "auto", (), 0.99).study["verdict"] == "normal"
    assert analysis.to_dict() == before  # the analysis it started from is left as it was
    other = Predictor(load_model(str(doctored_weights(tmp_path / "other", "other"))))
    chest = other.analyze_study(study[:1], "auto", ())
    assert other.revise(chest, "auto", (), 0.3).to_dict() == other.analyze_study(study[:1], "auto", (), 0.3).to_dict()
    with pytest.raises(RequestError, match="strictly between 0 and 1"):
        forearm_predictor.revise(analysis, "auto", (), 1.5)


def test_another_part_or_method_reads_as_a_fresh_analysis_without_the_network(forearm_predictor, study):
    """The confirm click, another body part and another method revise the reading on screen: the same
    reading and maps as a fresh analysis, from no forward pass of the answer's and no map drawn twice."""
    confirming = predictor_with(forearm_predictor, body_part_confirmation=True, body_part_confirmation_reason="x")
    with backbone_passes(confirming.model) as passes:
        detected = confirming.analyze_study(study, "auto", ("gradcam", "saliency"))
        assert detected.study["body_part_status"] == NEEDS_CONFIRMATION and detected.study["validated"] is False
        passes.clear()
        confirmed = confirming.revise(detected, "forearm", ("gradcam", "saliency"))
        assert passes == []  # the confirm click: no network runs at all
        assert confirmed.study["validated"] is True and confirmed.body_part == "forearm"
        for before, after in zip(detected.views, confirmed.views):
            assert all(after.maps[m] is before.maps[m] for m in ("gradcam", "saliency"))
        humerus = confirming.revise(confirmed, "humerus", ("gradcam", "gradcam++"))
        # one shared pass a view for the new part's maps, no answer pass
        assert images_through(passes, "abnormality") == len(study)
        plus = confirming.revise(humerus, "humerus", ("gradcam++", "gradcam", "saliency"))
        assert images_through(passes, "abnormality") == 2 * len(study)  # only saliency was missing
        assert all(list(v.maps) == ["gradcam++", "gradcam", "saliency"] for v in plus.views)
    fresh = confirming.analyze_study(study, "humerus", ("gradcam++", "gradcam", "saliency"))
    assert plus.to_dict() == fresh.to_dict()
    for revised, new in zip(plus.views, fresh.views):
        for method, cam in new.maps.items():
            np.testing.assert_allclose(revised.maps[method], cam, atol=1e-5)


def test_the_weights_rules_reach_the_reading(forearm_predictor, images, tmp_path):
    """The config's confirmation rule and confidence level decide what a detection earns."""
    confirming = predictor_with(forearm_predictor, body_part_confirmation=True, body_part_confirmation_reason="x")
    p = confirming.predict(images["a"])
    assert p.body_part_status == NEEDS_CONFIRMATION and p.validated is False
    assert confirming.predict(images["a"], "forearm").validated is True
    torn = Predictor(load_model(str(doctored_weights(tmp_path / "tie", ("forearm", "humerus")))))
    for level in (0.0, 0.6):  # a tie is uncertain at any level; 50% is also under 60%
        p = predictor_with(torn, body_part_min_probability=level).predict(images["a"])
        assert p.body_part_status == UNCERTAIN and p.validated is False
        assert set(p.body_part_candidates[:2]) == {"forearm", "humerus"}


def test_request_errors_name_what_is_wrong(predictor, study):
    with pytest.raises(ImageInputError, match="File 2 of 2: The file is empty"):
        predictor.analyze_study([study[0], b""], "auto")
    with pytest.raises(ImageInputError, match=f"at most {MAX_VIEWS} views"):
        predictor.analyze_study([study[0]] * (MAX_VIEWS + 1), "auto", ())
    with pytest.raises(RequestError, match="Unknown body part 'knee'"):
        predictor.predict(study[0], "knee")
    with pytest.raises(RequestError, match="Unknown method 'magic'"):
        predictor.explain(study[0], "auto", ("magic",))
    assert not issubclass(RequestError, ImageInputError)  # a bad option is not a bad image


def test_report_page_shows_the_verdict_and_every_picture(forearm_predictor, study, tmp_path):
    methods = ("gradcam", "gradcam++", "saliency")
    analysis = forearm_predictor.analyze_study(study, "auto", methods)
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
