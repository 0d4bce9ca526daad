"""The real app, launched with `python app.py` on 127.0.0.1 and called through gradio_client."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from bad_inputs import bad_inputs
from conftest import needs_data, needs_weights
from PIL import Image

from mura_demo.config import BODY_PARTS
from mura_demo.explain import METHODS
from mura_demo.report import PAGE

pytestmark = [needs_weights, needs_data]


def call(client, *args, api_name):
    from gradio_client import handle_file

    return client.predict(handle_file(str(args[0])), *args[1:], api_name=api_name)


def test_public_api_is_the_four_documented_endpoints(app):
    """The UI's own events stay private: a client sees exactly the documented endpoints."""
    client, _, _ = app
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/predict", "/explain", "/predict_study", "/report"}
    assert [p["parameter_name"] for p in endpoints["/explain"]["parameters"]] == ["upload", "body_part", "method"]


def test_predict_real_radiographs(app, radiographs):
    client, _, _ = app
    for part in ("forearm", "humerus"):
        result = call(client, radiographs[part], "auto", api_name="/predict")
        assert result["body_part"] in BODY_PARTS and result["body_part_source"] == "model"
        assert set(result["body_part_probabilities"]) == {*BODY_PARTS, "other"}
        assert abs(sum(result["body_part_probabilities"].values()) - 1) < 1e-3
        p, t = result["abnormality_probability"], result["threshold"]
        assert 0 <= p <= 1 and 0 < t < 1
        assert result["verdict"] == ("abnormal" if p >= t else "normal")
        assert isinstance(result["validated"], bool) and result["weights_revision"]


def test_body_part_override(app, radiographs):
    client, _, _ = app
    result = call(client, radiographs["forearm"], "wrist", api_name="/predict")
    assert result["body_part"] == "wrist" and result["body_part_source"] == "user"
    assert result["validated"] is False  # no wrist abnormality data in training


def test_threshold_through_the_api(app, radiographs):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client, _, _ = app
    calibrated = call(client, radiographs["humerus"], "humerus", api_name="/predict")
    p = calibrated["abnormality_probability"]
    for t in (max(0.01, p - 0.05), min(0.99, p + 0.05)):
        result = call(client, radiographs["humerus"], "humerus", t, api_name="/predict")
        assert result["threshold"] == pytest.approx(t, abs=1e-4) and result["abnormality_probability"] == p
        assert result["verdict"] == ("abnormal" if p >= t else "normal")
    study = client.predict([handle_file(str(radiographs["humerus"]))], "humerus", 0.99, api_name="/predict_study")
    assert study["study"]["threshold"] == 0.99
    assert study["study"]["verdict"] == ("abnormal" if study["study"]["abnormality_probability"] >= 0.99 else "normal")
    with pytest.raises(AppError, match="strictly between 0 and 1"):
        call(client, radiographs["humerus"], "humerus", 1.5, api_name="/predict")


def test_non_upper_extremity_gets_no_diagnosis(app, radiographs):
    if "chest" not in radiographs:
        pytest.skip("UNIFESP images not found")
    client, _, _ = app
    result = call(client, radiographs["chest"], "auto", api_name="/predict")
    assert result["verdict"] == "not an upper-extremity radiograph"
    assert result["abnormality_probability"] is None
    with pytest.raises(Exception, match="not look like an upper-extremity"):
        call(client, radiographs["chest"], "auto", "gradcam", api_name="/explain")


@pytest.mark.parametrize("method", METHODS)  # ScoreCAM included: about 40 s on 2 cores
def test_explain_each_method(app, radiographs, method):
    client, _, _ = app
    path = call(client, radiographs["humerus"], "humerus", method, api_name="/explain")
    with Image.open(path) as overlay, Image.open(radiographs["humerus"]) as original:
        assert overlay.mode == "RGB"
        w, h = original.size
        assert abs(overlay.size[0] / overlay.size[1] - w / h) < 0.02  # aspect kept


def test_bad_inputs_get_clear_errors_and_server_keeps_serving(app, radiographs, tmp_path):
    from gradio_client.exceptions import AppError

    client, _, _ = app
    for name, (data, fragment) in bad_inputs().items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(AppError) as err:
            call(client, path, "auto", api_name="/predict")
        assert fragment.lower() in str(err.value).lower(), name
        assert call(client, radiographs["forearm"], "auto", api_name="/predict")["verdict"]
    for args, fragment in (
        ((radiographs["forearm"], "knee"), "Unknown body part"),
        ((radiographs["forearm"], "auto", "magic"), "Unknown method"),
    ):
        with pytest.raises(AppError, match=fragment):
            call(client, *args, api_name="/explain" if len(args) == 3 else "/predict")


def test_uploads_are_not_kept(app, radiographs):
    client, temp, _ = app
    data = radiographs["forearm_2"].read_bytes()
    call(client, radiographs["forearm_2"], "auto", api_name="/predict")

    def holds_upload(path):
        try:
            return path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data
        except FileNotFoundError:  # the sweeper removed it between listing and reading
            return False

    def kept():  # os.walk, unlike Path.rglob, skips a folder the sweeper removes mid-walk
        return [p for d, _, names in os.walk(temp) for p in (Path(d) / n for n in names) if holds_upload(p)]

    deadline = time.time() + 30  # the app runs with MURA_DEMO_UPLOAD_TTL=10 s
    while kept() and time.time() < deadline:
        time.sleep(0.5)
    assert kept() == []


def test_predict_study(app, radiographs):
    from gradio_client import handle_file

    client, _, _ = app
    study = sorted(radiographs["humerus"].parent.glob("*.png"))
    result = client.predict([handle_file(str(p)) for p in study], "auto", api_name="/predict_study")
    assert len(result["views"]) == len(study) == result["study"]["n_views"]
    st = result["study"]
    if st["body_part"] is not None:
        mean = sum(v["abnormality_probability"] for v in result["views"]) / len(study)
        assert abs(st["abnormality_probability"] - mean) < 1e-3
        assert st["verdict"] == ("abnormal" if st["abnormality_probability"] >= st["threshold"] else "normal")
        assert all(v["body_part"] == st["body_part"] for v in result["views"])


def test_study_with_a_bad_file_names_it(app, radiographs, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client, _, _ = app
    bad = tmp_path / "view2.png"
    bad.write_bytes(b"")
    files = [handle_file(str(radiographs["forearm"])), handle_file(str(bad))]
    with pytest.raises(AppError, match=r"view2\.png: The file is empty"):
        client.predict(files, "auto", api_name="/predict_study")


@pytest.mark.parametrize("kind", ["pdf", "png"])
def test_report_of_a_study(app, radiographs, kind):
    from gradio_client import handle_file

    client, _, _ = app
    study = sorted(radiographs["humerus"].parent.glob("*.png"))
    path = client.predict([handle_file(str(p)) for p in study], "auto", kind, api_name="/report")
    assert path.endswith(f"mura-demo-report.{kind}")
    data = Path(path).read_bytes()
    if kind == "pdf":
        assert data[:5] == b"%PDF-" and len(data) > 20_000
    else:
        with Image.open(path) as page:
            assert page.size == PAGE


def test_report_rejects_unknown_format(app, radiographs):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client, _, _ = app
    with pytest.raises(AppError, match="Unknown report format"):
        client.predict([handle_file(str(radiographs["forearm"]))], "auto", "docx", api_name="/report")


def test_upload_size_limit(app, radiographs, tmp_path):
    client, _, _ = app
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\x00" * (30 * 2**20))  # over the 25 MB upload limit
    with pytest.raises(Exception, match=r"(?i)size|large|exceed|413"):
        call(client, big, "auto", api_name="/predict")
    assert call(client, radiographs["forearm"], "auto", api_name="/predict")["verdict"]


def test_concurrent_identical_uploads_all_succeed(app, radiographs):
    """Gradio stores identical uploads at one path: no request may pull it from under another."""
    import threading

    from gradio_client import Client

    _, _, url = app
    errors = []

    def user():
        c = Client(url, verbose=False)
        for _ in range(3):
            try:
                call(c, radiographs["humerus"], "auto", "gradcam", api_name="/explain")
            except Exception as err:
                errors.append(repr(err))

    threads = [threading.Thread(target=user) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
