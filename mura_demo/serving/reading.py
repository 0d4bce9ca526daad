"""The reading: the rules that turn the model's probabilities into what a user is told.

Pure functions over probabilities (no network, no Gradio), the one definition of each rule for
the app, the API, the command line, batch runs and reports:

- which body part a view or a study is read as, and when that part is uncertain;
- when a reading may be presented as validated (the part is validated, and it was chosen by the
  user or detected with enough confidence, and confirmed where the weights say detection alone
  cannot be trusted; never when the image does not look like an upper-extremity radiograph);
- the verdict at the threshold in force, decided from the figures as reported.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..core.config import OTHER, ModelConfig

AUTO = "auto"
NOT_UPPER_EXTREMITY = "not an upper-extremity radiograph"
DECIMALS = 4  # probabilities and thresholds are reported, and decided, at this precision
N_CANDIDATES = 3

# body_part_status values
DETECTED = "detected"
CHOSEN = "chosen by the user"
UNCERTAIN = "uncertain"
NEEDS_CONFIRMATION = "needs confirmation"
NOT_ARM = "not upper extremity"


@dataclasses.dataclass
class ViewScores:
    """The model's answer for one view: probabilities of every body-part class and of abnormality per part."""

    body_part: dict[str, float]  # every body-part class, "other" included; sums to 1
    abnormality: dict[str, float]  # every MURA body part

    @property
    def top(self) -> str:
        return max(self.body_part, key=self.body_part.get)


@dataclasses.dataclass
class Prediction:
    """What the model says about one radiograph; ``to_dict`` is the API's JSON answer."""

    body_part: str | None  # the part whose abnormality logit was used (None: not upper extremity)
    body_part_source: str  # "model" or "user"
    body_part_status: str  # detected, chosen by the user, uncertain, needs confirmation, not upper extremity
    predicted_body_part: str  # the body-part head's own top class, "other" included
    body_part_probabilities: dict[str, float]
    body_part_candidates: list[str]  # the likeliest parts, best first (what to choose from when uncertain)
    abnormality_probability: float | None
    threshold: float | None
    verdict: str  # "abnormal", "normal" or NOT_UPPER_EXTREMITY
    validated: bool | None  # whether this reading may be presented as validated (None: no reading)
    note: str  # why a reading is not validated, or what to do; empty when there is nothing to say
    model: str
    weights_revision: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def rounded(value: float) -> float:
    return round(float(value), DECIMALS)


def decide(config: ModelConfig, part: str, probability: float, threshold: float | None) -> dict:
    """The probability, the threshold in force for ``part`` (the user's, else the model's own)
    and the verdict at it. Both numbers are rounded as reported, and the verdict is taken from the
    rounded ones, so it never disagrees with the figures beside it."""
    p = rounded(probability)
    t = rounded(threshold if threshold is not None else config.thresholds[part])
    return {"abnormality_probability": p, "threshold": t, "verdict": "abnormal" if p >= t else "normal"}


def candidates(config: ModelConfig, probabilities: dict[str, float]) -> list[str]:
    """The likeliest upper-extremity parts, best first."""
    return sorted(config.body_parts, key=lambda part: -probabilities[part])[:N_CANDIDATES]


def percent(probabilities: dict[str, float], parts: list[str]) -> str:
    return ", ".join(f"{part} {probabilities[part]:.0%}" for part in parts)


def routed_part(config: ModelConfig, probabilities: dict[str, float], requested: str) -> tuple[str | None, str]:
    """The part to read abnormality from and the status of that choice (not yet validation)."""
    if requested != AUTO:
        return requested, CHOSEN
    top = max(probabilities, key=probabilities.get)
    if top == OTHER:
        return None, NOT_ARM
    ranked = sorted(probabilities.values(), reverse=True)
    if probabilities[top] < config.body_part_min_probability or rounded(ranked[0]) == rounded(ranked[1]):
        return top, UNCERTAIN
    return top, NEEDS_CONFIRMATION if config.body_part_confirmation else DETECTED


def validation(config: ModelConfig, part: str, status: str, probabilities: dict[str, float], looks_other: bool):
    """Whether a reading of ``part`` may be presented as validated, and the note that says why not."""
    if looks_other:
        return False, (
            f"You chose {part}, but the model reads this image as not an upper-extremity radiograph "
            f"(other {probabilities[OTHER]:.0%}): this reading is not validated."
        )
    if status == UNCERTAIN:
        shown = percent(probabilities, candidates(config, probabilities))
        return False, f"The body part is uncertain ({shown}). Choose it to get a reading that can be validated."
    if not config.validated[part]:
        return False, f"The abnormality model is not validated for {part}: it had no labelled {part} studies."
    if status == NEEDS_CONFIRMATION:
        return False, (
            f"Detected {part} ({probabilities[part]:.0%}). Confirm the body part (choose {part}) for a validated "
            f"reading: {config.body_part_confirmation_reason}"
        )
    return True, ""


def read(
    config: ModelConfig,
    probabilities: dict[str, float],
    abnormality: float | None,
    part: str | None,
    status: str,
    threshold: float | None,
    revision: str,
    looks_other: bool,
    source: str,
) -> Prediction:
    """A reading of ``part`` (None: not upper extremity) from the given probabilities."""
    shown = {name: rounded(p) for name, p in probabilities.items()}
    common = dict(
        body_part_source=source,
        body_part_status=status,
        predicted_body_part=max(probabilities, key=probabilities.get),
        body_part_probabilities=shown,
        body_part_candidates=candidates(config, probabilities),
        model=config.model_name,
        weights_revision=revision,
    )
    if part is None:
        note = "No abnormality reading is given; if it is an arm, choose its body part to read it."
        return Prediction(None, **common, abnormality_probability=None, threshold=None, verdict=NOT_UPPER_EXTREMITY,
                          validated=None, note=note)  # fmt: skip
    validated, note = validation(config, part, status, probabilities, looks_other)
    return Prediction(part, **common, **decide(config, part, abnormality, threshold), validated=validated, note=note)


def read_view(
    config: ModelConfig, scores: ViewScores, requested: str, threshold: float | None, revision: str
) -> Prediction:
    """One view's reading, at the user's part or at the part the model detects."""
    part, status = routed_part(config, scores.body_part, requested)
    return read(
        config,
        scores.body_part,
        None if part is None else scores.abnormality[part],
        part,
        status,
        threshold,
        revision,
        looks_other=requested != AUTO and scores.top == OTHER,
        source="model" if requested == AUTO else "user",
    )


@dataclasses.dataclass
class StudyReading:
    """A study's reading and each view's reading at the study's part (views answered other: unread)."""

    study: dict
    views: list[Prediction]


def read_study(
    config: ModelConfig, scores: list[ViewScores], requested: str, threshold: float | None, revision: str
) -> StudyReading:
    """The views of one study read together (views are numbered from 1 in what it says).

    Views the body-part head answers *other* are left out and named. With "auto", a study whose
    views are mostly *other* is not an upper-extremity study, and as many *other* views as part
    views is a tie: uncertain. The study's part is the top class of the kept views' mean body-part
    probabilities (uncertain under the confidence level or in a tie); its abnormality probability is
    the mean of the kept views' for that part, as in the MURA paper. A part the user forces on views
    that are all *other* is read, and never validated.
    """
    others = [i for i, s in enumerate(scores) if s.top == OTHER]
    kept = [i for i in range(len(scores)) if i not in others] or list(range(len(scores)))
    mean = {c: float(np.mean([scores[i].body_part[c] for i in kept])) for c in config.body_part_classes}
    part, status = routed_part(config, mean, requested)
    tied = False  # as many views answered other as views of a part
    if requested == AUTO and part is not None:
        if len(others) > len(scores) - len(others):
            part, status = None, NOT_ARM
        elif len(others) == len(scores) - len(others):
            status, tied = UNCERTAIN, True
    abnormality = None if part is None else float(np.mean([scores[i].abnormality[part] for i in kept]))
    looks_other = len(others) == len(scores)
    source = "model" if requested == AUTO else "user"
    reading = read(config, mean, abnormality, part, status, threshold, revision, looks_other, source)
    if tied:
        listed = ", ".join(str(i + 1) for i in others)
        reading.note = (
            f"As many views look like no upper-extremity radiograph (view {listed}) as like a {part}: the study's "
            "body part is uncertain. Choose it to get a reading that can be validated."
        )
    views = []
    for i, view in enumerate(scores):
        if part is None or (i in others and not looks_other):
            views.append(read_view(config, view, AUTO, threshold, revision))
        else:
            views.append(read(config, view.body_part, view.abnormality[part], part, status, threshold, revision,
                              looks_other, source))  # fmt: skip
    study = reading.to_dict() | {
        "n_views": len(scores),
        "views_answered_other": [i + 1 for i in others],
        "views_disagreeing_on_body_part": [i + 1 for i, s in enumerate(scores) if part and s.top != part],
    }
    return StudyReading(study, views)
