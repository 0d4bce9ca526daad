"""The real app, launched with `python app.py` on 127.0.0.1 and called through gradio_client, on
synthetic images with the bundled weights (no shared data needed): the API's contract, its errors,
uploads that do not outlive their requests, and the reading's honesty rules through the API."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from bad_inputs import bad_inputs
from conftest import app_client, doctored_weights, needs_weights, start_app
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from mura_demo.core.checks import MAX_BYTES
from mura_demo.core.config import BODY_PARTS
from mura_demo.core.explain import METHODS
from mura_demo.serving.reading import NOT_UPPER_EXTREMITY
from mura_demo.serving.report import PAGE

pytestmark = needs_weights


def call(client, *args, api_name):
    return client.predict(handle_file(str(args[0])), *args[1:], api_name=api_name)


def study_call(client, paths, *args, api_name="/predict_study"):
    return client.predict([handle_file(str(p)) for p in paths], *args, api_name=api_name)


@pytest.fixture(scope="module")
def doctored_app(tmp_path_factory):
    """Start apps on doctored copies of the bundled weights (routing known in advance); stopped at the end."""
    started = []

    def start(favoured, **config_changes):
        folder = doctored_weights(tmp_path_factory.mktemp("w") / "weights", favoured, config_changes)
        log = tmp_path_factory.mktemp("log") / "app.log"
        proc, client, _ = start_app({"MURA_DEMO_WEIGHTS": str(folder)}, log)
        started.append(proc)
        return client

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def forearm_app(doctored_app):
    """An app whose head calls every image forearm, on weights that ask the user to confirm a detected part."""
    return doctored_app("forearm", body_part_confirmation=True, body_part_confirmation_reason="named 40% right")


def test_public_api_is_the_four_documented_endpoints(app):
    """The UI's own events stay private: a client sees exactly the documented endpoints."""
    client = app[0]
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/predict", "/explain", "/predict_study", "/report"}
    assert [p["parameter_name"] for p in endpoints["/explain"]["parameters"]] == ["upload", "body_part", "method"]


def test_predict_answers_every_field(app, images):
    client = app[0]
    result = call(client, images["a"], "auto", api_name="/predict")
    assert set(result) >= {"body_part", "body_part_status", "body_part_candidates", "validated", "note"}
    assert set(result["body_part_probabilities"]) == {*BODY_PARTS, "other"}
    assert abs(sum(result["body_part_probabilities"].values()) - 1) < 1e-3
    assert result["body_part_source"] == "model" and result["weights_revision"]
    forced = call(client, images["a"], "humerus", api_name="/predict")
    assert forced["body_part"] == "humerus" and forced["body_part_source"] == "user"
    p, t = forced["abnormality_probability"], forced["threshold"]
    assert 0 <= p <= 1 and 0 < t < 1 and forced["verdict"] == ("abnormal" if p >= t else "normal")


def test_a_part_without_training_data_is_not_validated(app, forearm_app, images):
    """Never validated, whatever the network makes of the drawing; the note says why on weights that read it as an
    arm part (on an image read as *other*, that reason comes first)."""
    bundled = call(app[0], images["a"], "wrist", api_name="/predict")
    assert bundled["body_part"] == "wrist" and bundled["validated"] is False and bundled["note"]
    result = call(forearm_app, images["a"], "wrist", api_name="/predict")
    assert result["body_part"] == "wrist" and result["validated"] is False
    assert "not validated for wrist" in result["note"]


def test_threshold_through_the_api(app, images):
    client = app[0]
    p = call(client, images["a"], "humerus", api_name="/predict")["abnormality_probability"]
    for t in (max(0.01, p - 0.05), min(0.99, p + 0.05)):
        result = call(client, images["a"], "humerus", t, api_name="/predict")
        assert result["threshold"] == pytest.approx(t, abs=1e-4) and result["abnormality_probability"] == p
        assert result["verdict"] == ("abnormal" if p >= t else "normal")
    study = study_call(client, [images["a"]], "humerus", 0.99)["study"]
    assert study["threshold"] == 0.99
    assert study["verdict"] == ("abnormal" if study["abnormality_probability"] >= 0.99 else "normal")
    with pytest.raises(AppError, match="strictly between 0 and 1"):
        call(client, images["a"], "humerus", 1.5, api_name="/predict")


@pytest.mark.parametrize("method", list(METHODS))  # ScoreCAM included: about 40 s on 2 cores
def test_explain_each_method(app, images, method):
    path = call(app[0], images["wide"], "humerus", method, api_name="/explain")
    with Image.open(path) as overlay, Image.open(images["wide"]) as original:
        assert overlay.mode == "RGB"
        w, h = original.size
        assert abs(overlay.size[0] / overlay.size[1] - w / h) < 0.02  # aspect kept


def test_bad_inputs_get_clear_errors_and_server_keeps_serving(app, images, tmp_path):
    client, _, _, log = app
    for name, (data, fragment) in bad_inputs().items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(AppError) as err:
            call(client, path, "auto", api_name="/predict")
        assert fragment.lower() in str(err.value).lower(), name
        assert call(client, images["a"], "auto", api_name="/predict")["verdict"]
    for args, fragment in (
        ((images["a"], "knee"), "Unknown body part 'knee'"),
        ((images["a"], "auto", "magic"), "Unknown method 'magic'"),
    ):
        with pytest.raises(AppError, match=fragment):
            call(client, *args, api_name="/explain" if len(args) == 3 else "/predict")
    # ordinary user errors log one line each: no traceback, no file name
    text = log.read_text()
    assert "Traceback" not in text
    assert text.count("refused a request") >= len(bad_inputs()) + 2
    assert not any(name in text for name in bad_inputs())


def test_uploads_are_not_kept(app, images):
    temp = app[1]
    data = images["c"].read_bytes()
    call(app[0], images["c"], "auto", api_name="/predict")

    def holds_upload(path):
        try:
            return path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data
        except FileNotFoundError:  # the sweeper removed it between listing and reading
            return False

    def kept():  # os.walk, unlike Path.rglob, skips a folder the sweeper removes mid-walk
        return [p for d, _, names in os.walk(temp) for p in (Path(d) / n for n in names) if holds_upload(p)]

    assert kept(), "the upload should be in the temp folder at first"
    deadline = time.time() + 30  # the app runs with MURA_DEMO_UPLOAD_TTL=10 s
    while kept() and time.time() < deadline:
        time.sleep(0.5)
    assert kept() == []


def test_predict_study(app, images):
    study = [images["a"], images["b"], images["c"]]
    result = study_call(app[0], study, "forearm")
    st = result["study"]
    assert len(result["views"]) == len(study) == st["n_views"]
    # the views answered other are left out of the mean, unless every view was: then the forced part reads them all
    kept = [v for i, v in enumerate(result["views"], 1) if i not in st["views_answered_other"]] or result["views"]
    mean = sum(v["abnormality_probability"] for v in kept) / len(kept)
    assert abs(st["abnormality_probability"] - mean) < 1e-3
    assert st["verdict"] == ("abnormal" if st["abnormality_probability"] >= st["threshold"] else "normal")
    assert all(v["body_part"] == "forearm" for v in kept)


def test_study_with_a_bad_file_names_it(app, images, tmp_path):
    bad = tmp_path / "view2.png"
    bad.write_bytes(b"")
    with pytest.raises(AppError, match=r"view2\.png: The file is empty"):
        study_call(app[0], [images["a"], bad], "auto")


@pytest.mark.parametrize("kind", ["pdf", "png"])
def test_report_of_a_study(app, images, kind):
    path = study_call(app[0], [images["a"], images["b"]], "forearm", kind, api_name="/report")
    assert path.endswith(f"mura-demo-report.{kind}")
    data = Path(path).read_bytes()
    if kind == "pdf":
        assert data[:5] == b"%PDF-" and len(data) > 20_000
    else:
        with Image.open(path) as page:
            assert page.size == PAGE


def test_report_rejects_unknown_format(app, images):
    with pytest.raises(AppError, match="Unknown report format 'docx'"):
        study_call(app[0], [images["a"]], "auto", "docx", api_name="/report")


def test_upload_size_limit(app, images, tmp_path):
    """The one upload limit (checks.MAX_BYTES): the client refuses a larger file, and so does the server."""
    import httpx

    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\x00" * (MAX_BYTES + 2**20))
    with pytest.raises(ValueError, match=f"exceeds the maximum file size of {MAX_BYTES} bytes"):
        call(app[0], big, "auto", api_name="/predict")
    with open(big, "rb") as fh:
        answer = httpx.post(f"{app[2]}gradio_api/upload", files={"files": ("big.png", fh)}, timeout=60)
    assert answer.status_code == 413
    assert call(app[0], images["a"], "auto", api_name="/predict")["verdict"]


def test_concurrent_identical_uploads_all_succeed(app, images):
    """Gradio stores identical uploads at one path: no request may pull it from under another."""
    url = app[2]
    errors = []

    def user():
        c = app_client(url)
        for _ in range(3):
            try:
                call(c, images["b"], "humerus", "gradcam", api_name="/explain")
            except Exception as err:
                errors.append(repr(err))

    threads = [threading.Thread(target=user) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_honesty_when_detection_alone_is_not_trusted(forearm_app, images):
    """Weights that ask for confirmation: a detected part is never validated until the user names it."""
    detected = call(forearm_app, images["a"], "auto", api_name="/predict")
    assert detected["body_part"] == "forearm" and detected["body_part_status"] == "needs confirmation"
    assert detected["validated"] is False and "Confirm the body part (choose forearm)" in detected["note"]
    assert "named 40% right" in detected["note"]
    confirmed = call(forearm_app, images["a"], "forearm", api_name="/predict")
    assert confirmed["validated"] is True and confirmed["note"] == ""
    study = study_call(forearm_app, [images["a"], images["b"]], "auto")["study"]
    assert study["body_part_status"] == "needs confirmation" and study["validated"] is False


def test_honesty_when_the_image_is_no_arm(doctored_app, images):
    """Weights whose head calls everything 'other': no reading unless forced, and a forced one is not validated."""
    client = doctored_app("other")
    auto = call(client, images["a"], "auto", api_name="/predict")
    assert auto["verdict"] == NOT_UPPER_EXTREMITY and auto["abnormality_probability"] is None
    forced = call(client, images["a"], "forearm", api_name="/predict")
    assert forced["validated"] is False and "not an upper-extremity radiograph" in forced["note"]
    with pytest.raises(AppError, match="not look like an upper-extremity"):
        call(client, images["a"], "auto", "gradcam", api_name="/explain")
    study = study_call(client, [images["a"], images["b"]], "humerus")["study"]
    assert study["body_part"] == "humerus" and study["validated"] is False


def test_honesty_when_the_part_is_a_tie(doctored_app, images):
    """Weights whose head cannot tell forearm from humerus: uncertain, the candidates named, not validated."""
    client = doctored_app(("forearm", "humerus"))
    result = call(client, images["a"], "auto", api_name="/predict")
    assert result["body_part_status"] == "uncertain" and result["validated"] is False
    assert set(result["body_part_candidates"][:2]) == {"forearm", "humerus"} and "uncertain" in result["note"]
