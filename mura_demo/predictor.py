"""The pipeline: image in -> preprocessing -> model -> explanations -> presentation.

:class:`Predictor` is what the Gradio app, the CLI and the benchmarks call; it needs no Gradio.
One lock guards the model, so concurrent requests never share hook state.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import OTHER
from .explain import DEFAULT_METHODS, SLOW_METHODS, explain
from .imaging import ImageInputError, load_image, load_views
from .inference import answer_from
from .model import split_logits
from .preprocess import Box, to_model_input
from .render import overlay
from .weights import LoadedModel, load_model

AUTO = "auto"
NOT_UPPER_EXTREMITY = "not an upper-extremity radiograph"
MAX_VIEWS = 12  # views per study (files, or frames of multi-frame DICOM)


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
class Explanation:
    """Explanation maps of one radiograph and what is needed to draw them."""

    image: Image.Image
    box: Box
    maps: dict[str, np.ndarray]

    def overlays(self, opacity: float = 0.5, colormap: str = "jet") -> dict[str, np.ndarray]:
        return {m: overlay(self.image, cam, self.box, opacity, colormap) for m, cam in self.maps.items()}


@dataclasses.dataclass
class Analysis(Explanation):
    """A prediction with the maps behind it."""

    prediction: Prediction


@dataclasses.dataclass
class StudyAnalysis:
    """Several views of one study: each view's analysis and the study's reading of them."""

    views: list[Analysis]
    study: dict  # body part, mean probability, threshold, verdict, disagreeing views, model

    def to_dict(self) -> dict:
        """The API's JSON answer: a per-view list and the study result."""
        return {"views": [v.prediction.to_dict() for v in self.views], "study": self.study}


class Predictor:
    """Body part, abnormality and explanation maps for uploaded radiographs."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.config
        self.target_layer = self.model.get_submodule(self.config.cam_layer)
        self.lock = threading.Lock()
        # Slow methods (ScoreCAM) run on their own copy of the model under their own lock, so one
        # slow request never holds up the fast ones; they queue only behind each other.
        self.slow_model = copy.deepcopy(self.model)
        self.slow_lock = threading.Lock()

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

    def check_request(self, body_part: str, threshold: float | None) -> tuple[str, float | None]:
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ImageInputError("The decision threshold must lie strictly between 0 and 1.")
        return self.check_body_part(body_part), threshold

    def route(self, logits: torch.Tensor, body_part: str) -> str | None:
        """The part to read abnormality from: the user's choice, else the model's (None: other)."""
        if body_part != AUTO:
            return body_part
        top = self.config.body_part_classes[int(split_logits(self.config, logits)[0].argmax(1))]
        return None if top == OTHER else top

    def analyze(
        self, source: str | Path | bytes, body_part: str = AUTO, methods=DEFAULT_METHODS, threshold: float | None = None
    ) -> Analysis:
        """Read, classify and explain one radiograph (a single forward/backward pass for the fast maps)."""
        body_part, threshold = self.check_request(body_part, threshold)
        image = load_image(source)
        return self.analyze_view(image, to_model_input(image, self.config), body_part, methods, threshold)

    def explain(self, source: str | Path | bytes, body_part: str = AUTO, methods=DEFAULT_METHODS) -> Explanation:
        """The maps alone (what ``/explain`` serves), from only the passes they need: the shared pass, and
        with "auto" the passes the body part is read from; none for the abnormality probability. No maps
        when the body-part head says the image is not an upper-extremity radiograph."""
        body_part = self.check_body_part(body_part)
        image = load_image(source)
        x, box = to_model_input(image, self.config)
        return Explanation(image, box, self.explained(x, body_part, methods, maps_only=True)[1])

    def analyze_view(
        self,
        image: Image.Image,
        model_input: tuple[torch.Tensor, Box],
        body_part: str,
        methods,
        threshold,
        answer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Analysis:
        """One decoded and preprocessed view (request already checked), read and explained.
        ``answer`` (from :meth:`view_answer`) spares running the view's extra passes again."""
        x, box = model_input
        logits, maps = self.explained(x, body_part, methods, answer)
        return Analysis(image, box, maps, self.interpret(logits, body_part, threshold))

    def explained(
        self,
        x: torch.Tensor,
        body_part: str,
        methods,
        answer: Callable[[torch.Tensor], torch.Tensor] | None = None,
        maps_only: bool = False,
    ) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """The answer's logits and the maps of the column it routes to: the fast maps from one shared
        pass under the model's lock, then the slow ones on the spare copy. With ``maps_only`` the logits
        are complete only as far as routing needs them."""

        def column_of(logits: torch.Tensor) -> int | None:
            part = self.route(logits, body_part)
            return None if part is None else self.config.abnormality_index(part)

        fast = [m for m in methods if m not in SLOW_METHODS]
        with self.lock:
            if answer is None:
                complete = {"abnormality": False, "body_part": body_part == AUTO} if maps_only else {}
                answer = answer_from(self.model, self.config, x, **complete)
            logits, maps = explain(self.model, self.target_layer, x, lambda lg: column_of(answer(lg)), fast)
        logits = answer(logits)
        slow, column = [m for m in methods if m in SLOW_METHODS], column_of(logits)
        if slow and column is not None:
            layer = self.slow_model.get_submodule(self.config.cam_layer)
            with self.slow_lock:
                maps |= explain(self.slow_model, layer, x, lambda _: column, slow)[1]
        return logits, maps

    def analyze_study(
        self, sources, body_part: str = AUTO, methods=DEFAULT_METHODS, threshold: float | None = None
    ) -> StudyAnalysis:
        """Read several views of one study (multi-frame DICOM frames count as views).

        The study's body part is the top class of the views' mean body-part probabilities (or the
        user's choice); every view is read and explained for that part, and the study's probability
        is the mean of the views', as in the MURA paper. Views that disagree on the part are listed.
        """
        body_part, threshold = self.check_request(body_part, threshold)
        sources, views = list(sources), []
        for number, source in enumerate(sources, 1):
            try:
                views += load_views(source)
            except ImageInputError as err:
                where = f"File {number} of {len(sources)}: " if len(sources) > 1 else ""
                raise ImageInputError(f"{where}{err}") from None
        if not views:
            raise ImageInputError("A study needs at least one image.")
        if len(views) > MAX_VIEWS:
            raise ImageInputError(f"A study can have at most {MAX_VIEWS} views; this one has {len(views)}.")
        inputs = [to_model_input(view, self.config) for view in views]
        logits, answers = zip(*(self.view_answer(x) for x, _ in inputs))
        first = [self.interpret(lg, AUTO, threshold) for lg in logits]
        mean_probs = {
            c: float(np.mean([p.body_part_probabilities[c] for p in first])) for c in self.config.body_part_classes
        }
        part = body_part if body_part != AUTO else max(mean_probs, key=mean_probs.get)
        source = "model" if body_part == AUTO else "user"
        if part != OTHER and methods:  # a second pass per view, now that the explained part is known
            analyses = [
                self.analyze_view(view, model_input, part, methods, threshold, answer)
                for view, model_input, answer in zip(views, inputs, answers)
            ]
        else:  # no maps; for 'other' each view keeps its own answer
            analyses = [
                Analysis(view, box, {}, p if part == OTHER else self.interpret(lg, part, threshold))
                for p, lg, view, (_, box) in zip(first, logits, views, inputs)
            ]
        if part != OTHER:
            for a in analyses:
                a.prediction.body_part_source = source
        study = {
            "body_part": None if part == OTHER else part,
            "body_part_source": source,
            "body_part_probabilities": {k: round(v, 4) for k, v in mean_probs.items()},
            "views_disagreeing_on_body_part": [i for i, p in enumerate(first) if p.predicted_body_part != part],
            "n_views": len(views),
            "abnormality_probability": None,
            "threshold": None,
            "verdict": NOT_UPPER_EXTREMITY,
            "validated": None,
        }
        if part != OTHER:
            p = np.mean([a.prediction.abnormality_probability for a in analyses])
            study.update(**self.decide(part, p, threshold), validated=bool(self.config.validated[part]))
        study.update(model=self.config.architecture, weights_revision=self.loaded.revision)
        return StudyAnalysis(analyses, study)

    def predict_study(self, sources, body_part: str = AUTO, threshold: float | None = None) -> dict:
        """The study reading without maps, as JSON-serialisable data."""
        return self.analyze_study(sources, body_part, (), threshold).to_dict()

    def view_answer(self, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """The model's answer for a preprocessed view (forward passes only), and the map from the
        view's own logits to it, which a later maps pass can reuse instead of re-running the extra passes."""
        with self.lock, torch.no_grad():
            answer = answer_from(self.model, self.config, x)
            return answer(self.model(x)), answer

    def input_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's answer for a preprocessed view (forward passes only, all of ``answer_from``'s included)."""
        return self.view_answer(x)[0]

    def decide(self, part: str, probability: float, threshold: float | None) -> dict:
        """The probability, the threshold in force for ``part`` (the user's, else the calibrated one)
        and the verdict at it. Both numbers are rounded to 4 decimals as reported, and the verdict is taken
        from the rounded ones, so it never disagrees with the figures beside it."""
        p = round(float(probability), 4)
        t = round(float(threshold if threshold is not None else self.config.thresholds[part]), 4)
        return {"abnormality_probability": p, "threshold": t, "verdict": "abnormal" if p >= t else "normal"}

    def at_threshold(self, analysis: StudyAnalysis, threshold: float | None) -> StudyAnalysis:
        """The same reading at another decision threshold: only the verdicts change, so the model
        does not run again (the same study analysed at ``threshold`` reads the same)."""
        _, threshold = self.check_request(AUTO, threshold)

        def at(reading: dict) -> dict:  # a view's or the study's verdict fields, at the new threshold
            part = reading["body_part"]
            return {} if part is None else self.decide(part, reading["abnormality_probability"], threshold)

        views = [
            dataclasses.replace(v, prediction=dataclasses.replace(v.prediction, **at(v.prediction.to_dict())))
            for v in analysis.views
        ]
        return StudyAnalysis(views, analysis.study | at(analysis.study))

    def predict(self, source: str | Path | bytes, body_part: str = AUTO, threshold: float | None = None) -> Prediction:
        """Body part and abnormality only: one forward pass, no maps."""
        body_part, threshold = self.check_request(body_part, threshold)
        x, _ = to_model_input(load_image(source), self.config)
        return self.interpret(self.input_logits(x), body_part, threshold)

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
        p = ab_logits[0, cfg.body_parts.index(part)].sigmoid()
        return Prediction(part, **self.decide(part, p, threshold), validated=bool(cfg.validated[part]), **common)
