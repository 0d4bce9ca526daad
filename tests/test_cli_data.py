"""The command line on real files, and the data splits."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import BUNDLED, DATA, ROOT, needs_data, needs_weights
from PIL import Image

from mura_demo.data import load_splits


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mura_demo", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


@needs_data
def test_patients_never_straddle_splits():
    splits = load_splits(DATA)
    patients = {k: {(s.source, s.patient) for s in v} for k, v in splits.items()}
    assert not patients["train"] & patients["holdout"]
    assert not patients["train"] & patients["test"] and not patients["holdout"] & patients["test"]
    assert all("/valid/" in str(s.path) for s in splits["test"] if s.source == "mura")
    assert not any("/valid/" in str(s.path) for s in splits["train"] + splits["holdout"])
    assert 0.1 < len(splits["holdout"]) / (len(splits["train"]) + len(splits["holdout"])) < 0.2


@needs_data
@needs_weights
def test_predict_and_explain_commands(tmp_path, radiographs):
    out = cli("predict", str(radiographs["forearm"]), str(radiographs["humerus"]), "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 2 and all(r["verdict"] in ("normal", "abnormal") for r in rows)
    out = cli("explain", str(radiographs["humerus"]), "--out", str(tmp_path), "--body-part", "humerus")
    assert out.returncode == 0, out.stderr
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 3 and all(Image.open(tmp_path / n).mode == "RGB" for n in written)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    out = cli("predict", str(bad))
    assert out.returncode == 2 and "empty" in out.stderr


@needs_data
@needs_weights
def test_report_command(tmp_path, radiographs):
    study = sorted(radiographs["forearm"].parent.glob("*.png"))
    out = cli("report", *map(str, study), "--out", str(tmp_path / "study.pdf"), "--method", "gradcam,layercam")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "study.pdf").read_bytes()[:5] == b"%PDF-"
    out = cli("report", str(study[0]), "--out", str(tmp_path / "view.png"))
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "view.png").size == (1240, 1754)
    out = cli("report", str(study[0]), "--out", str(tmp_path / "view.docx"))
    assert out.returncode == 2 and "report format" in out.stderr


@needs_weights
def test_upload_dry_run_checks_the_folder():
    out = cli("upload", "team/mura-demo", "--weights", str(BUNDLED), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "would upload model.safetensors" in out.stdout and "would upload README.md" in out.stdout
    size = (BUNDLED / "model.safetensors").stat().st_size
    assert size < 10 * 2**20  # a Hub repo takes it without LFS


@needs_data
@needs_weights
def test_batch_writes_csvs_heatmaps_and_resumes(tmp_path):
    import csv
    import shutil

    tree = tmp_path / "tree"
    studies = sorted((DATA / "MURA-v1.1" / "valid" / "XR_HUMERUS").glob("*/study1_*"))[:2]
    for study in studies:
        shutil.copytree(study, tree / study.parent.name / study.name)
    (tree / "broken.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "out"
    first = cli("batch", str(tree), "--out", str(out), "--method", "gradcam,saliency")
    assert first.returncode == 0, first.stderr
    n_images = sum(len(list(s.glob("*.png"))) for s in studies)
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n_images and all(r["verdict"] in ("normal", "abnormal") for r in rows)
    assert len(list((out / "heatmaps").glob("*.png"))) == 2 * n_images
    assert "broken.png" in (out / "skipped.log").read_text()
    with open(out / "studies.csv", newline="") as fh:
        study_rows = list(csv.DictReader(fh))
    assert len(study_rows) == len(studies)
    assert {r["label"] for r in study_rows} <= {"0", "1"}
    # resuming: images already in predictions.csv are not done again
    second = cli("batch", str(tree), "--out", str(out))
    assert second.returncode == 0 and json.loads(second.stdout.splitlines()[-1])["resumed"] == n_images
    with open(out / "predictions.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == n_images
