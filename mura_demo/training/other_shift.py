"""A shift of the body-part head's *other* logit, chosen on the holdout (``--other-shift``).

After training, the decision between *other* (not an arm radiograph) and the arm parts has one free number left: a
constant added to the *other* logit, the threshold of that one-vs-rest decision. Raising the *other* weight in the
loss traded forearms for non-arm images along one frontier (session 38); the shift moves along the same frontier
for the price of none of the training, so the holdout chooses it like the flip, the view and the thresholds. It
ships inside the weights (the head's bias), so serving reads it without knowing it is there.

The holdout that chooses the shift also judges it, so :func:`choose_other_shift` also gives *cross-fitted*
probabilities: the holdout's patients in two fixed halves, each half read with the shift chosen on the other one.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.config import ModelConfig
from .data import Sample, bucket
from .evaluate import body_part_merit, body_part_summary

OTHER_SHIFTS = tuple(float(s) for s in np.arange(-3.0, 3.0 + 1e-9, 0.25))


def shifted_other(bp_prob: torch.Tensor, shift: float) -> torch.Tensor:
    """Body-part probabilities with ``shift`` added to the *other* logit (the last class): the same as the head's
    bias raised by ``shift``, since a softmax forgets a constant added to every logit."""
    logits = bp_prob.double().clamp_min(1e-300).log()
    logits[:, -1] += shift
    return logits.softmax(1).to(bp_prob.dtype)


def best_shift(config: ModelConfig, samples: list[Sample], bp_prob: torch.Tensor, view_choice: str) -> float:
    """The shift in :data:`OTHER_SHIFTS` with the best body-part merit on ``samples`` (ties keep the smallest
    |shift|, then the lower one; no samples keep 0)."""
    if not samples:
        return 0.0
    merit = {
        shift: body_part_merit(body_part_summary(config, samples, shifted_other(bp_prob, shift)), view_choice)
        for shift in sorted(OTHER_SHIFTS, key=abs)
    }
    return max(merit, key=merit.get)  # the first of equals in |shift| order


def half_of(sample: Sample) -> int:
    """The fixed half (0 or 1) of the holdout a sample's patient falls in, for cross-fitting."""
    return bucket(f"other-shift:{sample.source}:{sample.patient}") % 2


def choose_other_shift(config: ModelConfig, samples: list[Sample], bp_prob: torch.Tensor, view_choice: str) -> dict:
    """The shift chosen on all of ``samples`` and the cross-fitted probabilities that judge the choice.

    Returns ``shift``, ``half_shifts`` (the shift chosen on each half, applied to the other) and ``cross_fitted``
    (``bp_prob`` with each half shifted by the other half's choice).
    """
    halves = np.array([half_of(s) for s in samples])
    cross_fitted = bp_prob.clone()
    half_shifts = []
    for half in (0, 1):
        chooser = np.flatnonzero(halves != half)
        shift = best_shift(config, [samples[i] for i in chooser], bp_prob[chooser], view_choice)
        rows = torch.from_numpy(np.flatnonzero(halves == half))
        cross_fitted[rows] = shifted_other(bp_prob[rows], shift)
        half_shifts.append(shift)
    return {
        "shift": best_shift(config, samples, bp_prob, view_choice),
        "half_shifts": half_shifts,
        "cross_fitted": cross_fitted,
    }


@torch.no_grad()
def shift_other_logit(
    model: torch.nn.Module, samples: list[Sample], bp_prob: torch.Tensor, view_choice: str
) -> tuple[torch.Tensor, dict]:
    """Choose the shift on the holdout (``samples``, read as ``bp_prob``) and add it to the body-part head's
    *other* bias as the weights file stores it (float16). Returns the holdout's probabilities as served and the
    figures for the run's record: the shift, each half's, and the cross-fitted figures per source and part."""
    config = model.config
    choice = choose_other_shift(config, samples, bp_prob, view_choice)
    bias = model.body_part_head.bias
    before = float(bias[-1])
    bias[-1] = bias[-1].add(choice["shift"]).half()
    served = shifted_other(bp_prob, float(bias[-1]) - before)  # the stored shift, float16 rounding and all
    cross_fitted = body_part_summary(config, samples, choice["cross_fitted"])
    record = {
        "shift": choice["shift"],
        "half_shifts": choice["half_shifts"],
        "holdout_body_part_accuracy_cross_fitted": cross_fitted["body_part_accuracy"],
        "holdout_body_part_images_right_cross_fitted": cross_fitted["body_part_images_right"],
        "holdout_body_part_by_group_cross_fitted": cross_fitted["body_part_by_group"],
    }
    return served, record
