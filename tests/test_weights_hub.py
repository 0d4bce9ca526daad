"""Weights from the Hub (served for real on loopback) and strict local loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import BUNDLED, bundled_head, needs_weights
from safetensors.torch import load_file, save_file

from mura_demo.core.config import CONFIG_NAME, WEIGHTS_NAME
from mura_demo.core.weights import WeightsError, load_folder, load_model

pytestmark = needs_weights


def bundled_files() -> dict[str, bytes]:
    return {name: (BUNDLED / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}


def test_hub_download_pins_revision(hub):
    files = bundled_files()
    first = hub.publish("team/mura-pinned", files)
    changed = json.loads(files[CONFIG_NAME])
    changed["version"] = "second"
    second = hub.publish("team/mura-pinned", {**files, CONFIG_NAME: json.dumps(changed).encode()})
    assert first != second

    pinned = load_model(f"hf://team/mura-pinned@{first}")
    assert pinned.revision == first
    assert pinned.config.version == json.loads(files[CONFIG_NAME])["version"]
    assert pinned.source == f"hf://team/mura-pinned@{first}"

    latest = load_model("hf://team/mura-pinned@main")
    assert latest.revision == second and latest.config.version == "second"
    assert any(f"/resolve/{first}/model.safetensors" in r for r in hub.requests)
    assert not any("/resolve/main/" in r for r in hub.requests)  # files are fetched by commit, never by branch


def test_one_commit_even_when_one_lands_between_the_downloads(hub, tmp_path):
    """The branch moves after the Hub's first answer: both files still come from the commit it named."""
    files = bundled_files()
    first = hub.publish("team/mura-moving", files)
    tensors = load_file(BUNDLED / WEIGHTS_NAME)
    bias = f"{bundled_head('abnormality')}.bias"
    tensors[bias] = tensors[bias] + 1.0
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    changed = json.loads(files[CONFIG_NAME]) | {"version": "second"}
    moved = {CONFIG_NAME: json.dumps(changed).encode(), WEIGHTS_NAME: (tmp_path / WEIGHTS_NAME).read_bytes()}
    hub.after_next_request = lambda: hub.publish("team/mura-moving", moved)
    loaded = load_model("hf://team/mura-moving@main", bundled=tmp_path)
    assert loaded.revision == first and loaded.config.version == json.loads(files[CONFIG_NAME])["version"]
    assert torch.equal(loaded.model.abnormality_head.bias.half(), load_file(BUNDLED / WEIGHTS_NAME)[bias])
    assert hub.refs["team/mura-moving"]["main"] != first  # the branch did move


def test_unknown_revision_falls_back_to_bundled_with_notice(hub):
    hub.publish("team/mura-rev", bundled_files())
    loaded = load_model("hf://team/mura-rev@no-such-branch")
    assert "no revision 'no-such-branch'" in loaded.notice
    assert loaded.source.startswith("bundled weights/")


def test_unknown_revision_without_bundled_is_an_error(hub, tmp_path):
    hub.publish("team/mura-rev2", bundled_files())
    with pytest.raises(WeightsError, match="no revision 'v9'"):
        load_model("hf://team/mura-rev2@v9", bundled=tmp_path)


def test_unknown_repo_and_missing_file(hub, tmp_path):
    with pytest.raises(WeightsError, match="no model repo team/absent"):
        load_model("hf://team/absent@main", bundled=tmp_path)
    hub.publish("team/mura-nofile", {CONFIG_NAME: bundled_files()[CONFIG_NAME]})
    with pytest.raises(WeightsError, match=f"lacks {WEIGHTS_NAME}"):
        load_model("hf://team/mura-nofile@main", bundled=tmp_path)


def test_server_error_500(hub, tmp_path):
    hub.publish("team/mura-500", bundled_files())
    hub.fail_with = 500
    try:
        fallback = load_model("hf://team/mura-500@main")
        assert "answered HTTP 500" in fallback.notice and fallback.source.startswith("bundled")
    finally:
        hub.fail_with = None


def test_server_down_uses_cache_then_bundled(hub, tmp_path):
    commit = hub.publish("team/mura-down", bundled_files())
    assert load_model("hf://team/mura-down@main").revision == commit  # now cached
    hub.stop()
    try:
        cached = load_model("hf://team/mura-down@main", bundled=tmp_path)
        assert cached.revision == commit and not cached.notice
        fallback = load_model("hf://team/never-cached@main")
        assert "could not be reached" in fallback.notice
    finally:
        hub.start()


def test_corrupt_weights_from_hub_are_rejected(hub, tmp_path):
    files = bundled_files()
    hub.publish("team/mura-corrupt", {**files, WEIGHTS_NAME: files[WEIGHTS_NAME][: len(files[WEIGHTS_NAME]) // 2]})
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        load_model("hf://team/mura-corrupt@main", bundled=tmp_path)


def copy_bundled(tmp_path):
    folder = tmp_path / "w"
    shutil.copytree(BUNDLED, folder, ignore=shutil.ignore_patterns("*.md"))
    return folder


def test_strict_keys_and_shapes_name_the_offenders(tmp_path):
    folder = copy_bundled(tmp_path)
    tensors = load_file(folder / WEIGHTS_NAME)
    abnormality, body_part = bundled_head("abnormality"), bundled_head("body_part")
    tensors.pop(f"{abnormality}.bias")
    tensors["extra.weight"] = tensors[f"{body_part}.bias"].clone()
    tensors[f"{body_part}.weight"] = tensors[f"{body_part}.weight"][:, :10].contiguous()
    save_file(tensors, folder / WEIGHTS_NAME)
    with pytest.raises(WeightsError) as err:
        load_folder(folder)
    message = str(err.value)
    assert f"missing: {abnormality}.bias" in message
    assert "unexpected: extra.weight" in message
    assert f"wrong shape: {body_part}.weight" in message


def test_config_that_does_not_match(tmp_path):
    folder = copy_bundled(tmp_path)
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg["architecture"] = "mobilenetv2_100"
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="does not match mobilenetv2_100"):
        load_folder(folder)
    cfg["thresholds"] = {"forearm": 0.5}
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="thresholds"):
        load_folder(folder)
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_folder(folder)


def test_no_bundled_weights_says_where_to_point(tmp_path, monkeypatch):
    """An installed copy without weights/ names the two ways to give it weights."""
    monkeypatch.delenv("MURA_DEMO_WEIGHTS", raising=False)
    with pytest.raises(WeightsError, match=r"No bundled weights at .*--weights or \$MURA_DEMO_WEIGHTS"):
        load_model(bundled=tmp_path / "absent")


def test_untrained_weights_are_refused(tmp_path):
    folder = copy_bundled(tmp_path)
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg["trained"] = False
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="not a trained model"):
        load_model(str(folder))


def test_pickle_checkpoints_are_not_read(tmp_path):
    folder = copy_bundled(tmp_path)
    (folder / WEIGHTS_NAME).write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle header
    with pytest.raises(WeightsError, match="corrupt"):
        load_folder(folder)


def test_unwritable_cache_falls_back_with_a_clear_notice(hub, tmp_path):
    """A fresh process whose HF_HUB_CACHE cannot be created (it lies under a regular file)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    hub.publish("team/mura-cache", bundled_files())
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(blocker / "cache"), "PYTHONPATH": str(ROOT)}
    code = "from mura_demo.core.weights import load_model; print(load_model('hf://team/mura-cache@main').notice)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cannot be written" in out.stdout and "bundled" in out.stdout
