"""The reading's rules on given probabilities: when a reading is validated, uncertain, to be confirmed or
left out; every rule the app, the API, the CLI and batch runs share."""

from __future__ import annotations

import dataclasses

import pytest

from mura_demo.core.config import BODY_PARTS, OTHER, ModelConfig
from mura_demo.serving.reading import (
    AUTO,
    CHOSEN,
    DETECTED,
    NEEDS_CONFIRMATION,
    NOT_ARM,
    NOT_UPPER_EXTREMITY,
    UNCERTAIN,
    ViewScores,
    read_study,
    read_view,
)
from mura_demo.serving.report import reading_lines

CONFIG = ModelConfig(
    validated={p: p in ("forearm", "humerus") for p in BODY_PARTS},
    thresholds=dict.fromkeys(BODY_PARTS, 0.5),
    body_part_min_probability=0.8,
)
CONFIRMING = dataclasses.replace(
    CONFIG, body_part_confirmation=True, body_part_confirmation_reason="it named 40% of unseen-source parts right"
)


def scores(abnormal: float = 0.7, **body_part: float) -> ViewScores:
    """Body-part probabilities as given (the rest shared out evenly), abnormality ``abnormal`` for every part."""
    classes = (*BODY_PARTS, OTHER)
    rest = (1 - sum(body_part.values())) / (len(classes) - len(body_part))
    return ViewScores({c: body_part.get(c, rest) for c in classes}, dict.fromkeys(BODY_PARTS, abnormal))


def test_a_confident_detection_of_a_validated_part_is_validated():
    p = read_view(CONFIG, scores(forearm=0.95), AUTO, None, "r1")
    assert (p.body_part, p.body_part_status, p.validated, p.note) == ("forearm", DETECTED, True, "")
    assert p.verdict == "abnormal" and p.abnormality_probability == 0.7 and p.threshold == 0.5


def test_below_the_confidence_level_the_part_is_uncertain_and_never_validated():
    p = read_view(CONFIG, scores(forearm=0.6, wrist=0.3), AUTO, None, "r1")
    assert p.body_part_status == UNCERTAIN and p.validated is False
    assert p.body_part_candidates[:2] == ["forearm", "wrist"]
    assert "uncertain (forearm 60%, wrist 30%" in p.note and "Choose" in p.note
    assert p.abnormality_probability == 0.7  # still read, for teaching, but flagged


def test_a_tie_is_uncertain_even_above_the_level():
    tie = dataclasses.replace(CONFIG, body_part_min_probability=0.0)
    p = read_view(tie, scores(forearm=0.45, humerus=0.45), AUTO, None, "r1")
    assert p.body_part_status == UNCERTAIN and p.validated is False


def test_confirmation_required_means_a_detection_alone_is_never_validated():
    p = read_view(CONFIRMING, scores(forearm=0.99), AUTO, None, "r1")
    assert p.body_part_status == NEEDS_CONFIRMATION and p.validated is False
    assert "Confirm the body part (choose forearm)" in p.note and "40% of unseen-source" in p.note
    confirmed = read_view(CONFIRMING, scores(forearm=0.99), "forearm", None, "r1")
    assert confirmed.body_part_status == CHOSEN and confirmed.validated is True and confirmed.note == ""


def test_a_part_without_abnormality_training_is_never_validated():
    for requested in (AUTO, "wrist"):
        p = read_view(CONFIG, scores(wrist=0.97), requested, None, "r1")
        assert p.body_part == "wrist" and p.validated is False and "not validated for wrist" in p.note


def test_a_part_forced_on_an_image_the_head_calls_other_is_never_validated():
    p = read_view(CONFIG, scores(other=0.9), "forearm", None, "r1")
    assert p.body_part == "forearm" and p.body_part_status == CHOSEN and p.validated is False
    assert "not an upper-extremity radiograph (other 90%)" in p.note
    auto = read_view(CONFIG, scores(other=0.9), AUTO, None, "r1")
    assert auto.body_part is None and auto.verdict == NOT_UPPER_EXTREMITY and auto.validated is None
    assert auto.body_part_status == NOT_ARM and auto.abnormality_probability is None


def test_a_study_leaves_out_and_names_views_answered_other():
    views = [scores(0.9, forearm=0.95), scores(0.1, other=0.9), scores(0.7, forearm=0.9)]
    reading = read_study(CONFIG, views, AUTO, None, "r1")
    st = reading.study
    assert st["views_answered_other"] == [2] and st["n_views"] == 3  # counted from 1, as on the page
    assert st["body_part"] == "forearm" and st["validated"] is True
    assert st["abnormality_probability"] == pytest.approx(0.8)  # views 1 and 3 only
    assert reading.views[1].verdict == NOT_UPPER_EXTREMITY and reading.views[1].abnormality_probability is None
    assert st["views_disagreeing_on_body_part"] == [2]


def test_as_many_other_views_as_part_views_is_uncertain():
    reading = read_study(CONFIG, [scores(forearm=0.95), scores(other=0.95)], AUTO, None, "r1")
    assert reading.study["body_part_status"] == UNCERTAIN and reading.study["validated"] is False
    assert "As many views look like no upper-extremity radiograph (view 2)" in reading.study["note"]


def test_mostly_other_views_make_no_upper_extremity_study():
    views = [scores(forearm=0.95), scores(other=0.95), scores(other=0.9)]
    reading = read_study(CONFIG, views, AUTO, None, "r1")
    assert reading.study["body_part"] is None and reading.study["verdict"] == NOT_UPPER_EXTREMITY


def test_a_study_that_is_no_upper_extremity_radiograph_is_told_in_two_lines():
    """The heading says it once; the lines give the figure and what to do (on a phone both fit the first screen),
    and name the views answered *other* only when some were not."""
    lines = reading_lines(read_study(CONFIG, [scores(other=0.9), scores(other=0.8)], AUTO, None, "r1").study)
    assert lines[0] == "Body part: other (the model gives it 85%; mean of the views)" and "choose its body" in lines[1]
    assert len(lines) == 3 and lines[2].startswith("Model: ")
    views = [scores(forearm=0.95), scores(other=0.95), scores(other=0.9)]
    assert "Not upper-extremity radiographs: view 2, 3" in reading_lines(
        read_study(CONFIG, views, AUTO, None, "r1").study
    )
    views = [scores(forearm=0.95), scores(other=0.9), scores(forearm=0.9)]
    assert "Left out as not upper-extremity radiographs: view 2" in reading_lines(
        read_study(CONFIG, views, AUTO, None, "r1").study
    )


def test_a_tie_between_parts_in_a_study_is_uncertain_not_the_first_class():
    tie = dataclasses.replace(CONFIG, body_part_min_probability=0.0)
    views = [scores(forearm=0.9, humerus=0.05), scores(humerus=0.9, forearm=0.05)]
    reading = read_study(tie, views, AUTO, None, "r1")
    assert reading.study["body_part_status"] == UNCERTAIN and reading.study["validated"] is False
    assert set(reading.study["body_part_candidates"][:2]) == {"forearm", "humerus"}


def test_a_study_every_view_of_which_is_other_can_be_forced_but_not_validated():
    views = [scores(other=0.9), scores(other=0.95)]
    reading = read_study(CONFIG, views, "humerus", None, "r1")
    st = reading.study
    assert st["body_part"] == "humerus" and st["validated"] is False and "not an upper-extremity" in st["note"]
    assert all(v.body_part == "humerus" and v.validated is False for v in reading.views)


def test_a_study_of_one_view_reads_as_the_view():
    for view in (scores(forearm=0.95), scores(other=0.9), scores(forearm=0.6, wrist=0.3)):
        for requested in (AUTO, "forearm", "wrist"):
            alone = read_view(CONFIG, view, requested, 0.3, "r1").to_dict()
            study = read_study(CONFIG, [view], requested, 0.3, "r1")
            assert study.views[0].to_dict() == alone
            assert {k: study.study[k] for k in alone} == alone


def test_verdicts_follow_the_reported_figures_at_any_threshold():
    view = scores(0.123449, forearm=0.95)
    assert read_view(CONFIG, view, AUTO, None, "r1").abnormality_probability == 0.1234
    assert read_view(CONFIG, view, AUTO, 0.1234, "r1").verdict == "abnormal"  # equal as reported: abnormal
    assert read_view(CONFIG, view, AUTO, 0.12345, "r1").verdict == "normal"  # 0.1235 as reported
    other = read_view(CONFIG, scores(other=0.9), AUTO, 0.3, "r1")
    assert other.verdict == NOT_UPPER_EXTREMITY and other.threshold is None
