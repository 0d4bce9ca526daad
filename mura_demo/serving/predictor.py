"""The pipeline: image in -> preprocessing -> model -> explanations -> presentation.

:class:`Predictor` is what the Gradio app, the CLI, batch runs and the benchmarks call; it needs
no Gradio. It runs the network and hands the probabilities to :mod:`.reading`, which alone decides
what the user is told. One lock guards the model, so concurrent requests never share hook state.
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

from ..core.checks import ImageInputError, RequestError
from ..core.explain import DEFAULT_METHODS, METHODS, explain
from ..core.imaging import load_image, load_views
from ..core.inference import answer_from
from ..core.preprocess import Box, body_part_input, to_model_input
from ..core.render import overlay
from ..core.weights import LoadedModel, load_model
from .reading import AUTO, Prediction, ViewScores, read_study, routed_part

MAX_VIEWS = 12  # views per study (files, or frames of multi-frame DICOM)


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
    """A view's reading, the maps behind it, and the network's input and answer it was read from: kept,
    so that another body part, threshold or set of methods is read without running the network again."""

    prediction: Prediction | None  # None: not read yet
    x: torch.Tensor
    scores: ViewScores


@dataclasses.dataclass
class StudyAnalysis:
    """Several views of one study: each view's analysis, the study's reading of them and what was asked."""

    views: list[Analysis]
    study: dict  # see reading.read_study
    body_part: str  # as asked: "auto" or a part
    methods: tuple[str, ...]

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

    # What users ask for -------------------------------------------------------------------------

    def predict(self, source: str | Path | bytes, body_part: str = AUTO, threshold: float | None = None) -> Prediction:
        """Body part, abnormality and verdict of one radiograph, without maps."""
        return self.analyze(source, body_part, (), threshold).prediction

    def analyze(
        self, source: str | Path | bytes, body_part: str = AUTO, methods=DEFAULT_METHODS, threshold: float | None = None
    ) -> Analysis:
        """One radiograph read and explained (the fast maps from one shared forward/backward pass)."""
        image = load_image(source)  # a multi-frame DICOM is refused here: it is a study
        return self.analyze_study([image], body_part, methods, threshold).views[0]

    def predict_study(self, sources, body_part: str = AUTO, threshold: float | None = None) -> dict:
        """The study reading without maps, as JSON-serialisable data."""
        return self.analyze_study(sources, body_part, (), threshold).to_dict()

    def analyze_study(
        self, sources, body_part: str = AUTO, methods=DEFAULT_METHODS, threshold: float | None = None
    ) -> StudyAnalysis:
        """Several views of one study (multi-frame DICOM frames count as views), read together by
        :func:`.reading.read_study`; each view read at the study's part is explained for that part."""
        body_part, methods = self.check_request(body_part, threshold, methods)
        images = self._decode_study(sources)
        if len(images) == 1 and methods:
            views = [self.explained_view(images[0], body_part, methods, threshold)]
        else:  # a view's maps wait for the study's part, decided from every view's answer
            views = [self.view(image) for image in images]
        return self._read(views, body_part, methods, threshold)

    def revise(
        self, analysis: StudyAnalysis, body_part: str = AUTO, methods=DEFAULT_METHODS, threshold: float | None = None
    ) -> StudyAnalysis:
        """The study read again with another body part, threshold or set of methods, from the network's
        answers it already has: no forward pass for the reading, and maps only where a view lacks them
        (confirming the detected part or moving the threshold computes none; ScoreCAM takes ~40 s a
        view). Reads the same as the study analysed afresh with those options."""
        body_part, methods = self.check_request(body_part, threshold, methods)
        return self._read(analysis.views, body_part, methods, threshold)

    def explain(self, source: str | Path | bytes, body_part: str = AUTO, methods=DEFAULT_METHODS) -> Explanation:
        """The maps alone (what ``/explain`` serves), from only the passes they need: the shared pass, and
        with "auto" the passes the body part is read from; none for the abnormality probability. No maps
        when the body-part head says the image is not an upper-extremity radiograph."""
        body_part, methods = self.check_request(body_part, None, methods)
        image = load_image(source)
        x, box = to_model_input(image, self.config)
        if body_part == AUTO:
            own = body_part_input(image, self.config)
            with self.lock:
                answer = answer_from(self.model, self.config, x, body_part=True, abnormality=False, letterboxed=own)

            def part_of(logits: torch.Tensor) -> str | None:
                return routed_part(self.config, self._scores(answer(logits)).body_part, AUTO)[0]

        else:

            def part_of(_) -> str:
                return body_part

        return Explanation(image, box, self._maps(x, part_of, methods))

    # The steps -----------------------------------------------------------------------------------

    def check_request(self, body_part: str, threshold: float | None, methods) -> tuple[str, tuple[str, ...]]:
        """The request's options, checked before any work: a clean error names what is wrong."""
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise RequestError("The decision threshold must lie strictly between 0 and 1.")
        body_part = (body_part or AUTO).strip().lower()
        if body_part not in self.body_part_choices:
            raise RequestError(f"Unknown body part '{body_part}'. Choose one of: {', '.join(self.body_part_choices)}.")
        methods = tuple(methods or ())
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise RequestError(f"Unknown method '{unknown[0]}'. Choose one of: {', '.join(METHODS)}.")
        return body_part, methods

    @staticmethod
    def _decode_study(sources) -> list[Image.Image]:
        """Every view of the study's files, the file named in any error."""
        sources, images = list(sources), []
        for number, source in enumerate(sources, 1):
            if isinstance(source, Image.Image):
                images.append(source)
                continue
            try:
                images += load_views(source)
            except ImageInputError as err:
                where = f"File {number} of {len(sources)}: " if len(sources) > 1 else ""
                raise ImageInputError(f"{where}{err}") from None
        if not images:
            raise ImageInputError("A study needs at least one image.")
        if len(images) > MAX_VIEWS:
            raise ImageInputError(f"A study can have at most {MAX_VIEWS} views; this one has {len(images)}.")
        return images

    def view(self, image: Image.Image) -> Analysis:
        """A decoded view through the model's forward passes (no gradients), not read yet."""
        x, box = to_model_input(image, self.config)
        own = body_part_input(image, self.config)
        with self.lock, torch.no_grad():
            scores = self._scores(answer_from(self.model, self.config, x, letterboxed=own)(self.model(x)))
        return Analysis(image, box, {}, None, x, scores)

    def explained_view(self, image: Image.Image, body_part: str, methods, threshold: float | None) -> Analysis:
        """A study of one view: its answer and its maps from one shared pass (the answer's other passes
        run first, without gradients; the part to explain is read from the completed answer)."""
        x, box = to_model_input(image, self.config)
        own = body_part_input(image, self.config)
        with self.lock:
            answer = answer_from(self.model, self.config, x, letterboxed=own)
        found = {}

        def part_of(logits: torch.Tensor) -> str | None:
            found["scores"] = scores = self._scores(answer(logits))
            found["prediction"] = read_study(self.config, [scores], body_part, threshold, self.loaded.revision).views[0]
            return found["prediction"].body_part

        maps = self._maps(x, part_of, methods)
        return Analysis(image, box, maps, found["prediction"], x, found["scores"])

    def _read(self, views: list[Analysis], body_part: str, methods: tuple[str, ...], threshold) -> StudyAnalysis:
        """The views read together by :func:`.reading.read_study`; each view read at the study's part is
        explained for that part, keeping the maps it already has of that part."""
        reading = read_study(self.config, [v.scores for v in views], body_part, threshold, self.loaded.revision)
        analyses = []
        for view, prediction in zip(views, reading.views):
            part = prediction.body_part
            kept = view.maps if view.prediction and view.prediction.body_part == part else {}
            missing = [m for m in methods if m not in kept]
            drawn = self._maps(view.x, lambda _, part=part: part, missing) if part and missing else {}
            merged = kept | drawn
            maps = {m: merged[m] for m in methods if m in merged}
            analyses.append(dataclasses.replace(view, maps=maps, prediction=prediction))
        return StudyAnalysis(analyses, reading.study, body_part, methods)

    def _scores(self, logits: torch.Tensor) -> ViewScores:
        """The model's answer (1, num_outputs) as probabilities by name."""
        body, abnormal = self.config.split_logits(logits.float())
        return ViewScores(
            dict(zip(self.config.body_part_classes, body.softmax(1)[0].tolist())),
            dict(zip(self.config.body_parts, abnormal.sigmoid()[0].tolist())),
        )

    def _maps(self, x: torch.Tensor, part_of: Callable[[torch.Tensor], str | None], methods) -> dict[str, np.ndarray]:
        """Maps of the abnormality logit of the part ``part_of`` names from the view's own logits: the
        fast maps from one shared pass under the model's lock, then the slow ones on the spare copy."""

        def column_of(logits: torch.Tensor) -> int | None:
            part = part_of(logits)
            return None if part is None else self.config.abnormality_index(part)

        fast = [m for m in methods if not METHODS[m].slow]
        with self.lock:
            logits, maps = explain(self.model, self.target_layer, x, column_of, fast)
        slow, column = [m for m in methods if METHODS[m].slow], column_of(logits)
        if slow and column is not None:
            layer = self.slow_model.get_submodule(self.config.cam_layer)
            with self.slow_lock:
                maps |= explain(self.slow_model, layer, x, lambda _: column, slow)[1]
        return maps
