"""The *other* logit's holdout-chosen shift (``--other-shift``), without data: what it chooses, how the choice is
judged (cross-fitted halves), that it ships inside the head's bias, and that the commands on record name it."""

from __future__ import annotations

import dataclasses
import itertools
import shlex
from pathlib import Path

import torch

from mura_demo.cli import build_parser
from mura_demo.core.config import ModelConfig
from mura_demo.core.inference import score_body_parts
from mura_demo.core.model import create_model
from mura_demo.training.card import finalize_flags, inference_story, reproduce_section
from mura_demo.training.data import Sample
from mura_demo.training.evaluate import named_right
from mura_demo.training.other_shift import (
    OTHER_SHIFTS,
    best_shift,
    choose_other_shift,
    half_of,
    shift_other_logit,
    shifted_other,
)

CONFIG = ModelConfig(input_size=64)
FOREARM, OTHER = CONFIG.body_part_classes.index("forearm"), len(CONFIG.body_part_classes) - 1


def holdout(n_forearms=40, n_other=40, n_close=10, forearm_margin=3.0, close_margin=0.5):
    """MURA forearms called forearm by ``forearm_margin`` logits over *other*, and non-arm images: the first
    ``n_close`` called forearm by ``close_margin`` over *other*, the rest *other* by 2 logits."""
    samples, logits = [], []
    for i in range(n_forearms + n_other):
        arm = i < n_forearms
        source, parts = ("mura", ("forearm",)) if arm else ("unifesp", ("other",))
        samples.append(Sample(Path(f"{i}.png"), parts, None, f"s{i}", f"p{i}", source))
        row = torch.full((len(CONFIG.body_part_classes),), -5.0)
        if arm:
            row[FOREARM], row[OTHER] = forearm_margin, 0.0
        elif i - n_forearms < n_close:
            row[FOREARM], row[OTHER] = close_margin, 0.0
        else:
            row[FOREARM], row[OTHER] = 0.0, 2.0
        logits.append(row)
    return samples, torch.stack(logits).softmax(1)


def test_the_shift_is_the_smallest_that_names_the_most_right():
    samples, probs = holdout()
    assert named_right(CONFIG, samples, probs).sum() == 70
    # 0.75 is the smallest shift over the close images' 0.5 logits; the forearms hold up to 3
    assert best_shift(CONFIG, samples, probs, "groups") == best_shift(CONFIG, samples, probs, "images") == 0.75
    assert named_right(CONFIG, samples, shifted_other(probs, 0.75)).all()
    # nothing to gain: no shift, however many shifts tie
    samples, probs = holdout(n_close=0)
    assert best_shift(CONFIG, samples, probs, "groups") == 0.0
    # the arm images' margin below the non-arm images' needs a shift down
    samples, probs = holdout(forearm_margin=-0.9, n_close=0)
    assert best_shift(CONFIG, samples, probs, "images") == -1.0
    assert OTHER_SHIFTS[0] == -3.0 and OTHER_SHIFTS[-1] == 3.0 and 0.0 in OTHER_SHIFTS


def test_each_half_is_read_with_the_shift_the_other_half_chose():
    samples, probs = holdout(n_close=6, close_margin=1.0)
    halves = [half_of(s) for s in samples]
    assert 0 < sum(halves) < len(samples)  # the patients fall in both halves
    choice = choose_other_shift(CONFIG, samples, probs, "groups")
    assert choice["shift"] == best_shift(CONFIG, samples, probs, "groups") == 1.25
    for half, shift in enumerate(choice["half_shifts"]):
        rows = [i for i, h in enumerate(halves) if h == half]
        others = [i for i, h in enumerate(halves) if h != half]
        assert shift == best_shift(CONFIG, [samples[i] for i in others], probs[others], "groups")
        assert torch.allclose(choice["cross_fitted"][rows], shifted_other(probs[rows], shift))


def test_a_half_is_never_read_with_a_shift_chosen_on_itself():
    """All close images in half 0: half 1 has nothing to gain and chooses 0, so half 0's close images stay wrong
    when read cross-fitted, though the whole holdout chooses the shift that fixes them."""
    samples, probs = holdout(n_close=6, close_margin=1.0)
    names = (f"q{k}" for k in itertools.count())
    for i in range(40, 46):
        samples[i] = next(s for s in (dataclasses.replace(samples[i], patient=n) for n in names) if half_of(s) == 0)
    choice = choose_other_shift(CONFIG, samples, probs, "groups")
    assert choice["shift"] == 1.25 and choice["half_shifts"][0] == 0.0
    assert not named_right(CONFIG, samples[40:46], choice["cross_fitted"][40:46]).any()


def test_the_shift_ships_in_the_head_s_bias_as_stored():
    torch.manual_seed(0)
    model = create_model(CONFIG).eval()
    images = torch.randint(0, 255, (80, 1, 64, 64), dtype=torch.uint8)
    samples, _ = holdout()
    probs = score_body_parts(model, CONFIG, images)
    before = model.body_part_head.bias.detach().clone()
    served, record = shift_other_logit(model, samples, probs, "groups")
    after = model.body_part_head.bias.detach()
    assert torch.equal(after[:-1], before[:-1]) and after[-1] == after[-1].half().float()
    assert record["shift"] != 0 and abs(float(after[-1] - before[-1]) - record["shift"]) < 1e-3
    assert torch.allclose(score_body_parts(model, CONFIG, images), served, atol=1e-5)
    assert record["shift"] == choose_other_shift(CONFIG, samples, probs, "groups")["shift"]
    groups = record["holdout_body_part_by_group_cross_fitted"]
    assert set(groups) == {"mura/forearm", "unifesp/other"}
    assert record["holdout_body_part_images_right_cross_fitted"] == sum(
        round(g["accuracy"] * g["images"]) for g in groups.values()
    )


def test_the_commands_and_the_card_on_record_name_the_shift():
    settings = {"version": "3.1.0", "export_dir": "w", "view_choice": "images", "other_shift": True}
    assert finalize_flags(settings) == ["--view-choice", "images", "--other-shift"]
    assert finalize_flags(settings | {"other_shift": False}) == ["--view-choice", "images"]
    network = {"version": "v", "training": {"settings": {}}}
    training = {
        "settings": settings,
        "paired": {role: {"folder": f"runs/{role}", **network} for role in ("body_part", "abnormality")},
        "other_shift": {"shift": 0.75, "half_shifts": [0.5, 1.0], "holdout_body_part_accuracy_cross_fitted": 0.961},
    }
    section = reproduce_section(ModelConfig(training=training))
    pair = next(line for line in section.splitlines() if line.startswith("python -m mura_demo pair"))
    assert build_parser().parse_args(shlex.split(pair)[3:]).other_shift is True
    assert build_parser().parse_args(["pair", "--body-part", "a", "--abnormality", "b", "--version", "v",
                                      "--export-dir", "e"]).other_shift is False  # fmt: skip
    story = inference_story(ModelConfig(training=training))
    assert "*other* logit is shifted by +0.75" in story and "+0.50 / +1.00" in story and "0.961" in story
    assert "shifted" not in inference_story(ModelConfig(training={"settings": settings}))
