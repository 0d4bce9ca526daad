"""The Gradio interface: a thin layer over :class:`~mura_demo.predictor.Predictor`.

Named API endpoints (inputs in this order):
  /predict  (image file, body part or "auto")           -> JSON prediction
  /explain  (image file, body part, method)             -> overlay PNG
  /predict_study (list of files, body part or "auto")   -> JSON: per-view list and the study result
Bad input raises ``gr.Error`` with a specific message: a modal in the browser, a clean
``AppError`` for API clients, and the server keeps serving.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
from PIL import Image

from .explain import DEFAULT_METHODS, METHODS, method_slug
from .imaging import ImageInputError, read_bytes
from .predictor import AUTO, NOT_UPPER_EXTREMITY, Analysis, Predictor
from .render import COLORMAPS
from .weights import HUB_PREFIX, WeightsError

EXAMPLES_ENV = "MURA_DEMO_EXAMPLES"
MAX_UPLOAD = "25mb"
UPLOAD_TTL = 60.0  # seconds an uploaded file (or a served overlay) may stay in the upload folder
UPLOAD_TTL_ENV = "MURA_DEMO_UPLOAD_TTL"
DISCLAIMER = (
    "**Research and teaching software only. Not a medical device.** It must not be used for diagnosis, "
    "triage or any clinical decision."
)
METHOD_LABELS = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "saliency": "Saliency (input gradients)",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
}


def upload_folder() -> Path:
    """Where Gradio keeps uploads (the same rule as ``gradio.utils.get_upload_folder``)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def read_upload(upload) -> bytes:
    """The bytes of an uploaded file (its temporary copy is swept away by :func:`sweep_uploads`)."""
    if upload is None:
        raise ImageInputError("No file was uploaded.")
    return read_bytes(Path(upload if isinstance(upload, str | os.PathLike) else upload.name))


def png_file(rgb) -> str:
    """Write an overlay as PNG into the (swept) upload folder; fast zlib level, as Gradio's own
    PNG encoding (level 6) took a quarter of a request's server time."""
    folder = upload_folder()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".png", delete=False) as fh:
        Image.fromarray(rgb).save(fh, format="PNG", compress_level=1)
    return fh.name


def sweep_uploads(folder: Path, max_age: float) -> int:
    """Delete files in ``folder`` older than ``max_age`` seconds; returns how many.

    Gradio stores identical uploads at one path, so a file cannot be deleted the moment one
    request has read it (a concurrent request may still need it); it is deleted shortly after.
    """
    removed, now = 0, time.time()
    for path in sorted(folder.rglob("*"), reverse=True):
        try:
            if path.is_file() and now - path.stat().st_mtime > max_age:
                path.unlink()
                removed += 1
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        except OSError:
            pass  # removed meanwhile by Gradio or another sweep
    return removed


def start_upload_sweeper(folder: Path, max_age: float) -> threading.Thread:
    def loop():
        while True:
            time.sleep(max(1.0, max_age / 4))
            sweep_uploads(folder, max_age)

    thread = threading.Thread(target=loop, name="upload-sweeper", daemon=True)
    thread.start()
    return thread


def summary_markdown(analysis: Analysis) -> str:
    p = analysis.prediction
    if p.verdict == NOT_UPPER_EXTREMITY:
        top = p.body_part_probabilities["other"]
        return (
            f"### This does not look like an upper-extremity radiograph\n"
            f"The body-part model gives 'other' {top:.0%}. No abnormality reading is given. "
            "If it is an upper-extremity radiograph, choose its body part to read it anyway."
        )
    lines = [
        f"### {p.verdict.upper()}: abnormality probability {p.abnormality_probability:.1%}",
        f"- Body part: **{p.body_part}** ({'chosen by you' if p.body_part_source == 'user' else 'detected'}, "
        f"model gives it {p.body_part_probabilities[p.body_part]:.0%})",
        f"- Decision threshold for {p.body_part}: {p.threshold:.3f} (abnormal at or above)",
        "- Validated for this body part: "
        + ("yes (held-out MURA data)" if p.validated else "**no**: no abnormality training data for this part"),
    ]
    if p.body_part_source == "user" and p.predicted_body_part != p.body_part:
        lines.append(f"- Note: the body-part model's own answer is **{p.predicted_body_part}**")
    return "\n".join(lines)


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
    """The full UI plus the /predict and /explain API endpoints."""
    choices = predictor.body_part_choices

    def store_upload(upload):
        """Read a new upload into this session's memory (the page keeps no file of it)."""
        if upload is None:
            return None
        try:
            return read_upload(upload)
        except ImageInputError as err:
            raise gr.Error(str(err), title="Cannot read this file") from None

    def analyze_ui(data, body_part, opacity, colormap, threshold):
        if data is None:
            raise gr.Error("Upload a radiograph first.", title="No image")
        try:
            analysis = predictor.analyze(data, body_part, DEFAULT_METHODS, threshold or None)
        except ImageInputError as err:
            raise gr.Error(str(err), title="Cannot analyse this file") from None
        p = analysis.prediction
        overlays = analysis.overlays(opacity, colormap) if analysis.maps else {}
        label = {k: v for k, v in p.body_part_probabilities.items()}
        maps = [png_file(overlays[m]) if m in overlays else None for m in DEFAULT_METHODS]
        return (summary_markdown(analysis), label, *maps, p.to_dict())

    def predict_api(upload, body_part: str = AUTO) -> dict:
        try:
            return predictor.predict(read_upload(upload), body_part).to_dict()
        except ImageInputError as err:
            raise gr.Error(str(err)) from None

    def predict_study_api(uploads, body_part: str = AUTO) -> dict:
        try:
            if not uploads:
                raise ImageInputError("No files were uploaded.")
            return predictor.predict_study([read_upload(u) for u in uploads], body_part)
        except ImageInputError as err:
            raise gr.Error(str(err)) from None

    def explain_api(upload, body_part: str = AUTO, method: str = "gradcam"):
        try:
            if method not in METHODS:
                raise ImageInputError(f"Unknown method '{method}'. Choose one of: {', '.join(METHODS)}.")
            analysis = predictor.analyze(read_upload(upload), body_part, (method,))
            if not analysis.maps:
                raise ImageInputError(
                    "This does not look like an upper-extremity radiograph, so there is no abnormality to explain. "
                    "Pass a body part instead of 'auto' to explain it anyway."
                )
        except ImageInputError as err:
            raise gr.Error(str(err)) from None
        return png_file(analysis.overlays()[method])

    with gr.Blocks(title="MURA demo: explainable abnormality detection") as demo:
        gr.Markdown("# MURA demo: body part, abnormality and why\n" + DISCLAIMER)
        gr.Markdown(model_markdown(predictor))
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(
                    label="Upper-extremity radiograph (PNG, JPEG, BMP, TIFF or DICOM)",
                    file_types=[".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"],
                    type="filepath",
                )
                body_part = gr.Dropdown(choices, value=AUTO, label="Body part ('auto': let the model decide)")
                opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Heatmap opacity")
                colormap = gr.Dropdown(list(COLORMAPS), value="jet", label="Colour map")
                threshold = gr.Number(
                    value=0, minimum=0, maximum=1, label="Decision threshold (0: the part's calibrated one)"
                )
                run = gr.Button("Analyse", variant="primary")
                if examples_dir and Path(examples_dir).is_dir():
                    files = sorted(str(p) for p in Path(examples_dir).iterdir() if p.is_file())
                    gr.Examples([[f] for f in files], inputs=[upload])
            with gr.Column(scale=2):
                summary = gr.Markdown("Upload a radiograph and press **Analyse**.", elem_id="summary")
                parts = gr.Label(label="Body part probabilities", num_top_classes=4)
                with gr.Row():
                    maps = [
                        gr.Image(
                            label=METHOD_LABELS[m],
                            type="filepath",
                            interactive=False,
                            elem_id=f"map-{method_slug(m)}",
                        )
                        for m in DEFAULT_METHODS
                    ]
                with gr.Accordion("Raw prediction (JSON)", open=False):
                    raw = gr.JSON()
        stored = gr.State(None)
        inputs = [stored, body_part, opacity, colormap, threshold]
        outputs = [summary, parts, *maps, raw]
        upload.change(store_upload, upload, stored, api_name=False).success(analyze_ui, inputs, outputs, api_name=False)
        run.click(analyze_ui, inputs, outputs, api_name=False)
        for control in (body_part, colormap, threshold):
            control.input(analyze_ui, inputs, outputs, api_name=False)
        opacity.release(analyze_ui, inputs, outputs, api_name=False)

        # API-only endpoints: hidden components give them typed inputs and outputs.
        with gr.Group(visible=False):
            api_file = gr.File(type="filepath")
            api_part = gr.Textbox(value=AUTO)
            api_method = gr.Textbox(value="gradcam")
            api_json = gr.JSON()
            api_image = gr.Image(type="filepath")
            api_files = gr.File(type="filepath", file_count="multiple")
            gr.Button().click(predict_api, [api_file, api_part], api_json, api_name="predict")
            gr.Button().click(predict_study_api, [api_files, api_part], api_json, api_name="predict_study")
            gr.Button().click(explain_api, [api_file, api_part, api_method], api_image, api_name="explain")
    return demo


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's per-thread malloc arenas: Gradio's worker threads otherwise each keep their own
    freed memory, and resident memory grows with the number of threads that ever ran a request."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


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
    # A private upload folder, swept every few seconds: nothing uploaded outlives UPLOAD_TTL.
    os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="mura-demo-uploads-"))
    start_upload_sweeper(upload_folder(), float(os.environ.get(UPLOAD_TTL_ENV, UPLOAD_TTL)))
    limit_malloc_arenas()
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
