"""The pipeline: image in -> preprocessing -> model -> explanations -> presentation.

:class:`Predictor` is what the Gradio app, the CLI and the benchmarks call; it needs no Gradio.
One lock guards the model, so concurrent requests never share hook state.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import OTHER
from .explain import DEFAULT_METHODS, explain
from .imaging import ImageInputError, load_image, load_views
from .model import split_logits
from .preprocess import Box, to_model_input
from .render import overlay
from .weights import LoadedModel, load_model

AUTO = "auto"
NOT_UPPER_EXTREMITY = "not an upper-extremity radiograph"


@dataclasses.dataclass
class Prediction:
    """What the model says about one radiograph; ``to_dict`` is the API's JSON answer."""

    body_part: str | None  # the part whose abnormality logit was used (None: not upper extremity)
    body_part_source: str  # "model" or "user"
    predicted_body_part: str  # the body-part head's own top class, "other" included
    body_part_probabilities: dict[str, float]
    abnormality_probability: float | None
    threshold: float | None
    verdict: str  # "abnormal", "normal" or NOT_UPPER_EXTREMITY
    validated: bool | None  # whether the abnormality model was validated for body_part
    model: str
    weights_revision: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Analysis:
    """A prediction with the maps behind it and what is needed to draw them."""

    prediction: Prediction
    image: Image.Image
    box: Box
    maps: dict[str, np.ndarray]

    def overlays(self, opacity: float = 0.5, colormap: str = "jet") -> dict[str, np.ndarray]:
        return {m: overlay(self.image, cam, self.box, opacity, colormap) for m, cam in self.maps.items()}


class Predictor:
    """Body part, abnormality and explanation maps for uploaded radiographs."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.config
        self.target_layer = self.model.get_submodule(self.config.cam_layer)
        self.lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: str | None = None) -> Predictor:
        return cls(load_model(spec))

    @property
    def body_part_choices(self) -> list[str]:
        return [AUTO, *self.config.body_parts]

    def check_body_part(self, body_part: str) -> str:
        body_part = (body_part or AUTO).strip().lower()
        if body_part not in self.body_part_choices:
            raise ImageInputError(
                f"Unknown body part '{body_part}'. Choose one of: {', '.join(self.body_part_choices)}."
            )
        return body_part

    def route(self, logits: torch.Tensor, body_part: str) -> str | None:
        """The part to read abnormality from: the user's choice, else the model's (None: other)."""
        if body_part != AUTO:
            return body_part
        top = self.config.body_part_classes[int(split_logits(self.config, logits)[0].argmax(1))]
        return None if top == OTHER else top

    def analyze(
        self, source: str | Path | bytes, body_part: str = AUTO, methods=DEFAULT_METHODS, threshold: float | None = None
    ) -> Analysis:
        """Read, classify and explain one radiograph in a single forward/backward pass."""
        body_part, threshold = self.check_request(body_part, threshold)
        image = load_image(source)
        x, box = to_model_input(image, self.config)

        def choose(logits: torch.Tensor) -> int | None:
            part = self.route(logits, body_part)
            return None if part is None else self.config.abnormality_index(part)

        with self.lock:
            logits, maps = explain(self.model, self.target_layer, x, choose, methods)
        return Analysis(self.interpret(logits, body_part, threshold), image, box, maps)

    def check_request(self, body_part: str, threshold: float | None) -> tuple[str, float | None]:
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ImageInputError("The decision threshold must lie strictly between 0 and 1.")
        return self.check_body_part(body_part), threshold

    def predict_study(self, sources, body_part: str = AUTO, threshold: float | None = None) -> dict:
        """Read several views of one study (multi-frame DICOM frames count as views).

        The study's body part is the top class of the views' mean body-part probabilities (or the
        user's choice); every view is read for that part and the study's probability is the mean of
        the views', as in the MURA paper. Views that disagree on the part are listed, not hidden.
        """
        body_part, threshold = self.check_request(body_part, threshold)
        views = [view for source in sources for view in load_views(source)]
        if not views:
            raise ImageInputError("A study needs at least one image.")
        logits = [self.view_logits(view) for view in views]  # one forward pass per view
        first = [self.interpret(lg, AUTO, threshold) for lg in logits]
        mean_probs = {
            c: float(np.mean([p.body_part_probabilities[c] for p in first])) for c in self.config.body_part_classes
        }
        part = body_part if body_part != AUTO else max(mean_probs, key=mean_probs.get)
        disagreeing = [i for i, p in enumerate(first) if p.predicted_body_part != part]
        if part == OTHER:
            readings = first
            study = {
                "abnormality_probability": None,
                "threshold": None,
                "verdict": NOT_UPPER_EXTREMITY,
                "validated": None,
            }
        else:
            readings = [self.interpret(lg, part, threshold) for lg in logits]
            p = float(np.mean([r.abnormality_probability for r in readings]))
            t, verdict = self.decide(part, p, threshold)
            study = {
                "abnormality_probability": round(p, 4),
                "threshold": round(t, 4),
                "verdict": verdict,
                "validated": bool(self.config.validated[part]),
            }
        return {
            "views": [r.to_dict() for r in readings],
            "study": {
                "body_part": None if part == OTHER else part,
                "body_part_source": "model" if body_part == AUTO else "user",
                "body_part_probabilities": {k: round(v, 4) for k, v in mean_probs.items()},
                "views_disagreeing_on_body_part": disagreeing,
                "n_views": len(views),
                **study,
                "model": self.config.architecture,
                "weights_revision": self.loaded.revision,
            },
        }

    def view_logits(self, image: Image.Image) -> torch.Tensor:
        """The model output for an already decoded greyscale image (forward pass only)."""
        x, _ = to_model_input(image, self.config)
        with self.lock, torch.inference_mode():
            return self.model(x)

    def decide(self, part: str, probability: float, threshold: float | None) -> tuple[float, str]:
        """The threshold in force for ``part`` (the user's, else the calibrated one) and the verdict at it."""
        t = float(threshold if threshold is not None else self.config.thresholds[part])
        return t, "abnormal" if probability >= t else "normal"

    def predict(self, source: str | Path | bytes, body_part: str = AUTO, threshold: float | None = None) -> Prediction:
        """Body part and abnormality only: one forward pass, no maps."""
        body_part, threshold = self.check_request(body_part, threshold)
        return self.interpret(self.view_logits(load_image(source)), body_part, threshold)

    def interpret(self, logits: torch.Tensor, body_part: str, threshold: float | None) -> Prediction:
        cfg = self.config
        bp_logits, ab_logits = split_logits(cfg, logits.float())
        bp_prob = bp_logits.softmax(1)[0]
        probs = {name: round(float(p), 4) for name, p in zip(cfg.body_part_classes, bp_prob)}
        predicted = cfg.body_part_classes[int(bp_prob.argmax())]
        part = self.route(logits, body_part)
        common = dict(
            body_part_source="model" if body_part == AUTO else "user",
            predicted_body_part=predicted,
            body_part_probabilities=probs,
            model=cfg.architecture,
            weights_revision=self.loaded.revision,
        )
        if part is None:
            return Prediction(
                None,
                abnormality_probability=None,
                threshold=None,
                verdict=NOT_UPPER_EXTREMITY,
                validated=None,
                **common,
            )
        p = float(ab_logits[0, cfg.body_parts.index(part)].sigmoid())
        t, verdict = self.decide(part, p, threshold)
        return Prediction(
            part,
            abnormality_probability=round(p, 4),
            threshold=round(t, 4),
            verdict=verdict,
            validated=bool(cfg.validated[part]),
            **common,
        )
