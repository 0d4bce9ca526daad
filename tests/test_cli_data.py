"""The command line on files as a user has them (synthetic images, bundled weights), and the data splits."""

from __future__ import annotations

import csv
import dataclasses
import json
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import BUNDLED, DATA, ROOT, doctored_weights, needs_data, needs_weights
from PIL import Image

from mura_demo.cli import build_parser, settings_from
from mura_demo.training.card import reproduce_story, training_command
from mura_demo.training.data import (
    ELBOW_FOLDS,
    ELBOW_TEST_BUCKETS,
    elbow_fold,
    elbow_fold_splits,
    is_elbow_test_patient,
    is_mura_elbow,
    load_splits,
)
from mura_demo.training.settings import TrainSettings
from mura_demo.training.train import mean_state


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mura_demo", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    """Weights whose body-part head calls every image 'other'."""
    return str(doctored_weights(tmp_path_factory.mktemp("w") / "other", "other"))


@needs_data
def test_patients_never_straddle_splits():
    splits = load_splits(DATA)
    patients = {k: {(s.source, s.patient) for s in v} for k, v in splits.items()}
    assert not patients["train"] & patients["holdout"]
    assert not patients["train"] & patients["test"] and not patients["holdout"] & patients["test"]
    mura_test = [s for s in splits["test"] if s.source == "mura"]
    assert all("/valid/" in str(s.path) or s.body_parts == ("elbow",) for s in mura_test)
    assert not any("/valid/" in str(s.path) for s in splits["train"] + splits["holdout"])
    assert 0.1 < len(splits["holdout"]) / (len(splits["train"]) + len(splits["holdout"])) < 0.2


@needs_data
def test_the_elbow_test_share_is_the_fixed_quarter_of_elbow_patients():
    """Carved once, before any elbow training, by a rule written in the code: 48 of the 194 patients."""
    splits = load_splits(DATA)
    elbow = {k: [s for s in v if s.source == "mura" and s.body_parts == ("elbow",)] for k, v in splits.items()}
    test_patients = {s.patient for s in elbow["test"]}
    assert len(test_patients) == 48 and len({s.study for s in elbow["test"]}) == 52 and len(elbow["test"]) == 152
    assert all(is_elbow_test_patient(p) for p in test_patients)
    assert not any(is_elbow_test_patient(s.patient) for s in elbow["train"] + elbow["holdout"])
    assert len(ELBOW_TEST_BUCKETS) == 25
    # their forearm and humerus images are not trained on either
    assert not {s.patient for s in splits["train"] + splits["holdout"] if s.source == "mura"} & test_patients


@needs_data
def test_each_elbow_fold_scores_its_patients_on_a_run_that_never_saw_them():
    """`train --elbow-fold K`: the five folds' elbows together are every non-test elbow once; a fold's patients are
    in no training image of its run; the forearm and humerus holdout stays as it was; the test share stays out."""
    splits = load_splits(DATA)
    elbows = {s.path for s in splits["train"] + splits["holdout"] if is_mura_elbow(s)}
    scored = []
    for k in range(1, ELBOW_FOLDS + 1):
        fold = elbow_fold_splits(splits, k)
        held = [s for s in fold["holdout"] if is_mura_elbow(s)]
        assert held and all(elbow_fold(s.patient) == k for s in held)
        assert not {s.patient for s in held} & {s.patient for s in fold["train"] if s.source == "mura"}
        assert [s for s in fold["holdout"] if not is_mura_elbow(s)] == [
            s for s in splits["holdout"] if not is_mura_elbow(s)
        ]
        assert {s.path for s in fold["train"] if is_mura_elbow(s)} == elbows - {s.path for s in held}
        assert fold["test"] is splits["test"]
        scored += [s.path for s in held]
    assert len(scored) == len(elbows) == 431 and set(scored) == elbows
    with pytest.raises(ValueError, match=r"one of 1\.\.5"):
        elbow_fold_splits(splits, 0)
    with pytest.raises(ValueError, match="--withhold mura:elbow leaves out"):
        TrainSettings(elbow_fold=1, withhold="mura:elbow")


@needs_weights
def test_predict_prints_a_header_and_the_reading(images):
    out = cli("predict", str(images["a"]), str(images["b"]), "--body-part", "humerus")
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split("\t") == ["image", "body_part", "body_part_status", "abnormality_probability", "threshold",
                                  "verdict", "validated"]  # fmt: skip
    rows = [r.split("\t") for r in rows if not r.startswith("  note:")]
    assert [r[0] for r in rows] == [str(images["a"]), str(images["b"])]
    assert all(r[1] == "humerus" and r[5] in ("normal", "abnormal") and r[6] in ("True", "False") for r in rows)


@needs_weights
def test_predict_reads_a_folder_and_json(images):
    out = cli("predict", str(images["a"].parent), "--json", "--body-part", "forearm")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(r["image"] for r in rows) == sorted(str(p) for p in images.values())
    study = cli("predict", str(images["a"]), str(images["b"]), "--study", "--json", "--body-part", "forearm")
    assert json.loads(study.stdout)["study"]["n_views"] == 2


@needs_weights
def test_commands_that_cannot_do_what_was_asked_exit_non_zero(images, tmp_path, other_weights):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    out = cli("predict", str(bad))
    assert out.returncode == 2 and out.stderr.strip() == "mura-demo: The file is empty (0 bytes)."
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    out = cli("predict", str(empty))
    assert out.returncode == 2 and "holds no image" in out.stderr
    out = cli("explain", str(images["a"]), "--out", str(tmp_path / "maps"), "--weights", other_weights)
    assert out.returncode == 2 and "does not look like an upper-extremity radiograph" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "maps").exists()
    out = cli("explain", str(images["a"]), "--out", str(tmp_path / "maps"), "--method", "magic")
    assert out.returncode == 2 and "Unknown method 'magic'" in out.stderr


@needs_weights
def test_explain_writes_one_overlay_per_method(images, tmp_path):
    out = cli("explain", str(images["b"]), "--out", str(tmp_path), "--body-part", "humerus")
    assert out.returncode == 0, out.stderr
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["b_gradcam.png", "b_gradcampp.png", "b_saliency.png"]
    assert all(Image.open(tmp_path / n).mode == "RGB" for n in written)


@needs_weights
def test_report_command(images, tmp_path):
    out = cli("report", str(images["a"]), str(images["b"]), "--out", str(tmp_path / "study.pdf"),
              "--method", "gradcam,layercam", "--body-part", "forearm")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "study.pdf").read_bytes()[:5] == b"%PDF-"
    out = cli("report", str(images["a"]), "--out", str(tmp_path / "view.png"))
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "view.png").size == (1240, 1754)
    out = cli("report", str(images["a"]), "--out", str(tmp_path / "view.docx"))
    assert out.returncode == 2 and "report format" in out.stderr


@needs_weights
def test_upload_dry_run_checks_the_folder():
    out = cli("upload", "team/mura-demo", "--weights", str(BUNDLED), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "would upload model.safetensors" in out.stdout and "would upload README.md" in out.stdout
    size = (BUNDLED / "model.safetensors").stat().st_size
    assert size < 10 * 2**20  # a Hub repo takes it without LFS


def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@needs_weights
def test_batch_groups_studies_only_where_the_layout_says_so(images, tmp_path):
    """A flat folder of unrelated files is one study per file; folders named study* are studies (MURA's
    layout); each study is read by the same rule as /predict_study; an interrupted run resumes."""
    tree = tmp_path / "tree"
    for name in ("a", "b"):
        (tree / "patient1" / "study1_positive").mkdir(parents=True, exist_ok=True)
        (tree / "patient1" / "study1_positive" / f"{name}.png").write_bytes(images[name].read_bytes())
    (tree / "loose_c.png").write_bytes(images["c"].read_bytes())
    (tree / "loose_wide.png").write_bytes(images["wide"].read_bytes())
    (tree / "broken.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "out"
    first = cli("batch", str(tree), "--out", str(out), "--method", "gradcam,saliency", "--body-part", "forearm")
    assert first.returncode == 0, first.stderr
    views, studies = read_csv(out / "predictions.csv"), read_csv(out / "studies.csv")
    assert len(views) == 4 and all(r["verdict"] in ("normal", "abnormal") for r in views)
    assert len(list((out / "heatmaps").glob("*.png"))) == 2 * 4
    assert "broken.png" in (out / "skipped.log").read_text()
    formed = {r["study"]: (r["formed_by"], r["views"], r["label"]) for r in studies}
    assert formed == {
        "patient1/study1_positive": ("folder named study*", "2", "1"),
        "loose_c.png": ("single file", "1", ""),
        "loose_wide.png": ("single file", "1", ""),
    }
    # the same reading as /predict_study for the same files
    api = cli("predict", str(tree / "patient1" / "study1_positive"), "--study", "--json", "--body-part", "forearm")
    study = json.loads(api.stdout)["study"]
    row = next(r for r in studies if r["study"] == "patient1/study1_positive")
    assert float(row["abnormality_probability"]) == study["abnormality_probability"]
    assert row["verdict"] == study["verdict"] and row["validated"] == str(study["validated"])
    # the user can ask for one study per folder; resuming skips what is done
    second = cli("batch", str(tree), "--out", str(out))
    assert second.returncode == 0 and json.loads(second.stdout.splitlines()[-1])["resumed"] == 3
    assert len(read_csv(out / "predictions.csv")) == 4
    by_folder = cli("batch", str(tree), "--out", str(tmp_path / "out2"), "--studies", "folders")
    assert by_folder.returncode == 0, by_folder.stderr
    assert {r["study"]: r["views"] for r in read_csv(tmp_path / "out2" / "studies.csv")} == {
        "patient1/study1_positive": "2",
        ".": "2",
    }


def test_the_card_s_training_command_parses_back_to_the_run_s_settings():
    """The model card prints the run's `train` command from its stored settings; on/off levers are bare flags."""
    settings = TrainSettings(imagenet_init="pkg/efficientnet-lite0.pth", source_mask=True, crop_share=0.2, seed=3)
    command = training_command(dataclasses.asdict(settings))
    assert "--source-mask" in command.split() and "--time-budget" not in command
    args = build_parser().parse_args(shlex.split(command)[3:])
    assert settings_from(TrainSettings, args) == dataclasses.replace(settings, imagenet_init="pypi")
    assert build_parser().parse_args(["train", "--no-source-mask"]).source_mask is False


def test_a_weighted_average_is_one_on_record_and_its_command_parses_back():
    """`average --shares` weighs runs unequally; the card names the shares and prints an `average` command that
    parses back to them, and to the data root it was finalized on."""
    first, second = {"w": torch.zeros(2), "n": torch.tensor(3)}, {"w": torch.ones(2), "n": torch.tensor(5)}
    assert torch.allclose(mean_state([first, second], [3.0, 1.0])["w"], torch.full((2,), 0.25))
    assert torch.allclose(mean_state([first, second])["w"], torch.full((2,), 0.5))
    assert mean_state([first, second], [3.0, 1.0])["n"] == 3  # integer buffers: the first run's
    with pytest.raises(ValueError, match="one non-negative share per run"):
        mean_state([first, second], [1.0])
    settings = dataclasses.asdict(TrainSettings(imagenet_init="pypi", source_mask=True))
    runs = [{"folder": f, "version": f, "best_epoch": 3, "share": w, "settings": settings}
            for f, w in (("weights", 0.75), ("runs/m/weights", 0.25))]  # fmt: skip
    story = reproduce_story({"settings": settings | {"version": "2.1.0"}, "averaged": runs})
    assert "average, weighted 75% / 25%, of the weights of 2 runs" in story
    average = next(line for line in story.splitlines() if line.startswith("python -m mura_demo average"))
    args = build_parser().parse_args(shlex.split(average)[3:])
    assert args.folders == ["weights", "runs/m/weights"] and args.shares == [0.75, 0.25]
    uniform = reproduce_story({"settings": settings, "averaged": [run | {"share": 0.5} for run in runs]})
    assert "uniform average" in uniform and "--shares" not in uniform and "--data-root" not in uniform
    packed = reproduce_story({"settings": settings | {"data_root": ".gpu/data"}, "averaged": runs})
    average = next(line for line in packed.splitlines() if line.startswith("python -m mura_demo average"))
    assert build_parser().parse_args(shlex.split(average)[3:]).data_root == ".gpu/data"  # finalized on packed images
    older = {k: v for k, v in settings.items() if k != "data_root"}  # records from before data_root was kept
    story = reproduce_story({"settings": older, "averaged": [run | {"settings": older} for run in runs]})
    assert "--data-root" not in story and "packs them" not in story
