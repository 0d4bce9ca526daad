"""The body-part levers on their own, without data: style randomisation, group-balanced draws, end crops,
the views of a composite film and the candidate-set loss."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mura_demo.core.config import ModelConfig
from mura_demo.core.model import create_model
from mura_demo.core.preprocess import equalize, letterbox
from mura_demo.training.augment import (
    augment,
    match_histograms,
    mix_amplitudes,
    mix_feature_styles,
    mixing_feature_styles,
    pixel_ranks,
    randomize_style,
    rank_equalize,
)
from mura_demo.training.card import recipe_story
from mura_demo.training.data import (
    Sample,
    crop_end,
    crop_siblings,
    end_crops,
    group_of,
    load_images,
    single_views,
)
from mura_demo.training.panels import Box, panel_boxes
from mura_demo.training.settings import TrainSettings, parse_part_weights
from mura_demo.training.train import MIX_STYLE_BLOCKS, Losses, draw_weights


def body_part_grad(losses: Losses, row: int) -> torch.Tensor:
    """The gradient of one training row's loss on the body-part logits, at zero logits."""
    logits = torch.zeros(1, losses.config.num_outputs, requires_grad=True)
    losses(logits, torch.tensor([row])).backward()
    return losses.config.split_logits(logits.grad)[0][0]


def sample(parts, source="mura", abnormal=0, end=None) -> Sample:
    return Sample(Path(f"{'-'.join(parts)}.png"), tuple(parts), abnormal, "study", "patient", source, end)


def test_style_randomisation_keeps_the_anatomy_frame_and_range():
    g = torch.Generator().manual_seed(0)
    batch = (torch.rand(8, 1, 64, 64, generator=g) * 255).to(torch.uint8)
    x = augment(batch, torch.Generator().manual_seed(1))
    rate = TrainSettings.rank_share
    assert torch.equal(randomize_style(x, g, 0.0, rate), x)
    styled = randomize_style(x, torch.Generator().manual_seed(2), 1.0, rate)
    assert styled.shape == x.shape and styled.min() >= 0 and styled.max() <= 1
    assert not torch.allclose(styled, x)
    assert torch.equal(styled, randomize_style(x, torch.Generator().manual_seed(2), 1.0, rate))  # seeded: repeatable


def test_histogram_matching_and_equalisation():
    x = torch.linspace(0, 1, 100).view(1, 1, 10, 10) ** 3
    reference = torch.linspace(0.2, 0.6, 100).flip(0).view(1, 1, 10, 10)
    matched = match_histograms(x, reference)
    assert torch.equal(matched.flatten().sort().values, reference.flatten().sort().values)
    assert torch.equal(matched.flatten().argsort(), x.flatten().argsort())  # order of grey levels kept
    assert torch.allclose(equalize(x).flatten(), torch.linspace(0, 1, 100), atol=1e-6)


def test_the_style_trait_ranks_ties_apart():
    """The style randomisation's equalisation ranks every pixel: where grey levels are distinct it is
    ``equalize``, and it turns a flat letterbox into many grey levels (the trait the shipped networks trained with)."""
    x = torch.linspace(0, 1, 100).view(1, 1, 10, 10) ** 3
    assert torch.allclose(rank_equalize(x), equalize(x), atol=1e-6)
    boxed = torch.zeros(1, 1, 64, 64)
    boxed[:, :, 16:48, 8:56] = torch.randint(1, 256, (32, 48), generator=torch.Generator().manual_seed(0)) / 255
    letterbox = rank_equalize(boxed)[:, :, :16]
    assert letterbox.unique().numel() == letterbox.numel() and letterbox.max() - letterbox.min() > 0.3
    flat = boxed.flatten(1)  # the ranks are the sort's places, ties and all, as a second sort would give them
    assert torch.equal(pixel_ranks(flat), flat.argsort(1).argsort(1))


def test_the_ranking_trait_has_a_rate_of_its_own():
    """``--rank-share`` moves the ranking trait's rate (the shipped networks' runs drew it for 15% of images): with
    every image ranked, a flat letterbox comes out textured far more often, and the card says the rate moved."""
    boxed = torch.zeros(16, 1, 64, 64, dtype=torch.uint8)
    boxed[:, :, 16:48, 8:56] = torch.randint(1, 256, (16, 1, 32, 48), generator=torch.Generator().manual_seed(0))
    x = augment(boxed, torch.Generator().manual_seed(1), max_rotation=0.0)

    def styled(rank_share):
        return randomize_style(x, torch.Generator().manual_seed(2), 1.0, rank_share)

    assert TrainSettings.rank_share == 0.15

    def textured(y):  # images whose top rows (letterbox before the style traits) hold many grey levels
        return sum(int(row[:, :6, 8:56].unique().numel() > 64) for row in y)

    assert textured(styled(1.0)) >= textured(styled(0.0)) + 5
    assert "drawn for 45% of the images, not 15%" in recipe_story({"style": 1.0, "rank_share": 0.45})
    assert "ranking of pixels" not in recipe_story({"style": 1.0})
    with pytest.raises(ValueError, match="--rank-share is the rate of one style trait"):
        TrainSettings(rank_share=1.5)


def test_the_amplitude_mix_moves_the_spectrum_and_keeps_the_phase():
    """``mix_amplitudes`` at weight 0 gives the image back, at weight 1 the reference's amplitude spectrum under the
    image's phase (where its edges are); ``--amplitude-share`` draws it for its share of images, at 0 not at all."""
    g = torch.Generator().manual_seed(0)
    x, reference = torch.rand(2, 1, 32, 32, generator=g), torch.rand(2, 1, 32, 32, generator=g)
    weight = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
    mixed = mix_amplitudes(x, reference, weight)
    assert torch.allclose(mixed[0], x[0], atol=1e-5)
    spectrum, own, other = torch.fft.rfft2(mixed[1]), torch.fft.rfft2(x[1]), torch.fft.rfft2(reference[1])
    assert torch.allclose(spectrum.abs(), other.abs(), atol=1e-3)
    assert torch.allclose(torch.polar(torch.ones_like(own.abs()), spectrum.angle()), own / own.abs(), atol=1e-3)
    assert not torch.allclose(mixed[1], x[1], atol=0.05)

    boxed = (torch.rand(16, 1, 64, 64, generator=g) * 255).to(torch.uint8)
    y = augment(boxed, torch.Generator().manual_seed(1))

    def styled(amplitude_share, p=1.0):
        return randomize_style(y, torch.Generator().manual_seed(2), p, TrainSettings.rank_share, amplitude_share)

    assert TrainSettings.amplitude_share == 0.0
    assert torch.equal(styled(0.0), randomize_style(y, torch.Generator().manual_seed(2), 1.0, TrainSettings.rank_share))
    assert not torch.allclose(styled(1.0), styled(0.0))
    assert torch.equal(styled(1.0, p=0.0), y)
    assert "Fourier amplitude mix" in recipe_story({"style": 1.0, "amplitude_share": 0.3})
    assert "drawn for 30% of the images" in recipe_story({"style": 1.0, "amplitude_share": 0.3})
    assert "Fourier" not in recipe_story({"style": 1.0})
    with pytest.raises(ValueError, match="--amplitude-share is the rate of one style trait"):
        TrainSettings(amplitude_share=-0.1)


def test_equalisation_keeps_one_grey_level_one_level_and_the_letterbox_black():
    """An 8-bit radiograph in its black letterbox: every pixel of a level gets one value (the share of pixels at or
    below it), the letterbox stays 0, the brightest level is 1; a flat image stays flat."""
    x = torch.zeros(2, 1, 64, 64)
    x[:, :, 16:48, 8:56] = torch.randint(1, 256, (2, 1, 32, 48), generator=torch.Generator().manual_seed(0)) / 255
    out = equalize(x)
    for image, equalized in zip(x, out):
        assert equalized.min() == 0 and equalized.max() == 1
        assert (equalized[:, :16] == 0).all() and (equalized[:, :, :8] == 0).all()  # the letterbox
        levels = {}
        for level, value in zip(image.flatten().tolist(), equalized.flatten().tolist()):
            assert levels.setdefault(level, value) == value
        above_black = (image > 0).sum()
        brightest_share = (image == image.max()).sum() / above_black
        assert torch.isclose(1 - equalized[image < image.max()].max(), brightest_share, atol=1e-6)
    assert torch.equal(equalize(torch.full((1, 1, 8, 8), 0.3)), torch.zeros(1, 1, 8, 8))


def test_end_crops_are_either_end_with_both_candidates():
    whole = [sample(["forearm"]), sample(["humerus"], abnormal=1), sample(["elbow"]), sample(["wrist"], "unifesp")]
    crops = end_crops(whole)
    assert [(c.body_parts, c.end, c.abnormal) for c in crops] == [
        (("elbow", "wrist"), "first", None),
        (("elbow", "wrist"), "last", None),
        (("elbow", "shoulder"), "first", None),
        (("elbow", "shoulder"), "last", None),
    ]
    assert group_of(crops[0]) == "mura-end-crop/elbow+wrist" and group_of(whole[3]) == "unifesp/wrist"
    image = Image.new("L", (100, 300))
    assert crop_end(image, "first").size == (100, 150) and crop_end(image.rotate(90, expand=True), "last").size == (
        150,
        100,
    )


def film(size: tuple[int, int], fields: list[tuple[int, int, int, int]], seed: int = 0) -> Image.Image:
    """A black film with exposed grey fields (left, top, right, bottom), each with a bright bone-like band inside
    that runs only part of the field's height."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 12, size[::-1]).astype(np.uint8)
    for left, top, right, bottom in fields:
        pixels[top:bottom, left:right] = rng.integers(80, 110, (bottom - top, right - left))
        middle, height = (left + right) // 2, bottom - top
        pixels[top + height // 4 : bottom - height // 4, middle - 4 : middle + 4] = 220
    return Image.fromarray(pixels)


def edges(boxes: list[Box], axis: int) -> list[int]:
    """Where the boxes start along x (axis 0) or y (axis 1), in order."""
    return sorted({box[axis] for box in boxes})


def test_panel_boxes_find_the_views_of_a_composite_film_and_leave_single_views_whole():
    two = film((200, 120), [(4, 4, 98, 116), (102, 4, 196, 116)])  # side by side, an unexposed gap between
    boxes = panel_boxes(two)
    assert len(boxes) == 2 and edges(boxes, 0)[0] == 0 and 98 <= edges(boxes, 0)[1] <= 102
    touching = film((240, 100), [(0, 0, 80, 100), (80, 0, 160, 100), (160, 0, 240, 100)])  # edges, no gap
    touching = Image.fromarray(np.asarray(touching) + np.repeat([0, 40, 0], 80).astype(np.uint8)[None])
    assert edges(panel_boxes(touching), 0) == [0, pytest.approx(80, abs=1), pytest.approx(160, abs=1)]
    grid = film((200, 200), [(4, 4, 96, 96), (104, 4, 196, 96), (4, 104, 96, 196), (104, 104, 196, 196)])
    boxes = panel_boxes(grid)
    assert len(boxes) == 4 and all(88 <= b[2] - b[0] <= 112 and 88 <= b[3] - b[1] <= 112 for b in boxes)
    collimated = film((200, 160), [(10, 0, 130, 160)])  # one view: a border with unexposed film beyond it
    assert panel_boxes(collimated) == [(0, 0, 200, 160)]
    narrow = film((200, 160), [(0, 0, 190, 160), (190, 0, 200, 160)])  # a strip too narrow to be a view
    assert panel_boxes(narrow) == [(0, 0, 200, 160)]


def test_single_views_split_only_unifesp_films_and_are_cropped_when_loaded(tmp_path):
    composite = film((200, 120), [(4, 4, 98, 116), (102, 4, 196, 116)])
    composite.save(tmp_path / "composite.png")
    film((120, 200), [(10, 10, 110, 190)]).save(tmp_path / "single.png")
    samples = [
        Sample(tmp_path / "composite.png", ("wrist",), None, "a", "a", "unifesp"),
        Sample(tmp_path / "single.png", ("hand",), None, "b", "b", "unifesp"),
        Sample(tmp_path / "composite.png", ("forearm",), 0, "c", "c", "mura"),  # MURA images are single views
    ]
    views = single_views(samples)
    assert [(v.body_parts, v.source, v.panel) for v in views] == [
        (("wrist",), "unifesp", panel_boxes(composite)[0]),
        (("wrist",), "unifesp", panel_boxes(composite)[1]),
    ]
    assert group_of(views[0]) == "unifesp/wrist"  # drawn and balanced with its film's group
    images = load_images(samples[:1] + views, 64)
    left, _ = letterbox(composite.crop(views[0].panel), 64)
    assert torch.equal(images[1, 0], torch.tensor(np.asarray(left)))
    assert not torch.equal(images[0], images[1])  # the film itself stays a training image too
    assert "each view of a UNIFESP film" in recipe_story({"split_views": True})
    assert "each view of a UNIFESP film" not in recipe_story({})


def test_draws_give_crops_their_share_and_balance_groups():
    samples = [sample(["forearm"])] * 90 + [sample(["elbow"], "unifesp", None)] * 10
    samples += end_crops(samples[:5])
    assert draw_weights(samples, TrainSettings()) is None  # the plain shuffle
    weights = draw_weights(samples, TrainSettings(group_balance=0.0, crop_share=0.2))
    crop = torch.tensor([s.end is not None for s in samples])
    elbow = torch.tensor([s.source == "unifesp" for s in samples])
    assert float(weights[crop].sum()) == pytest.approx(0.2)
    assert float(weights[elbow].sum()) == pytest.approx(0.4)  # two groups of whole images, drawn alike
    natural = draw_weights(samples, TrainSettings(group_balance=1.0, crop_share=0.2))
    assert float(natural[elbow].sum()) == pytest.approx(0.8 * 10 / 100)


def test_region_balance_spreads_the_non_arm_share_over_regions():
    """The non-arm group keeps its share of the draws; within it, each region is drawn by its size to the power
    of the group balance, so 16 knees weigh half as much as 64 chests at 0.5, not a quarter."""
    other = [dataclasses.replace(sample(["other"], "unifesp", None), region=r) for r in ["Chest"] * 64 + ["Knee"] * 16]
    samples = [sample(["forearm"])] * 100 + other
    plain = draw_weights(samples, TrainSettings(group_balance=0.5))
    spread = draw_weights(samples, TrainSettings(group_balance=0.5, region_balance=True))
    non_arm = torch.tensor([s.body_parts == ("other",) for s in samples])
    knee = torch.tensor([s.region == "Knee" for s in samples])
    assert (
        float(spread[non_arm].sum())
        == pytest.approx(float(plain[non_arm].sum()))
        == pytest.approx(80**0.5 / (10 + 80**0.5))
    )
    assert torch.equal(spread[~non_arm], plain[~non_arm])  # a group without regions is drawn as before
    assert float(plain[knee].sum() / plain[non_arm & ~knee].sum()) == pytest.approx(16 / 64)
    assert float(spread[knee].sum() / spread[non_arm & ~knee].sum()) == pytest.approx(4 / 8)
    with pytest.raises(ValueError, match="needs --group-balance"):
        TrainSettings(region_balance=True)


def test_a_candidate_set_is_right_with_any_of_its_parts():
    config = ModelConfig()
    samples = [sample(["forearm"]), sample(["elbow", "wrist"], abnormal=None, end="first")]
    losses = Losses(config, samples)
    logits = torch.zeros(1, config.num_outputs)
    logits[:, config.body_part_classes.index("elbow")] = 2.0
    n = len(config.body_part_classes)
    p_elbow = math.exp(2) / (math.exp(2) + n - 1)
    p_other_class = 1 / (math.exp(2) + n - 1)
    weights = losses.sample_weight
    body_part_loss = losses(logits, torch.tensor([1]))  # the crop has no abnormality label: body part alone
    assert float(body_part_loss) == pytest.approx(-float(weights[1]) * math.log(p_elbow + p_other_class), rel=1e-5)
    first = losses(logits, torch.tensor([0]))
    assert float(first) > -float(weights[0]) * math.log(p_other_class)  # CE of forearm, plus the abnormality BCE


def test_the_body_part_alone_teaches_no_abnormality():
    """Without the abnormality loss the abnormality logits get no gradient and the body part's is unchanged."""
    config = ModelConfig()
    samples = [sample(["forearm"], abnormal=1), sample(["humerus"]), sample(["hand"], "unifesp", None)]
    index = torch.tensor([0, 1, 2])

    def grads(losses: Losses) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.randn(3, config.num_outputs, generator=torch.Generator().manual_seed(0)).requires_grad_()
        losses(logits, index).backward()
        return config.split_logits(logits.grad)

    (bp_both, ab_both), (bp_alone, ab_alone) = (
        grads(Losses(config, samples)),
        grads(Losses(config, samples, abnormality=False)),
    )
    assert ab_both.abs().sum() > 0 and torch.equal(ab_alone, torch.zeros_like(ab_alone))
    assert torch.allclose(bp_alone, bp_both)


def test_the_two_ends_of_one_image_are_scored_as_a_pair():
    """Calling both ends of a forearm "elbow" is right for each crop alone but wrong for the pair."""
    config = ModelConfig()
    whole = [sample(["forearm"]), sample(["humerus"])]
    samples = whole + end_crops(whole)
    assert crop_siblings(samples).tolist() == [-1, -1, 3, -1, 5, -1]
    losses = Losses(config, samples)
    elbow, wrist = (config.body_part_classes.index(p) for p in ("elbow", "wrist"))

    def loss(first: int, last: int, index=(2, 3)) -> float:
        logits = torch.zeros(2, config.num_outputs)
        logits[0, first] = logits[1, last] = 4.0
        return float(losses(logits, torch.tensor(index)))

    assert loss(elbow, wrist) == pytest.approx(loss(wrist, elbow))  # either end may be the elbow
    assert loss(elbow, elbow) > loss(elbow, wrist) + 1.0
    assert loss(elbow, elbow, index=(3, 2)) < loss(elbow, elbow)  # out of order: each crop alone
    weights = draw_weights(samples, TrainSettings(group_balance=1.0, crop_share=0.5))
    assert weights[[3, 5]].tolist() == [0.0, 0.0]  # a pair is drawn through its first end


def test_the_source_prior_stops_the_loss_teaching_a_source_look():
    """With the source prior, a MURA forearm's loss no longer pushes down the logits of parts MURA never
    shows (what teaches "MURA look -> forearm or humerus"), while it still tells forearm from humerus;
    end crops keep their plain loss, and the prior follows the draws."""
    config = ModelConfig()
    samples = [sample(["forearm"])] * 60 + [sample(["humerus"])] * 20 + [sample(["wrist"], "unifesp", None)] * 3
    samples += [sample(["other"], "unifesp", None)] * 9
    samples += end_crops(samples[:1])
    wrist, other, humerus = (config.body_part_classes.index(p) for p in ("wrist", "other", "humerus"))

    def grad_of_forearm_loss(losses: Losses) -> torch.Tensor:
        logits = torch.zeros(1, config.num_outputs, requires_grad=True)
        losses(logits, torch.tensor([0])).backward()
        return config.split_logits(logits.grad)[0][0]

    plain, adjusted = (
        grad_of_forearm_loss(Losses(config, samples)),
        grad_of_forearm_loss(Losses(config, samples, source_prior=1.0)),
    )
    for part in (wrist, other):  # pushed down without the prior; next to nothing with it
        assert plain[part] > 0.05 and 0 < adjusted[part] < plain[part] / 5
    assert adjusted[humerus] > 0.1 > 5 * adjusted[wrist]  # forearm against humerus: still learnt from MURA
    losses = Losses(config, samples, source_prior=1.0)
    assert losses.adjust[-2:].abs().sum() == 0  # end crops: no prior
    assert losses.adjust[0, wrist] < losses.adjust[80, wrist] < 0  # MURA shows no wrist; UNIFESP some
    balanced = Losses(config, samples, draw_weights(samples, TrainSettings(group_balance=0.0)), 1.0)
    assert balanced.adjust[80, other] < losses.adjust[80, other]  # drawn as often as the wrists: a smaller prior


def test_the_source_mask_leaves_out_only_the_parts_a_source_never_shows():
    """With the source mask, a MURA forearm's loss is silent on arm parts MURA never shows and still teaches
    forearm against humerus (no prior tilts that balance) and against other; a UNIFESP image is taught against
    every part UNIFESP shows but not humerus; an end crop makes its candidates parts its source shows."""
    config = ModelConfig()
    samples = [sample(["forearm"])] * 60 + [sample(["humerus"])] * 20 + [sample(["wrist"], "unifesp", None)] * 3
    samples += [sample(["other"], "unifesp", None)] * 9
    index = {p: config.body_part_classes.index(p) for p in ("wrist", "other", "humerus", "elbow")}

    masked = Losses(config, samples, source_mask=True)
    forearm, wrist = body_part_grad(masked, 0), body_part_grad(masked, 80)
    assert torch.isfinite(forearm).all() and torch.isfinite(wrist).all()
    assert forearm[index["wrist"]] == 0 and forearm[index["elbow"]] == 0
    assert forearm[index["humerus"]] > 0.1 and forearm[index["other"]] > 0.1  # a MURA image is known not to be other
    assert wrist[index["other"]] > 0.1 and wrist[index["humerus"]] == 0
    with_crops = Losses(config, samples + end_crops(samples[:1]), source_mask=True)
    assert body_part_grad(with_crops, 0)[index["wrist"]] > 0.05  # crops show MURA wrists: now taught against
    plain = body_part_grad(Losses(config, samples), 0)
    margin = body_part_grad(Losses(config, samples, source_mask=True, mask_margin=2.0), 0)
    assert 0 < margin[index["wrist"]] < plain[index["wrist"]] / 3  # a margin: pushed down, but gently
    assert margin[index["humerus"]] > 0.1


def test_part_weights_scale_only_the_loss_of_that_class_images():
    """`--other-weight w` / `--part-weights forearm=w`: an image of that class pulls w times harder in the body-part
    loss; the other images' loss is unchanged, a run's settings give both, and the card names each lever."""
    config = ModelConfig()
    samples = [sample(["forearm"])] * 20 + [sample(["wrist"], "unifesp", None)] * 3
    samples += [sample(["other"], "unifesp", None)] * 9

    plain = Losses(config, samples)
    for weights, weighted_row, others in (({"other": 3.0}, 25, (0, 20)), ({"forearm": 3.0}, 0, (20, 25))):
        weighted = Losses(config, samples, part_weights=weights)
        for row in others:
            assert torch.equal(body_part_grad(plain, row), body_part_grad(weighted, row))
        assert torch.allclose(body_part_grad(weighted, weighted_row), 3 * body_part_grad(plain, weighted_row))
        assert body_part_grad(plain, weighted_row).abs().sum() > 0.1
    assert "3.0 times their class weight" in recipe_story({"other_weight": 3.0})
    assert "forearm images weigh 2.0 times" in recipe_story({"part_weights": "forearm=2"})
    assert "class weight in the body-part" not in recipe_story({})
    assert parse_part_weights(" forearm=2, wrist=1.5 ") == {"forearm": 2.0, "wrist": 1.5}
    assert TrainSettings(other_weight=3, part_weights="forearm=2").body_part_weights() == {"forearm": 2, "other": 3}
    with pytest.raises(ValueError, match="--other-weight must be positive"):
        TrainSettings(other_weight=0.0)
    for text, reason in (("other=2", "--other-weight"), ("radius=2", "not one of"), ("forearm", "PART=WEIGHT")):
        with pytest.raises(ValueError, match=reason):
            TrainSettings(part_weights=text)
    with pytest.raises(ValueError, match="forearm's weight must be positive"):
        TrainSettings(part_weights="forearm=0")


def test_mixstyle_mixes_channel_statistics_between_images_and_only_inside_the_with_statement():
    """`--mix-styles p`: mixed per-channel feature means lie within the batch's (each channel's normalised layout is
    kept), and p = 0 changes nothing; the hooks on the training loop's blocks act only inside the with statement."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 8, 8, generator=g) * torch.rand(6, 4, 1, 1, generator=g) * 3 + torch.randn(6, 4, 1, 1)
    assert torch.equal(mix_feature_styles(x, g, 0.0), x)
    mixed = mix_feature_styles(x, torch.Generator().manual_seed(1), 1.0)
    mean, new_mean = x.mean((2, 3)), mixed.mean((2, 3))
    lo, hi = mean.min(0).values, mean.max(0).values
    assert ((new_mean >= lo - 1e-4) & (new_mean <= hi + 1e-4)).all()
    assert not torch.allclose(new_mean, mean, atol=1e-3)  # Beta(0.1, 0.1) is near 0 or 1: most images move

    def standardise(t):
        return (t - t.mean((2, 3), keepdim=True)) / t.std((2, 3), keepdim=True)

    assert torch.allclose(standardise(mixed), standardise(x), atol=1e-3)

    model = create_model(ModelConfig(input_size=64)).eval()  # no dropout: the same images give the same row
    images = torch.randn(4, 3, 64, 64, generator=g)
    before = model(images)
    blocks = [model.backbone.blocks[i] for i in MIX_STYLE_BLOCKS]
    with mixing_feature_styles(blocks, torch.Generator().manual_seed(2), 1.0):
        during = model(images)
    assert not torch.allclose(during, before, atol=1e-4)
    assert torch.equal(model(images), before)  # released on the way out
    with mixing_feature_styles(blocks, g, 0.0):
        assert torch.equal(model(images), before)
    assert "MixStyle in training: for 50% of the images" in recipe_story({"mix_styles": 0.5})
    with pytest.raises(ValueError, match="--mix-styles is the share"):
        TrainSettings(mix_styles=1.5)
