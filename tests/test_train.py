"""Training end to end on a handful of real radiographs: train, select, export, reload, predict."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import DATA, ROOT, needs_data
from safetensors.torch import load_file

from mura_demo.core.config import ModelConfig
from mura_demo.core.inference import score_body_parts, score_images
from mura_demo.core.model import MuraNet, create_model
from mura_demo.core.preprocess import equalize, normalize
from mura_demo.core.weights import WeightsError, load_folder, load_model
from mura_demo.serving.predictor import Predictor
from mura_demo.training.card import (
    inference_story,
    network_story,
    reproduce_story,
    threshold_story,
    training_command,
)
from mura_demo.training.data import load_images, load_splits
from mura_demo.training.other_shift import OTHER_SHIFTS
from mura_demo.training.train import (
    Losses,
    TrainSettings,
    average_runs,
    frozen_maps,
    logits_from_maps,
    subsample,
    train,
)

pytestmark = needs_data


def smoke_settings(tmp_path, init, **kw) -> TrainSettings:
    base = dict(
        data_root=str(DATA),
        out_dir=str(tmp_path / "run"),
        export_dir=str(tmp_path / "weights"),
        imagenet_init=init,
        limit=32,
        batch_size=8,
        max_steps=2,
        head_epochs=1,
        epochs=1,
        version="smoke",
    )
    return TrainSettings(**{**base, **kw})


def test_smoke_train_export_reload_predict(tmp_path, imagenet_init, radiographs):
    train(smoke_settings(tmp_path, imagenet_init))
    config = json.loads((tmp_path / "weights" / "config.json").read_text())
    assert config["trained"] and config["version"] == "smoke"
    assert not any(config["validated"].values())  # only `evaluate --card` validates, on held-out figures
    # every cut is 0.5 (session 46); how a cut fitted on the holdout would have fared is on record for the card
    assert config["thresholds"] == dict.fromkeys(config["body_parts"], 0.5)
    rules = config["training"]["threshold_rules"]
    assert "forearm" in rules
    assert all(r["rule"] == "fixed_0.5" and set(r["held_out_kappa"]) == {"max_kappa", "fixed_0.5"}
               for r in rules.values())  # fmt: skip
    assert threshold_story(ModelConfig.load(tmp_path / "weights")).startswith("Every part's threshold is 0.5")
    groups = config["metrics"]["holdout"]["body_part_by_group"]
    assert "mura/forearm" in groups and all(0 <= g["accuracy"] <= 1 for g in groups.values())
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    assert any(k.startswith("ema.") for k in load_file(tmp_path / "run" / "checkpoint.safetensors"))
    training = config["training"]
    assert config["test_time_flip"] == (training["holdout_score_with_flip"] > training["holdout_score_without_flip"])
    by_size = {int(size): acc for size, acc in training["holdout_body_part_accuracy_by_size"].items()}
    assert set(by_size) == {224, 192, 160}
    best = max(by_size.values())
    assert config["body_part_input_size"] == max(size for size, acc in by_size.items() if acc == best)
    assert config["body_part_equalized_view"] == (training["holdout_body_part_accuracy_with_equalized_view"] > best)
    predictor = Predictor(load_model(str(tmp_path / "weights")))
    analysis = predictor.analyze(radiographs["forearm"], "auto")
    assert analysis.prediction.weights_revision == "smoke"
    # resuming with one more epoch runs only that epoch
    train(smoke_settings(tmp_path, imagenet_init, epochs=2))
    history = json.loads((tmp_path / "run" / "checkpoint.json").read_text())["history"]
    assert [(r["phase"], r["epoch"]) for r in history] == [("heads", 1), ("finetune", 1), ("finetune", 2)]
    assert all("holdout_score_ema" in r for r in history[1:])


def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, imagenet_init):
    """A run stopped after its first epoch (a spent time budget) and started again ends with exactly the weights
    of the same run left alone: the data order, the augmentation, the optimizer, the moving average and the
    dropout draws all go on from where they stopped."""
    straight = smoke_settings(tmp_path / "straight", imagenet_init)
    train(straight)
    stopped = smoke_settings(tmp_path / "stopped", imagenet_init, time_budget=0.0)
    train(stopped)
    history = json.loads((tmp_path / "stopped" / "run" / "checkpoint.json").read_text())["history"]
    assert [r["phase"] for r in history] == ["heads"]
    train(dataclasses.replace(stopped, time_budget=None))
    a = load_file(tmp_path / "straight" / "run" / "checkpoint.safetensors")
    b = load_file(tmp_path / "stopped" / "run" / "checkpoint.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_last_epoch_rule_keeps_the_last_average_and_never_stops_early(tmp_path, imagenet_init):
    """Under --last-epoch the holdout chooses nothing: with a patience of 0, which would stop the plain rule at
    once, every epoch runs and the exported weights are the moving average after the last one."""
    train(smoke_settings(tmp_path, imagenet_init, epochs=3, patience=0, last_epoch=True))
    meta = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert [(r["phase"], r["epoch"]) for r in meta["history"]][-1] == ("finetune", 3)
    assert meta["best_epoch"] == "finetune 3 (EMA)"
    checkpoint = load_file(tmp_path / "run" / "checkpoint.safetensors")
    best = load_file(tmp_path / "run" / "best.safetensors")
    assert best and all(torch.equal(t, checkpoint["ema." + k.removeprefix("model.")]) for k, t in best.items())
    assert "after the last epoch" in network_story(
        json.loads((tmp_path / "weights" / "config.json").read_text())["training"]
    )


def test_the_body_part_levers_train(tmp_path, imagenet_init):
    """Style randomisation, group-balanced draws, end crops, the source mask and the body part alone, with MURA
    elbows withheld: a short run trains on none of the withheld images and records the levers it used; a spent
    time budget stops it after its first epoch, and the best epoch so far is still exported. Trained for the body
    part alone, its epochs are chosen by body part, it gets no abnormality thresholds, and it is refused for
    serving but read where only the body part is. Its *other* logit is shifted as its holdout chose."""
    settings = smoke_settings(tmp_path, imagenet_init, limit=64, style=1.0, amplitude_share=0.5, group_balance=0.5,
                              crop_share=0.2, withhold="mura:elbow", source_mask=True, epochs=3, time_budget=0.0,
                              body_part_only=True, view_choice="images", other_shift=True)  # fmt: skip
    train(settings)
    config = json.loads((tmp_path / "weights" / "config.json").read_text())
    training = config["training"]
    # the body part's size is the one naming the most holdout images right (ties: the mean per group, then larger)
    merit = {int(size): (n, training["holdout_body_part_accuracy_by_size"][size])
             for size, n in training["holdout_body_part_images_right_by_size"].items()}  # fmt: skip
    assert config["body_part_input_size"] == max(sorted(merit, reverse=True), key=merit.get)
    equalized = (training["holdout_body_part_images_right_with_equalized_view"],
                 training["holdout_body_part_accuracy_with_equalized_view"])  # fmt: skip
    assert config["body_part_equalized_view"] == (equalized > merit[config["body_part_input_size"]])
    viewed = equalized if config["body_part_equalized_view"] else merit[config["body_part_input_size"]]
    # then the *other* shift: the figures served are the shifted ones, never fewer images right than unshifted
    shift, groups = training["other_shift"], config["metrics"]["holdout"]["body_part_by_group"]
    named = round(sum(g["accuracy"] * g["images"] for g in groups.values()))
    assert shift["shift"] in OTHER_SHIFTS and len(shift["half_shifts"]) == 2
    assert named >= viewed[0] and (named == viewed[0] or shift["shift"] != 0)
    assert set(shift["holdout_body_part_by_group_cross_fitted"]) == set(groups)
    assert "chosen by the holdout images named right" in inference_story(ModelConfig.load(tmp_path / "weights"))
    used = config["training"]["settings"]
    assert (used["style"], used["group_balance"], used["crop_share"], used["withhold"]) == (1.0, 0.5, 0.2, "mura:elbow")
    assert used["amplitude_share"] == 0.5
    assert used["source_mask"] is True and used["body_part_only"] is True and config["training"]["epochs_run"] == 1
    assert not any(g.startswith("mura/elbow") for g in config["metrics"]["holdout"]["body_part_by_group"])
    (row,) = json.loads((tmp_path / "run" / "checkpoint.json").read_text())["history"]
    assert row["holdout_score"] == row["holdout_body_part_accuracy"] != row["holdout_auroc_forearm"]
    assert config["metrics"]["holdout"]["study_level"] == {}
    with pytest.raises(WeightsError, match="trained for the body part alone"):
        load_model(str(tmp_path / "weights"))
    assert not load_model(str(tmp_path / "weights"), body_part_alone=True).config.reads_abnormality


def test_a_network_for_the_abnormality_alone_trains_on_labelled_images_only(tmp_path, imagenet_init, capsys):
    """Trained for the abnormality alone, a run reads no image without an abnormality label (UNIFESP), sends no
    gradient to the body-part logits, chooses epochs by study AUROC, gets thresholds for the parts it learnt,
    and is refused for serving alone: its body part must come from another network (`pair`)."""
    settings = smoke_settings(tmp_path, imagenet_init, limit=96, abnormality_only=True)
    train(settings)
    labelled = [s for s in subsample(load_splits(settings.data_root)["train"], 96) if s.abnormal is not None]
    assert 0 < len(labelled) < 96 and f"loaded {len(labelled)} training" in capsys.readouterr().out
    log = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    row = log["history"][-1]
    parts = [k.removeprefix("holdout_auroc_") for k in row if k.startswith("holdout_auroc_")]
    assert row["holdout_score"] == pytest.approx(sum(row[f"holdout_auroc_{p}"] for p in parts) / len(parts))
    config = json.loads((tmp_path / "weights" / "config.json").read_text())
    assert config["training"]["settings"]["abnormality_only"] is True
    assert set(config["metrics"]["holdout"]["study_level"]) == set(parts)
    assert "the abnormality loss alone" in network_story(config["training"])
    # the loss sends nothing to the body-part logits
    holdout = load_splits(settings.data_root)["holdout"]
    samples = [s for s in holdout if s.abnormal is not None][::20] + [s for s in holdout if s.abnormal is None][:20]
    assert {s.abnormal for s in samples} == {True, False, None}
    cfg = ModelConfig(input_size=settings.input_size)
    logits = torch.randn(len(samples), cfg.num_outputs, requires_grad=True)
    Losses(cfg, samples, body_part=False)(logits, torch.arange(len(samples))).backward()
    body_grad, abnormal_grad = cfg.split_logits(logits.grad)
    assert not body_grad.any() and abnormal_grad.any()
    with pytest.raises(WeightsError, match="trained for the abnormality alone"):
        load_model(str(tmp_path / "weights"))
    assert "holdout_body_part_accuracy_by_size" not in config["training"]  # no body-part view chosen for it
    assert "body_part_accuracy" not in config["metrics"]["holdout"]
    with pytest.raises(ValueError, match="exclude each other"):
        smoke_settings(tmp_path / "both", imagenet_init, abnormality_only=True, body_part_only=True)
    with pytest.raises(ValueError, match="without an abnormality label"):
        smoke_settings(tmp_path / "crops", imagenet_init, abnormality_only=True, crop_share=0.2)
    assert not (tmp_path / "both").exists() and not (tmp_path / "crops").exists()


def test_a_body_part_network_trained_on_equalized_images_sees_and_reads_only_them(tmp_path, imagenet_init):
    """Under --equalized-inputs every training step's images are histogram-equalised after augmentation and style
    randomisation, and the exported network reads the body part from the equalised view alone, in scoring and in
    serving alike (no plain view left to choose); it is a body-part network only."""
    seen = []

    def record(module, args):
        if isinstance(module, MuraNet) and module.training:
            seen.append(args[0][:, :1].detach() * 0.5 + 0.5)  # the config's mean and std are 0.5

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        train(smoke_settings(tmp_path, imagenet_init, body_part_only=True, equalized_inputs=True, style=1.0))
    finally:
        hook.remove()
    assert len(seen) == 4  # two steps of the heads and of the fine-tuning phase
    for batch in seen:
        assert torch.allclose(equalize(batch), batch, atol=1e-5) and (batch.amin((1, 2, 3)) == 0).all()
    loaded = load_model(str(tmp_path / "weights"), body_part_alone=True)
    assert loaded.config.body_part_equalized_input and not loaded.config.body_part_equalized_view
    assert "holdout_body_part_accuracy_with_equalized_view" not in loaded.config.training
    assert "trained on histogram-equalised images only" in inference_story(loaded.config)
    holdout = load_images(load_splits(str(DATA))["holdout"][:12], loaded.config.input_size)
    body_part, _ = score_images(loaded.model, loaded.config, holdout)
    assert torch.allclose(body_part, score_body_parts(loaded.model, loaded.config, holdout), atol=1e-5)
    brighter = (holdout.float() / 255) ** 0.7  # a monotonic change of grey levels: the same reading
    assert torch.allclose(score_body_parts(loaded.model, loaded.config, brighter), body_part, atol=1e-4)
    with pytest.raises(ValueError, match="needs --body-part-only"):
        smoke_settings(tmp_path / "both", imagenet_init, equalized_inputs=True)
    # its weights averaged with a network that reads plain images would be read by neither network's rule
    plain = tmp_path / "plain"
    shutil.copytree(tmp_path / "weights", plain)
    config = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps(config | {"body_part_equalized_input": False}))
    with pytest.raises(ValueError, match="all with or all without equalised inputs"):
        average_runs([str(tmp_path / "weights"), str(plain)], smoke_settings(tmp_path / "average", imagenet_init))


def test_cached_maps_are_the_frozen_blocks_output_and_train_only_what_follows(tmp_path, imagenet_init, capsys):
    """Under --cached-maps the frozen blocks run once per image and mirror: the rest of the network read from
    those maps gives the model's own output for the image and for its mirror, the run trains past the frozen
    blocks only, and augmentation that needs the images of every step is refused."""
    model = create_model(ModelConfig(), imagenet_init=imagenet_init).eval()
    images = (torch.rand(3, 1, 224, 224) * 255).to(torch.uint8)
    maps = frozen_maps(model, images, 5)
    with torch.no_grad():
        x = normalize(images, model.config)
        for mirrored, view in enumerate((x, x.flip(-1))):
            torch.testing.assert_close(logits_from_maps(model, maps[:, mirrored], 5), model(view))
    settings = smoke_settings(tmp_path, imagenet_init, limit=96, abnormality_only=True, head_epochs=0, freeze_blocks=6,
                              cached_maps=True, ema_decay=0.0)  # fmt: skip
    train(settings)
    assert "made the maps of the first 6 blocks" in capsys.readouterr().out
    start = create_model(ModelConfig(), imagenet_init=imagenet_init).state_dict()
    trained = {k.removeprefix("model."): t for k, t in load_file(tmp_path / "run" / "best.safetensors").items()}

    def moved(*prefixes: str) -> set[bool]:
        return {not torch.equal(t, start[k]) for k, t in trained.items() if k.startswith(prefixes)}

    assert moved("backbone.blocks.6.", "backbone.conv_head.", "abnormality_head.") >= {True}
    assert moved("backbone.conv_stem.", "backbone.bn1.", *(f"backbone.blocks.{i}." for i in range(6))) == {False}
    assert "for its mirror" in network_story(json.loads((tmp_path / "weights" / "config.json").read_text())["training"])
    with pytest.raises(ValueError, match="need the images of every step"):
        smoke_settings(tmp_path / "styled", imagenet_init, cached_maps=True, style=1.0)


def test_a_run_can_start_from_a_trained_network(tmp_path, imagenet_init):
    """`--init-from` starts a run from another run's exported network (strictly loaded), not from ImageNet alone:
    at a learning rate of 0 the run ends with exactly the weights it started from (here a 224 px start, a 256 px run).
    A pair, another architecture, or a network that saw a part this run withholds is refused before anything trains."""
    train(smoke_settings(tmp_path / "a", imagenet_init))
    start, _ = load_folder(tmp_path / "a" / "weights")
    settings = smoke_settings(tmp_path / "b", None, init_from=str(tmp_path / "a" / "weights"), head_epochs=0, lr=0.0,
                              ema_decay=0.0, abnormality_only=True, input_size=256)  # fmt: skip
    train(settings)
    checkpoint = load_file(tmp_path / "b" / "run" / "checkpoint.safetensors")
    params = dict(start.named_parameters())
    assert params and all(torch.equal(checkpoint["model." + k], p) for k, p in params.items())
    config = json.loads((tmp_path / "b" / "weights" / "config.json").read_text())
    assert config["training"]["settings"]["init_from"] == settings.init_from
    assert config["training"]["started_from"]["version"] == "smoke"
    story = reproduce_story(config["training"])
    first = training_command(config["training"]["started_from"]["training"]["settings"])
    assert story.index(first) < story.index(training_command(config["training"]["settings"]))
    assert "--init-from" in story and "--imagenet-init" not in training_command(config["training"]["settings"])
    assert "It started from version smoke" in network_story(config["training"])
    refusals = {
        "is a pair": dict(init_from=str(ROOT / "weights"), input_size=256),
        "this run trains tf_efficientnet_lite1": dict(
            init_from=settings.init_from, architecture="tf_efficientnet_lite1"
        ),
        "same part withheld": dict(init_from=settings.init_from, withhold="mura:elbow"),
    }
    for n, (message, kw) in enumerate(refusals.items()):
        with pytest.raises(ValueError, match=message):
            train(smoke_settings(tmp_path / f"refused{n}", None, **kw))
        assert not (tmp_path / f"refused{n}" / "run").exists()  # refused before any folder is made


def test_refuses_to_train_from_scratch(tmp_path):
    with pytest.raises(ValueError, match="from scratch"):
        train(smoke_settings(tmp_path, None))
    assert not (tmp_path / "run").exists()


def test_two_gloo_ranks_end_with_identical_weights(tmp_path, imagenet_init):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "tests" / "ddp_worker.py"),
        str(out),
        str(DATA),
        imagenet_init,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "checkpoint.safetensors").exists()  # written by rank 0
