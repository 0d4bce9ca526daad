"""The Gradio interface: a thin layer over :class:`~mura_demo.serving.predictor.Predictor`.

Named API endpoints (inputs in this order):
  /predict  (image file, body part or "auto", threshold)             -> JSON prediction
  /explain  (image file, body part, method)                          -> overlay PNG
  /predict_study (list of files, body part or "auto", threshold)     -> JSON: per-view list and the study result
  /report   (list of files, body part, "pdf" or "png", threshold)    -> one-page report file
The threshold is optional; 0 (the default) means the model's own threshold for the body part.

What the page and the endpoints do lives in :class:`Handlers` (plain methods, testable without a
browser or a layout); :func:`build_demo` only lays out the page and wires events to them. Bad input
is answered, never crashed on: on the page as the reading's own message, through the API as a clean
``AppError``; the server logs one line for it (no file names, no tracebacks) and keeps serving.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import gradio as gr

from ..core.checks import FORMAT_NAMES, MAX_BYTES, SUFFIXES, RequestError, UserError
from ..core.explain import DEFAULT_METHODS, METHODS
from ..core.malloc import trim, tune_for_serving
from ..core.render import COLORMAPS, DISCLAIMER
from ..core.weights import HUB_PREFIX, WeightsError
from .predictor import Predictor, StudyAnalysis
from .reading import AUTO, NEEDS_CONFIRMATION, NOT_UPPER_EXTREMITY
from .report import REPORT_FORMATS, reading_lines, render_report
from .uploads import (
    UPLOAD_TTL,
    UPLOAD_TTL_ENV,
    png_file,
    private_uploads,
    read_upload,
    read_uploads,
    report_file,
    run_every,
)

log = logging.getLogger("mura_demo")
EXAMPLES_ENV = "MURA_DEMO_EXAMPLES"
START_TEXT = "Upload a radiograph, or several views of one study: it is analysed at once."
# One system font stack for every weight: the theme's own web font holds too few glyphs for bold text
# (headings came out in two faces), and a Space must not depend on fetching fonts.
THEME = gr.themes.Default(font=("ui-sans-serif", "system-ui", "sans-serif"), font_mono=("ui-monospace", "monospace"))
CSS = """
#summary h3 { margin-top: 0; }
#maps .grid-wrap.fixed-height { height: auto; max-height: none; min-height: 0; }
#maps .caption-label { white-space: normal; overflow: visible; text-overflow: clip; font-size: 0.8em; }
#views th, #views td {
  white-space: normal; word-break: keep-all; overflow-wrap: normal; padding: 4px 6px; font-size: 0.85em;
}
"""


def log_user_error(where: str, err: UserError) -> None:
    """One line for an expected user error: what kind, never the file's name or contents."""
    log.info("%s: refused a request (%s)", where, type(err).__name__)


@contextlib.contextmanager
def answered_as_app_error(where: str, title: str = "Error"):
    """A user error becomes ``gr.Error``: a clean ``AppError`` for API clients, one log line, no traceback."""
    try:
        yield
    except UserError as err:
        log_user_error(where, err)
        raise gr.Error(str(err), title=title, print_exception=False) from None


def summary_markdown(study: dict) -> str:
    """The study's reading (one view or several) as Markdown."""
    lines = "\n".join(f"- {line}" for line in reading_lines(study))
    if study["body_part"] is None:
        return f"### This does not look like an upper-extremity radiograph\n{lines}"
    caveat = "" if study["validated"] else " · not validated"
    return f"### {study['verdict'].upper()}{caveat}\n{lines}"


def views_markdown(analysis: StudyAnalysis) -> str:
    """One row per view, numbered from 1 as everywhere: its own body-part answer and its reading."""
    rows = ["| view | own part | read as | abnormal | verdict |", "|---|---|---|---|---|"]
    for number, view in enumerate(analysis.views, 1):
        p = view.prediction
        own = f"{p.predicted_body_part} {p.body_part_probabilities[p.predicted_body_part]:.0%}"
        prob = "-" if p.abnormality_probability is None else f"{p.abnormality_probability:.1%}"
        verdict = "not read" if p.verdict == NOT_UPPER_EXTREMITY else p.verdict
        rows.append(f"| {number} | {own} | {p.body_part or '-'} | {prob} | {verdict} |")
    return "\n".join(rows)


def model_markdown(predictor: Predictor) -> str:
    loaded, cfg = predictor.loaded, predictor.config
    if cfg.model_card_url:
        card = f"[model card]({cfg.model_card_url})"
    elif loaded.source.startswith(HUB_PREFIX):
        card = f"[model card](https://huggingface.co/{loaded.source.removeprefix(HUB_PREFIX).split('@')[0]})"
    else:
        card = "model card: `weights/README.md` in the repository"
    validated = ", ".join(p for p in cfg.body_parts if cfg.validated[p]) or "none"
    text = f"Model: `{cfg.model_name}` · weights: {loaded.source} · {card} · abnormality validated for: **{validated}**"
    if cfg.body_part_confirmation:  # the reason itself is in every reading's note: short here, so that on a
        # phone the reading stays in the first screen
        text += " · a detected body part needs your confirmation (one click) for a validated reading"
    if loaded.notice:
        text += f"\n\n> ⚠️ {loaded.notice}"
    return text


class Handlers:
    """Everything the page and the API do, as plain methods over a :class:`Predictor`.

    Page methods return the values of the components they update (see :data:`PAGE_OUTPUTS`);
    API methods return what the endpoint answers."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    # The page --------------------------------------------------------------------------------------

    def blank(self, message: str = START_TEXT) -> tuple:
        """A page with no reading: only ``message`` in the summary."""
        return message, None, "", [], None, None, gr.update(visible=False)

    def page_of(self, analysis: StudyAnalysis, opacity: float, colormap: str) -> tuple:
        """The reading on screen: summary, body-part probabilities, views, maps, raw JSON, the analysis
        itself (kept for redraws and the report) and the confirm button."""
        study = analysis.study
        confirm = gr.update(visible=False)
        if study["body_part_status"] == NEEDS_CONFIRMATION:
            confirm = gr.update(visible=True, value=f"Confirm body part: {study['body_part']}")
        return (
            summary_markdown(study),
            study["body_part_probabilities"],
            views_markdown(analysis),
            self.gallery(analysis, opacity, colormap),
            study,
            analysis,
            confirm,
        )

    def gallery(self, analysis: StudyAnalysis, opacity: float, colormap: str) -> list:
        return [
            (png_file(rgb), f"{number} · {METHODS[m].label}")
            for number, view in enumerate(analysis.views, 1)
            for m, rgb in (view.overlays(opacity, colormap) if view.maps else {}).items()
        ]

    def analyse(self, stored, body_part, methods, opacity, colormap, threshold, shown=None) -> tuple:
        """The reading of the stored uploads. With a reading on screen (``shown``: another body part or set of
        methods chosen), it is read again from the network's answers it already has, drawing only the maps
        it lacks (the confirm click draws none). A file that cannot be read is said so, one clear state."""
        if not stored:
            return self.blank()
        methods, threshold = tuple(methods or ()), threshold or None
        try:
            if shown is None:
                analysis = self.predictor.analyze_study(stored, body_part, methods, threshold)
            else:
                analysis = self.predictor.revise(shown, body_part, methods, threshold)
        except UserError as err:
            log_user_error("page", err)
            return self.blank(f"### Cannot analyse this\n{err}")
        return self.page_of(analysis, opacity, colormap)

    def upload(self, uploads, body_part, methods, opacity, colormap, threshold) -> tuple:
        """New uploads are read into this session's memory (the page keeps no file of them) and analysed;
        a cleared upload leaves a blank page."""
        if not uploads:
            return None, *self.blank()
        try:
            stored = read_uploads(uploads)
        except UserError as err:
            log_user_error("page", err)
            return None, *self.blank(f"### Cannot read this file\n{err}")
        return stored, *self.analyse(stored, body_part, methods, opacity, colormap, threshold)

    def redraw(self, analysis, opacity, colormap):
        """New opacity or colour map: the maps on screen are redrawn; the model does not run again."""
        return gr.skip() if analysis is None else self.gallery(analysis, opacity, colormap)

    def rethreshold(self, analysis, threshold):
        """A new threshold changes only the verdicts: the reading on screen is decided again at it,
        without running the model (ScoreCAM takes ~40 s a view)."""
        if analysis is None:
            return (gr.skip(),) * 4
        analysis = self.predictor.revise(analysis, analysis.body_part, analysis.methods, threshold or None)
        return summary_markdown(analysis.study), views_markdown(analysis), analysis.study, analysis

    def confirm(self, analysis):
        """One click: the detected part becomes the user's choice (the page then reads it as such)."""
        return gr.skip() if analysis is None else analysis.study["body_part"]

    def report_on_screen(self, analysis, opacity, colormap, kind):
        """The report of what is on screen, without running the model again."""
        if analysis is None:
            raise gr.Error(
                "There is no reading on screen to report yet: upload a radiograph and wait for it.",
                title="No reading",
                print_exception=False,
            )
        return gr.update(value=report_file(render_report(analysis, opacity, colormap), kind), visible=True)

    # The API ---------------------------------------------------------------------------------------

    def predict_api(self, upload, body_part: str = AUTO, threshold: float = 0.0) -> dict:
        with answered_as_app_error("/predict"):
            return self.predictor.predict(read_upload(upload), body_part, threshold or None).to_dict()

    def predict_study_api(self, uploads, body_part: str = AUTO, threshold: float = 0.0) -> dict:
        with answered_as_app_error("/predict_study"):
            return self.predictor.predict_study(read_uploads(uploads), body_part, threshold or None)

    def explain_api(self, upload, body_part: str = AUTO, method: str = "gradcam"):
        with answered_as_app_error("/explain"):
            self.predictor.check_request(body_part, None, (method,))
            explanation = self.predictor.explain(read_upload(upload), body_part, (method,))
            if not explanation.maps:
                raise RequestError(
                    "This does not look like an upper-extremity radiograph, so there is no abnormality to explain. "
                    "Pass a body part instead of 'auto' to explain it anyway."
                )
        return png_file(explanation.overlays()[method])

    def report_api(self, uploads, body_part: str = AUTO, kind: str = "pdf", threshold: float = 0.0):
        with answered_as_app_error("/report"):
            if kind not in REPORT_FORMATS:
                raise RequestError(f"Unknown report format '{kind}'. Choose one of: {', '.join(REPORT_FORMATS)}.")
            analysis = self.predictor.analyze_study(read_uploads(uploads), body_part, threshold=threshold or None)
        return report_file(render_report(analysis), kind)


def build_demo(predictor: Predictor, examples_dir: str | None = None) -> gr.Blocks:
    """The page (upload, then the reading, then the controls, so a phone shows the result in its first
    screen) and the /predict, /explain, /predict_study and /report API endpoints."""
    handlers = Handlers(predictor)
    with gr.Blocks(title="MURA demo: explainable abnormality detection") as demo:
        gr.Markdown(f"# MURA demo: body part, abnormality and why\n**{DISCLAIMER}**")
        gr.Markdown(model_markdown(predictor))
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=320):
                upload = gr.File(
                    label="Radiographs",
                    file_types=list(SUFFIXES),
                    file_count="multiple",
                    type="filepath",
                    height=150,
                    elem_id="upload",
                )
                gr.Markdown(f"{FORMAT_NAMES}. Several files are read as the views of one study.", elem_id="formats")
                summary = gr.Markdown(START_TEXT, elem_id="summary")
                confirm = gr.Button(visible=False, variant="primary", elem_id="confirm")
                body_part = gr.Dropdown(
                    predictor.body_part_choices, value=AUTO, label="Body part ('auto': let the model decide)"
                )
                methods = gr.CheckboxGroup(
                    [(m.label + (" (slow: seconds a view)" if m.slow else ""), name) for name, m in METHODS.items()],
                    value=list(DEFAULT_METHODS),
                    label="Explanation methods",
                )
                opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Heatmap opacity")
                colormap = gr.Dropdown(list(COLORMAPS), value="jet", label="Colour map")
                threshold = gr.Slider(
                    0.0, 0.99, value=0.0, step=0.01, label="Decision threshold (0: the model's own for the body part)"
                )
                with gr.Row():
                    kind = gr.Radio(list(REPORT_FORMATS), value="pdf", label="Report format", scale=1)
                    make_report = gr.Button("Create one-page report", scale=1)
                report = gr.File(
                    label="Report (the link lasts about a minute; nothing is kept)", visible=False, elem_id="report"
                )
                if examples_dir and Path(examples_dir).is_dir():
                    files = sorted(str(p) for p in Path(examples_dir).iterdir() if p.is_file())
                    gr.Examples([[[f]] for f in files], inputs=[upload])
            with gr.Column(scale=2, min_width=320):
                gallery = gr.Gallery(
                    label="Explanation maps", columns=3, height="auto", object_fit="contain", elem_id="maps"
                )
                parts = gr.Label(label="Body part probabilities", num_top_classes=4)
                views = gr.Markdown(elem_id="views")
                with gr.Accordion("Raw study result (JSON)", open=False):
                    raw = gr.JSON()
        stored = gr.State(None)  # the uploads' bytes
        shown = gr.State(None)  # the StudyAnalysis on screen
        settings = [body_part, methods, opacity, colormap, threshold]
        page = [summary, parts, views, gallery, raw, shown, confirm]
        verdicts, reading_at = [summary, views, raw, shown], [shown, threshold]

        def then_at_slider(event) -> None:
            """After an analysis, decide at the threshold the slider shows by then (a slow analysis must not
            land with the value the slider had when it started)."""
            event.success(handlers.rethreshold, reading_at, verdicts, api_visibility="private", show_progress="hidden")

        then_at_slider(upload.change(handlers.upload, [upload, *settings], [stored, *page], api_visibility="private"))
        for control in (body_part, methods):  # change, not input: a dropdown also sends input when it loses focus
            then_at_slider(control.change(handlers.analyse, [stored, *settings, shown], page, api_visibility="private"))
        threshold.release(handlers.rethreshold, reading_at, verdicts, api_visibility="private")
        on_screen = [shown, opacity, colormap]
        colormap.input(handlers.redraw, on_screen, gallery, api_visibility="private")
        opacity.release(handlers.redraw, on_screen, gallery, api_visibility="private")
        confirm.click(handlers.confirm, shown, body_part, api_visibility="private")
        make_report.click(handlers.report_on_screen, [*on_screen, kind], report, api_visibility="private")

        def forget_uploads(request: gr.Request):
            """A closed or reloaded tab's uploads leave server memory at once (Gradio would keep a closed
            tab's state an hour, in case it is reopened)."""
            demo.state_holder.delete_state(request.session_hash)

        demo.unload(forget_uploads)

        # API-only endpoints: hidden components give them typed inputs and outputs.
        with gr.Group(visible=False):
            api_file = gr.File(type="filepath")
            api_part = gr.Textbox(value=AUTO)
            api_method = gr.Textbox(value="gradcam")
            api_kind = gr.Textbox(value="pdf")
            api_threshold = gr.Number(value=0.0)
            api_json = gr.JSON()
            api_image = gr.Image(type="filepath")
            api_files = gr.File(type="filepath", file_count="multiple")
            api_report = gr.File(type="filepath")
            study_inputs = [api_files, api_part, api_threshold]
            gr.Button().click(handlers.predict_api, [api_file, api_part, api_threshold], api_json, api_name="predict")
            gr.Button().click(handlers.predict_study_api, study_inputs, api_json, api_name="predict_study")
            gr.Button().click(handlers.explain_api, [api_file, api_part, api_method], api_image, api_name="explain")
            report_inputs = [api_files, api_part, api_kind, api_threshold]
            gr.Button().click(handlers.report_api, report_inputs, api_report, api_name="report")
    return demo


def launch(demo: gr.Blocks, **options):
    """Serve ``demo`` with the project's theme, page style and upload limit (the one limit, see checks)."""
    demo.queue(default_concurrency_limit=2, max_size=64)
    return demo.launch(theme=THEME, css=CSS, max_file_size=MAX_BYTES, show_error=True, **options)


def main(argv: list[str] | None = None) -> int:
    """`python app.py`: load the weights, build the UI and serve it."""
    parser = argparse.ArgumentParser(description="Serve the MURA demo")
    parser.add_argument(
        "--weights",
        default=None,
        help="weights folder or hf://owner/name@revision (default: $MURA_DEMO_WEIGHTS, else the bundled weights/)",
    )
    parser.add_argument(
        "--examples", default=os.environ.get(EXAMPLES_ENV), help=f"folder of examples (${EXAMPLES_ENV})"
    )
    args = parser.parse_args(argv)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    log.addHandler(console)
    log.setLevel(logging.INFO)
    tune_for_serving()
    run_every(5.0, trim, "malloc-trim")
    # SIGTERM (how Spaces, containers and process managers stop a server) stops it as Ctrl-C does,
    # so the upload folder is emptied on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # A private upload folder, swept every few seconds: nothing uploaded outlives UPLOAD_TTL or the server.
    with private_uploads(float(os.environ.get(UPLOAD_TTL_ENV, UPLOAD_TTL))):
        try:
            predictor = Predictor.from_spec(args.weights)
        except WeightsError as err:
            print(f"mura-demo cannot start: {err}", file=sys.stderr)
            return 2
        if predictor.loaded.notice:
            print(f"mura-demo: {predictor.loaded.notice}", file=sys.stderr)
        launch(build_demo(predictor, args.examples))
    return 0
