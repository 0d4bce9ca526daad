"""Evaluation and model card end to end on a miniature data tree of real radiographs.

The tree keeps MURA's official layout and CSVs and the UNIFESP labels file, with every tenth
study (every third elbow study; every tenth UNIFESP image) linked from ../shared/data, so the whole command runs in
about a minute: test scoring, the frozen-feature baseline, bootstrap intervals, plots and the card.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BUNDLED, MURA, UNIFESP, bundled_networks, doctored_weights, needs_data, needs_weights
from safetensors.torch import load_file, save_file

from mura_demo.cli import build_parser, combining_settings
from mura_demo.core.inference import model_logits
from mura_demo.core.weights import SCALE_SUFFIX, load_folder, load_model, round_as_stored
from mura_demo.training.card import averaged_story, write_model_card
from mura_demo.training.data import elbow_fold_splits, is_mura_elbow, load_splits
from mura_demo.training.evaluate import carried_gate, evaluate
from mura_demo.training.settings import EvalSettings, TrainSettings
from mura_demo.training.train import average_runs, pair_networks, train

pytestmark = [needs_data, needs_weights]


def write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def link(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "MURA-v1.1").mkdir()
    for split in ("train", "valid"):
        with open(MURA / f"{split}_labeled_studies.csv", newline="") as fh:
            # every tenth study, and every third elbow study: enough for both labels in the elbow test share
            studies = [
                row for i, row in enumerate(csv.reader(fh)) if i % 10 == 0 or ("XR_ELBOW" in row[0] and i % 3 == 0)
            ]
        kept = {study.rstrip("/") for study, _ in studies}
        with open(MURA / f"{split}_image_paths.csv", newline="") as fh:
            images = [row for row in csv.reader(fh) if row[0].rsplit("/", 1)[0] in kept]
        write_csv(root / "MURA-v1.1" / f"{split}_labeled_studies.csv", studies)
        write_csv(root / "MURA-v1.1" / f"{split}_image_paths.csv", images)
        for (rel,) in images:
            link(MURA.parent / rel, root / rel)
    with open(UNIFESP / "labels.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    link(UNIFESP / "images", root / "unifesp-bodypart" / "images")
    write_csv(root / "unifesp-bodypart" / "labels.csv", [rows[0], *rows[1::10]])
    return root


def test_evaluate_writes_report_plots_and_card(mini_data, imagenet_init, tmp_path):
    """The whole evaluation on the miniature, leave-one-source-out included: a short run trained with the
    MURA elbows withheld (averaged with a second, masked one) sets the confidence level and decides whether a
    detected part must be confirmed."""
    loso = TrainSettings(data_root=str(mini_data), out_dir=str(tmp_path / "loso"), export_dir=str(tmp_path / "loso-w"),
                         imagenet_init=imagenet_init, withhold="mura:elbow", limit=48, batch_size=8, max_steps=2,
                         head_epochs=1, epochs=1, style=1.0, crop_share=0.2, group_balance=0.5,
                         source_prior=1.0)  # fmt: skip
    train(loso)
    masked = dataclasses.replace(loso, out_dir=str(tmp_path / "m"), export_dir=str(tmp_path / "m-w"), source_prior=0.0,
                                 source_mask=True)  # fmt: skip
    train(masked)
    average = TrainSettings(data_root=str(mini_data), out_dir=str(tmp_path / "avg"), export_dir=str(tmp_path / "avg-w"),
                            version="loso-avg", view_choice="images")  # fmt: skip
    average_runs([loso.export_dir, masked.export_dir], average)
    weights = shutil.copytree(BUNDLED, tmp_path / "weights")
    settings = EvalSettings(
        data_root=str(mini_data),
        weights=str(weights),
        out_dir=str(tmp_path / "eval"),
        imagenet_init=imagenet_init,
        loso_weights=average.export_dir,
        n_boot=50,
    )
    report = evaluate(settings)
    assert json.loads((tmp_path / "eval" / "report.json").read_text()) == json.loads(json.dumps(report))
    for png in ("roc_study_level.png", "body_part_confusion.png"):
        assert (tmp_path / "eval" / png).stat().st_size > 5000
    metrics = {"auroc", "kappa", "accuracy", "sensitivity", "specificity", "precision", "f1"}
    for part in ("forearm", "humerus", "elbow"):
        for level in ("image_level", "study_level"):
            assert set(report["abnormality"][part][level]) == metrics
            for name, m in report["abnormality"][part][level].items():
                low, high = m["ci95"]
                # precision is undefined on a few elbow studies where nothing is called abnormal
                assert low <= high or (name == "precision" and math.isnan(m["value"])), (part, level, name)
        assert set(report["baseline"][part]) == {"C", "threshold", "study_level"}
    body = report["body_part"]
    matrix = body["confusion_matrix"]
    assert sum(map(sum, matrix)) == body["upper_extremity_images"] + body["other_images"]
    groups = body["by_group"]
    assert {"mura/forearm", "mura/humerus", "mura/elbow", "unifesp/other"} <= set(groups)
    assert sum(g["images"] for g in groups.values()) == sum(map(sum, matrix))
    gate = report["body_part_gate"]
    elbows = [s for s in load_splits(mini_data)["test"] if s.source == "mura" and s.body_parts == ("elbow",)]
    assert gate["withheld"] == "mura:elbow" and gate["test"]["images"] == len(elbows) > 0
    assert 0.5 <= gate["level"] <= 0.999 and gate["confirmation_required"] == (gate["test"]["accuracy"] < 0.9)
    assert sum(gate["test"]["called"].values()) == len(elbows)
    assert set(report["end_crops"]) == {"elbow+wrist", "elbow+shoulder"}

    write_model_card(weights, report | {"n_boot": settings.n_boot})
    card = (weights / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "timm"
    results = {r["dataset"]["name"]: r for r in front["model-index"][0]["results"]}
    assert "MURA v1.1 train, elbow test share (elbow)" in results and "MURA v1.1 valid (forearm)" in results
    config = json.loads((weights / "config.json").read_text())
    for part in ("forearm", "humerus", "elbow"):
        auroc = report["abnormality"][part]["study_level"]["auroc"]["value"]
        baseline = report["baseline"][part]["study_level"]["auroc"]["value"]
        assert config["metrics"]["held_out"][part]["study_auroc"] == auroc
        assert config["validated"][part] == (auroc >= 0.85 and auroc > baseline)
        stated = [m["value"] for r in results.values() if part in r["dataset"]["name"] for m in r["metrics"]]
        assert round(auroc, 4) in stated
    assert not config["validated"]["wrist"]
    validated = [p for p in ("elbow", "forearm", "humerus") if config["validated"][p]]
    short = [p for p in ("elbow", "forearm", "humerus") if not config["validated"][p]]
    assert f"Validated abnormality readings: {', '.join(validated) or 'none'}." in card
    assert (f"Measured but not validated: {', '.join(short)}" in card) == bool(short)
    assert "No labelled images of finger, hand, shoulder, wrist: those readings are guesses by transfer" in card
    assert config["body_part_min_probability"] == gate["level"]
    assert config["body_part_confirmation"] == gate["confirmation_required"]
    assert f"| mura/elbow | {groups['mura/elbow']['images']} | {groups['mura/elbow']['accuracy']:.1%} |" in card
    assert f"names **{gate['test']['accuracy']:.1%}** of the {len(elbows)} images" in card
    assert "--withhold mura:elbow" in card and "--source-mask" in card  # the two runs the average joined
    joined = f"python -m mura_demo average {loso.export_dir} {masked.export_dir} --version loso-avg --export-dir"
    # finalized on its data, its body part's view chosen by images
    assert f"{joined} {average.export_dir} --data-root {average.data_root} --view-choice images\n" in card
    paired = config["training"].get("paired")
    if paired:  # a pair's card tells each network's training and how the two were joined
        body, abnormal = paired["body_part"], paired["abnormality"]
        assert f"**The body-part network** (version {body['version']})" in card
        assert f"**The abnormality network** (version {abnormal['version']})" in card
        assert f"python -m mura_demo pair --body-part {body['folder']} --abnormality {abnormal['folder']}" in card
        assert "shipped body-part network but with every MURA elbow image withheld" in card
    record = paired["body_part"]["training"] if paired else config["training"]

    def card_with(**changes) -> str:
        """The card written again after the body-part network's recorded settings are changed."""
        record["settings"] |= changes
        (weights / "config.json").write_text(json.dumps(config))
        write_model_card(weights, report | {"n_boot": settings.n_boot})
        return (weights / "README.md").read_text()

    # a run with no end crops and neither loss lever: the card names none; with them on, all
    card = card_with(source_mask=False, source_prior=0.0, crop_share=0.0, body_part_only=False)
    assert "source mask" not in card and "body-part distribution" not in card and "of the draws" not in card
    assert "the body-part loss alone" not in card
    card = card_with(source_mask=True, mask_margin=3.0, source_prior=0.5, crop_share=0.2, body_part_only=True,
                     last_epoch=False)  # fmt: skip
    assert "a source mask (each image's body-part softmax" in card and "the others stay in, lowered by 3.0" in card
    assert "0.5 times the log of each source's body-part distribution" in card and "(20% of the draws;" in card
    assert "the body-part loss alone" in card and "mean body-part accuracy over its source-and-part" in card
    assert "--body-part-only" in card
    # and the card of one network, as a training run writes it (the abnormality network: one run, not an average)
    single = shutil.copytree(bundled_networks(tmp_path / "nets")[1], tmp_path / "single")
    write_model_card(single, report | {"n_boot": settings.n_boot})
    card = (single / "README.md").read_text()
    assert "One `tf_efficientnet_lite0` backbone" in card and "One training run:" in card
    assert "**The body-part network**" not in card and "mura_demo pair" not in card


def test_an_average_of_runs_is_one_finalized_network(mini_data, tmp_path):
    """`average` joins runs' weights into one network, element by element, keeps the first run's settings and
    every run on record, and finalizes it on the holdout like a run, on the CPU threads it was given. Runs of
    another input size or of another elbow fold are refused; runs of one fold are finalized on that fold's elbows."""
    network, _ = bundled_networks(tmp_path / "nets")
    favoured = doctored_weights(tmp_path / "elbow", "elbow", source=network)
    threads = torch.get_num_threads()
    wanted = 2 if threads == 1 else 1  # any count but the one in use
    args = build_parser().parse_args(["average", str(network), str(favoured), "--version", "avg", "--threads",
                                      str(wanted), "--data-root", str(mini_data), "--out-dir", str(tmp_path / "run"),
                                      "--export-dir", str(tmp_path / "w")])  # fmt: skip
    settings = combining_settings(args)
    try:
        config = average_runs(args.folders, settings)
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(threads)
    joined, first, second = (load_folder(f)[0].state_dict() for f in (settings.export_dir, network, favoured))
    assert set(joined) == set(first)
    for k in first:  # the numbers each folder holds (the split network's int8 read back with its scales)
        assert torch.allclose(joined[k].float(), (first[k].float() + second[k].float()) / 2, atol=1e-3, rtol=1e-3), k
    shipped = json.loads((network / "config.json").read_text())["training"]["settings"]
    assert config.training["settings"]["style"] == shipped["style"] and config.version == "avg"
    assert [run["folder"] for run in config.training["averaged"]] == [str(network), str(favoured)]
    assert config.trained and all(0 < config.thresholds[p] < 1 for p in ("elbow", "forearm", "humerus"))
    story = averaged_story(config.training)  # the card's words for it
    assert "uniform average of 2 runs' weights" in story and "differs in: nothing but bookkeeping" in story
    smaller = doctored_weights(tmp_path / "small", "elbow", {"input_size": 224, "body_part_input_size": 224}, network)
    with pytest.raises(ValueError, match="one architecture, input size"):
        average_runs([str(network), str(smaller)], settings)
    shipped_training = load_folder(network)[1].training
    folds = [doctored_weights(tmp_path / f"fold{k}", "elbow", {"training": shipped_training | {
        "settings": shipped | {"elbow_fold": k}}}, network) for k in (1, 2)]  # fmt: skip
    with pytest.raises(ValueError, match=r"one elbow fold can be averaged \(these have \[1, 2\]\)"):
        average_runs([str(f) for f in folds], settings)  # fold 2's run trained on fold 1's elbows
    fold_average = average_runs([str(folds[0])] * 2, dataclasses.replace(settings, export_dir=str(tmp_path / "w1")))
    splits = load_splits(mini_data)
    fold_elbows = [s for s in elbow_fold_splits(splits, 1)["holdout"] if is_mura_elbow(s)]
    assert len(fold_elbows) != len([s for s in splits["holdout"] if is_mura_elbow(s)])  # the test can tell them apart
    finalized_on = fold_average.metrics["holdout"]["body_part_by_group"]["mura/elbow"]["images"]
    assert finalized_on == len(fold_elbows) > 0  # the fold's elbows, unseen by its runs, not the usual holdout's


def test_a_pair_reads_each_head_from_its_own_network(mini_data, tmp_path):
    """`pair` joins a body-part network and an abnormality network into one model: the body part from the first,
    the abnormality from the second, stored as int8 within the weights budget, finalized on the holdout, with both
    networks on record; pairs, twins and networks that do not fit are refused."""
    body, abnormal = bundled_networks(tmp_path / "nets")
    # a body part the test knows in advance, from a network of another size than the abnormality network's
    size = load_folder(abnormal)[1].input_size - 32
    elbow = doctored_weights(tmp_path / "elbow", "elbow", {"input_size": size, "body_part_input_size": None}, body)
    settings = TrainSettings(data_root=str(mini_data), out_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "w"),
                             version="pair")  # fmt: skip
    config = pair_networks(str(elbow), str(abnormal), settings)
    assert config.separate_body_part_network and config.cam_layer == "abnormality.backbone.bn2" and config.trained
    # each network reads the image letterboxed at its own size
    assert (config.input_size, config.body_part_image_size) == (size + 32, size)
    assert max(int(s) for s in config.training["holdout_body_part_accuracy_by_size"]) == size  # chosen on its own
    assert all(0 < config.thresholds[p] < 1 for p in ("elbow", "forearm", "humerus"))
    paired = config.training["paired"]
    assert (paired["body_part"]["folder"], paired["abnormality"]["folder"]) == (str(elbow), str(abnormal))
    assert paired["abnormality"]["training"] == load_folder(abnormal)[1].training
    stored = load_file(Path(settings.export_dir) / "model.safetensors")
    assert stored["abnormality.backbone.conv_head.weight"].dtype == torch.int8
    assert "abnormality.backbone.conv_head.weight" + SCALE_SUFFIX in stored
    assert (Path(settings.export_dir) / "model.safetensors").stat().st_size < 10e6  # the budget, both networks
    model, loaded = load_folder(settings.export_dir)
    alone, _ = load_folder(abnormal)
    round_as_stored(alone, int8=True)
    x = torch.randn(2, 3, loaded.input_size, loaded.input_size)
    trained = [loaded.body_parts.index(p) for p in ("elbow", "forearm", "humerus")]
    with torch.no_grad():
        body_logits, abnormal_logits = loaded.split_logits(model(x))
        assert body_logits.isnan().all()  # the body part is never read from the abnormality network's letterbox
        body_logits = loaded.split_logits(model_logits(model, loaded, x, letterboxed=x[..., :size, :size]))[0]
        assert (body_logits.argmax(1) == loaded.body_part_classes.index("elbow")).all()
        # the abnormality network's own answer, as int8 storage keeps it
        assert torch.allclose(abnormal_logits[:, trained], loaded.split_logits(alone(x))[1][:, trained], atol=1e-5)
    with pytest.raises(ValueError, match="not a pair"):
        pair_networks(settings.export_dir, str(abnormal), settings)
    twin = doctored_weights(tmp_path / "twin", "elbow", {"training": {"settings": {"withhold": "mura:elbow"}}}, body)
    with pytest.raises(ValueError, match="leave-one-source-out twin"):
        pair_networks(str(twin), str(abnormal), settings)
    fold = doctored_weights(tmp_path / "fold", "elbow", {"training": {"settings": {"elbow_fold": 2}}}, body)
    with pytest.raises(ValueError, match="elbow fold is read out of fold"):
        pair_networks(str(elbow), str(fold), settings)
    other_mean = doctored_weights(tmp_path / "mean", "elbow", {"mean": (0.4, 0.4, 0.4)}, body)
    with pytest.raises(ValueError, match="must agree on architecture, mean"):
        pair_networks(str(other_mean), str(abnormal), settings)
    body_only = doctored_weights(
        tmp_path / "alone", "elbow", {"training": {"settings": {"body_part_only": True}}}, body
    )
    with pytest.raises(ValueError, match="trained for the body part alone: it cannot read the abnormality"):
        pair_networks(str(elbow), str(body_only), settings)
    abnormality_only = doctored_weights(
        tmp_path / "abnormal-alone", "elbow", {"training": {"settings": {"abnormality_only": True}}}, body
    )
    with pytest.raises(ValueError, match="trained for the abnormality alone: it cannot read the body part"):
        pair_networks(str(abnormality_only), str(abnormal), settings)
    with pytest.raises(ValueError, match="only single networks can be averaged"):
        average_runs([settings.export_dir, settings.export_dir], settings)


def test_leave_one_source_out_figures_carry_over_only_to_the_same_body_part_reading(mini_data, imagenet_init, tmp_path):
    """`evaluate --loso-from`: weights that read the body part with the bundled weights' network, the same way (here
    the bundled pair with a changed abnormality network) keep the bundled leave-one-source-out figures, level and
    confirmation without a withheld run, and the card says where they come from; any difference in the body-part
    reading, or a folder without such figures, is refused."""
    bundled = load_folder(BUNDLED)[1]
    recorded = bundled.metrics["leave_one_source_out"]
    weights = shutil.copytree(BUNDLED, tmp_path / "weights")
    tensors = load_file(weights / "model.safetensors")
    tensors["abnormality.abnormality_head.bias"] += 0.5  # another abnormality reading, the same body-part network
    save_file(tensors, weights / "model.safetensors")
    settings = EvalSettings(data_root=str(mini_data), weights=str(weights), out_dir=str(tmp_path / "eval"),
                            imagenet_init=imagenet_init, loso_from=str(BUNDLED), n_boot=20)  # fmt: skip
    report = evaluate(settings)
    gate = report["body_part_gate"]
    assert all(gate[k] == recorded[k] for k in ("withheld", "level", "selection", "test"))
    assert gate["carried_from"]["folder"] == str(BUNDLED) and gate["carried_from"]["version"] == bundled.version
    assert gate["confirmation_required"] == bundled.body_part_confirmation
    shipped = gate["shipped_held_out_mura"]
    assert shipped["images"] > 0 and 0 <= shipped["correct_clearing_level"] <= 1
    write_model_card(weights, report | {"n_boot": settings.n_boot})
    config, card = load_folder(weights)[1], (weights / "README.md").read_text()
    assert config.body_part_min_probability == recorded["level"]
    assert config.body_part_confirmation == bundled.body_part_confirmation
    assert config.metrics["leave_one_source_out"]["carried_from"] == gate["carried_from"]
    assert f"names **{recorded['test']['accuracy']:.1%}** of the {recorded['test']['images']} images" in card
    assert "carried over from version" in card
    # the card's command measures the figures again from the withheld run's folder where the record names it (figures
    # measured for this version), and carries them from the bundled folder where it does not (an older carried record)
    twin = recorded.get("training", {}).get("settings", {}).get("export_dir")
    assert (f"--loso-weights {twin} --card" if twin else f"--loso-from {BUNDLED} --card") in card
    assert ("How it was made. " in card) == bool(twin)  # the withheld run's commands, or where they are told
    # carried on again, the figures still name the version they were measured for
    measured_in = gate["carried_from"]["measured_in"]
    assert carried_gate(str(weights), load_model(str(weights)))["carried_from"]["measured_in"] == measured_in

    def refused(folder, loso_from, match):
        with pytest.raises(ValueError, match=match):
            evaluate(dataclasses.replace(settings, weights=str(folder), loso_from=str(loso_from)))

    other_body_part = doctored_weights(tmp_path / "elbow", "elbow")
    refused(other_body_part, BUNDLED, r"reads the body part differently \(the body-part network's tensors\)")
    other_view = shutil.copytree(BUNDLED, tmp_path / "other_view")
    flipped = {"body_part_equalized_view": not bundled.body_part_equalized_view}
    (other_view / "config.json").write_text(json.dumps(bundled.to_dict() | flipped))
    refused(other_view, BUNDLED, r"differently \(body_part_equalized_view\)")
    body, _ = bundled_networks(tmp_path / "nets")  # a network split off a pair has no figures of its own
    refused(BUNDLED, body, "has no leave-one-source-out figures to carry over")
    with pytest.raises(ValueError, match="give one"):
        EvalSettings(loso_weights=str(BUNDLED), loso_from=str(BUNDLED))
