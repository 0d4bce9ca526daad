"""The Gradio interface: a thin layer over :class:`~mura_demo.predictor.Predictor`.

Named API endpoints (inputs in this order):
  /predict  (image file, body part or "auto", threshold)             -> JSON prediction
  /explain  (image file, body part, method)                          -> overlay PNG
  /predict_study (list of files, body part or "auto", threshold)     -> JSON: per-view list and the study result
  /report   (list of files, body part, "pdf" or "png", threshold)    -> one-page report file
The threshold is optional; 0 (the default) means the body part's calibrated threshold.
Bad input raises ``gr.Error`` with a specific message: a modal in the browser, a clean
``AppError`` for API clients, and the server keeps serving.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

import gradio as gr

from .explain import DEFAULT_METHODS, METHODS, SLOW_METHODS
from .imaging import ImageInputError
from .malloc import tune_for_serving
from .predictor import AUTO, Predictor, StudyAnalysis
from .render import COLORMAPS, DISCLAIMER, METHOD_LABELS
from .report import REPORT_FORMATS, reading_lines, render_report
from .uploads import (
    UPLOAD_TTL,
    UPLOAD_TTL_ENV,
    png_file,
    private_uploads,
    read_upload,
    read_uploads,
    report_file,
)
from .weights import HUB_PREFIX, WeightsError

EXAMPLES_ENV = "MURA_DEMO_EXAMPLES"
MAX_UPLOAD = "25mb"
START_TEXT = "Upload a radiograph and press **Analyse**."


@contextlib.contextmanager
def shown_to_user(title: str = "Error"):
    """Bad input becomes ``gr.Error``: a modal in the browser, a clean ``AppError`` for API clients."""
    try:
        yield
    except ImageInputError as err:
        raise gr.Error(str(err), title=title) from None


def summary_markdown(study: dict) -> str:
    """The study's reading (one view or several) as Markdown."""
    lines = "\n".join(f"- {line}" for line in reading_lines(study))
    if study["body_part"] is None:
        return f"### This does not look like an upper-extremity radiograph\n{lines}"
    return f"### {study['verdict'].upper()}\n{lines}"


def views_rows(analysis: StudyAnalysis) -> list[list]:
    """One row per view for the views table."""
    rows = []
    for i, view in enumerate(analysis.views):
        p = view.prediction
        prob = "" if p.abnormality_probability is None else f"{p.abnormality_probability:.1%}"
        own = f"{p.predicted_body_part} ({p.body_part_probabilities[p.predicted_body_part]:.0%})"
        rows.append([i + 1, own, p.body_part or "", prob, p.verdict])
    return rows


def model_markdown(predictor: Predictor) -> str:
    loaded, cfg = predictor.loaded, predictor.config
    if cfg.model_card_url:
        card = f"[model card]({cfg.model_card_url})"
    elif loaded.source.startswith(HUB_PREFIX):
        card = f"[model card](https://huggingface.co/{loaded.source.removeprefix(HUB_PREFIX).split('@')[0]})"
    else:
        card = "model card: `weights/README.md` in the repository"
    validated = ", ".join(p for p in cfg.body_parts if cfg.validated[p]) or "none"
    text = (
        f"Model: `{cfg.architecture}` · weights: {loaded.source} · {card} · abnormality validated for: **{validated}**"
    )
    if loaded.notice:
        text += f"\n\n> ⚠️ {loaded.notice}"
    return text


def build_demo(predictor: Predictor, examples_dir: str | None = None) -> gr.Blocks:
    """The full UI plus the /predict, /explain, /predict_study and /report API endpoints."""
    choices = predictor.body_part_choices

    def store_uploads(uploads):
        """Read new uploads into this session's memory (the page keeps no file of them); the reading
        on screen no longer belongs to them."""
        if not uploads:
            return None, None
        with shown_to_user("Cannot read this file"):
            return read_uploads(uploads), None

    def study_of(data, body_part, methods, threshold) -> StudyAnalysis:
        if not data:
            raise gr.Error("Upload a radiograph first.", title="No image")
        with shown_to_user("Cannot analyse this file"):
            return predictor.analyze_study(data, body_part, tuple(methods or ()), threshold or None)

    def gallery_of(analysis: StudyAnalysis, opacity, colormap) -> list:
        return [
            (png_file(rgb), f"View {i + 1} · {METHOD_LABELS[m]}")
            for i, view in enumerate(analysis.views)
            for m, rgb in (view.overlays(opacity, colormap) if view.maps else {}).items()
        ]

    def analyze_ui(data, body_part, methods, opacity, colormap, threshold):
        """The reading and maps on screen, and the analysis behind them (kept for redraws and the report)."""
        analysis = study_of(data, body_part, methods, threshold)
        study = analysis.study
        gallery = gallery_of(analysis, opacity, colormap)
        return summary_markdown(study), study["body_part_probabilities"], views_rows(analysis), gallery, study, analysis

    def show_uploads(data, *settings):
        """New uploads are analysed at once; cleared ones leave a blank page, not an error."""
        if data is None:
            return START_TEXT, None, None, None, None, None
        return analyze_ui(data, *settings)

    def redraw_ui(analysis, opacity, colormap):
        """New opacity or colour map: the maps on screen are redrawn; the model does not run again."""
        return gr.skip() if analysis is None else gallery_of(analysis, opacity, colormap)

    def rethreshold_ui(analysis, threshold):
        """A new threshold changes only the verdicts: the reading on screen is decided again at it,
        without running the model (ScoreCAM takes ~40 s a view)."""
        if analysis is None:
            return (gr.skip(),) * 4
        analysis = predictor.at_threshold(analysis, threshold or None)
        return summary_markdown(analysis.study), views_rows(analysis), analysis.study, analysis

    def report_ui(analysis, opacity, colormap, kind):
        """The report of what is on screen, without running the model again (ScoreCAM takes ~40 s a view)."""
        if analysis is None:
            raise gr.Error(
                "There is no reading on screen to report yet: upload a radiograph and wait for it.", title="No reading"
            )
        return report_file(render_report(analysis, opacity, colormap), kind)

    def predict_api(upload, body_part: str = AUTO, threshold: float = 0.0) -> dict:
        with shown_to_user():
            return predictor.predict(read_upload(upload), body_part, threshold or None).to_dict()

    def predict_study_api(uploads, body_part: str = AUTO, threshold: float = 0.0) -> dict:
        with shown_to_user():
            return predictor.predict_study(read_uploads(uploads), body_part, threshold or None)

    def explain_api(upload, body_part: str = AUTO, method: str = "gradcam"):
        with shown_to_user():
            if method not in METHODS:
                raise ImageInputError(f"Unknown method '{method}'. Choose one of: {', '.join(METHODS)}.")
            explanation = predictor.explain(read_upload(upload), body_part, (method,))
            if not explanation.maps:
                raise ImageInputError(
                    "This does not look like an upper-extremity radiograph, so there is no abnormality to explain. "
                    "Pass a body part instead of 'auto' to explain it anyway."
                )
        return png_file(explanation.overlays()[method])

    def report_api(uploads, body_part: str = AUTO, kind: str = "pdf", threshold: float = 0.0):
        with shown_to_user():
            if kind not in REPORT_FORMATS:
                raise ImageInputError(f"Unknown report format '{kind}'. Choose one of: {', '.join(REPORT_FORMATS)}.")
            analysis = predictor.analyze_study(read_uploads(uploads), body_part, threshold=threshold or None)
        return report_file(render_report(analysis), kind)

    with gr.Blocks(title="MURA demo: explainable abnormality detection") as demo:
        gr.Markdown(f"# MURA demo: body part, abnormality and why\n**{DISCLAIMER}**")
        gr.Markdown(model_markdown(predictor))
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(
                    label="A radiograph, or several views of one study (PNG, JPEG, BMP, TIFF or DICOM)",
                    file_types=[".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"],
                    file_count="multiple",
                    type="filepath",
                )
                body_part = gr.Dropdown(choices, value=AUTO, label="Body part ('auto': let the model decide)")
                methods = gr.CheckboxGroup(
                    [(METHOD_LABELS[m] + (" (slow: seconds a view)" if m in SLOW_METHODS else ""), m) for m in METHODS],
                    value=list(DEFAULT_METHODS),
                    label="Explanation methods",
                )
                opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Heatmap opacity")
                colormap = gr.Dropdown(list(COLORMAPS), value="jet", label="Colour map")
                threshold = gr.Slider(
                    0.0, 0.99, value=0.0, step=0.01, label="Decision threshold (0: the body part's calibrated one)"
                )
                run = gr.Button("Analyse", variant="primary")
                with gr.Row():
                    kind = gr.Radio(list(REPORT_FORMATS), value="pdf", label="Report format", scale=1)
                    make_report = gr.Button("Create one-page report", scale=1)
                report = gr.File(label="Report (the link lasts about a minute; nothing is kept)", elem_id="report")
                if examples_dir and Path(examples_dir).is_dir():
                    files = sorted(str(p) for p in Path(examples_dir).iterdir() if p.is_file())
                    gr.Examples([[[f]] for f in files], inputs=[upload])
            with gr.Column(scale=2):
                summary = gr.Markdown(START_TEXT, elem_id="summary")
                parts = gr.Label(label="Body part probabilities", num_top_classes=4)
                gallery = gr.Gallery(label="Explanation maps", columns=3, object_fit="contain", elem_id="maps")
                views = gr.Dataframe(
                    headers=["view", "its own body part", "read as", "abnormality probability", "verdict"],
                    label="Views",
                    interactive=False,
                    elem_id="views",
                )
                with gr.Accordion("Raw study result (JSON)", open=False):
                    raw = gr.JSON()
        stored = gr.State(None)  # the uploads' bytes
        shown = gr.State(None)  # the StudyAnalysis on screen
        controls = [stored, body_part, methods, opacity, colormap, threshold]
        outputs = [summary, parts, views, gallery, raw, shown]
        verdicts, reading_at = [summary, views, raw, shown], [shown, threshold]

        def analysed_on(listener, analyze=analyze_ui):
            """Analyse on this event, then decide at the threshold the slider shows by then (a slow
            analysis must not land with the value the slider had when it started)."""
            event = listener(analyze, controls, outputs, api_visibility="private")
            event.success(rethreshold_ui, reading_at, verdicts, api_visibility="private", show_progress="hidden")

        uploaded = upload.change(store_uploads, upload, [stored, shown], api_visibility="private")
        analysed_on(uploaded.success, show_uploads)
        analysed_on(run.click)
        for control in (body_part, methods):  # change, not input: a dropdown also sends input when it loses focus
            analysed_on(control.change)
        threshold.release(rethreshold_ui, reading_at, verdicts, api_visibility="private")
        on_screen = [shown, opacity, colormap]
        colormap.input(redraw_ui, on_screen, gallery, api_visibility="private")
        opacity.release(redraw_ui, on_screen, gallery, api_visibility="private")
        make_report.click(report_ui, [*on_screen, kind], report, api_visibility="private")

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
            gr.Button().click(predict_api, [api_file, api_part, api_threshold], api_json, api_name="predict")
            study_inputs = [api_files, api_part, api_threshold]
            gr.Button().click(predict_study_api, study_inputs, api_json, api_name="predict_study")
            gr.Button().click(explain_api, [api_file, api_part, api_method], api_image, api_name="explain")
            gr.Button().click(report_api, [api_files, api_part, api_kind, api_threshold], api_report, api_name="report")
    return demo


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
    tune_for_serving()
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
        demo = build_demo(predictor, args.examples)
        demo.queue(default_concurrency_limit=2, max_size=64)
        demo.launch(max_file_size=MAX_UPLOAD, show_error=True)
    return 0
