"""The ``mura-demo`` command line (also ``python -m mura_demo``).

train     train on MURA + UNIFESP and export a weights folder
evaluate  score weights on held-out data (report, plots, optional model card)
upload    publish a weights folder to a Hub model repo (--dry-run to check only)
predict   body part, abnormality probability and verdict for images
explain   write explanation overlays for an image
report    a one-page report (PDF or PNG) for an image or the views of one study
batch     predict a folder tree: predictions.csv, studies.csv and heatmaps
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--option`` per field of a settings dataclass, typed from its annotation."""
    types = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str, "float | None": float}
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=types[field.type], default=field.default, help=f"default: {field.default}")


def settings_from(cls, args):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def build_parser() -> argparse.ArgumentParser:
    from .evaluate import EvalSettings
    from .train import TrainSettings

    parser = argparse.ArgumentParser(
        prog="mura-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_dataclass_options(sub.add_parser("train", help="train and export a weights folder"), TrainSettings)
    p_eval = sub.add_parser("evaluate", help="score weights on MURA valid and the UNIFESP test share")
    add_dataclass_options(p_eval, EvalSettings)
    p_eval.add_argument("--card", action="store_true", help="also write the model card into the weights folder")
    p_up = sub.add_parser("upload", help="upload a weights folder to a Hub model repo")
    p_up.add_argument("repo_id")
    p_up.add_argument("--weights", default="weights")
    p_up.add_argument("--revision", default=None)
    p_up.add_argument("--dry-run", action="store_true")
    p_pred = sub.add_parser("predict", help="classify images")
    p_pred.add_argument("images", nargs="+")
    p_pred.add_argument("--body-part", default="auto")
    p_pred.add_argument("--threshold", type=float, default=None)
    p_pred.add_argument("--weights", default=None)
    p_pred.add_argument("--json", action="store_true")
    p_pred.add_argument("--study", action="store_true", help="the images are views of one study")
    p_exp = sub.add_parser("explain", help="write explanation overlays as PNG")
    p_exp.add_argument("image")
    p_exp.add_argument("--method", default="gradcam,gradcam++,saliency")
    p_exp.add_argument("--body-part", default="auto")
    p_exp.add_argument("--out", required=True)
    p_exp.add_argument("--weights", default=None)
    p_rep = sub.add_parser("report", help="one-page report (PDF or PNG) for an image or one study's views")
    p_rep.add_argument("images", nargs="+")
    p_rep.add_argument("--out", required=True, help="report file, .pdf or .png")
    p_rep.add_argument("--method", default="gradcam,gradcam++,saliency")
    p_rep.add_argument("--body-part", default="auto")
    p_rep.add_argument("--threshold", type=float, default=None)
    p_rep.add_argument("--weights", default=None)
    p_batch = sub.add_parser("batch", help="predict a folder tree: predictions.csv, studies.csv, heatmaps/")
    p_batch.add_argument("folder")
    p_batch.add_argument("--out", required=True)
    p_batch.add_argument("--body-part", default="auto")
    p_batch.add_argument("--method", default="gradcam", help="comma-separated maps to save")
    p_batch.add_argument("--weights", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    from .imaging import ImageInputError
    from .weights import WeightsError

    try:
        return run(args, argv)
    except (WeightsError, ImageInputError, FileNotFoundError, ValueError) as err:
        print(f"mura-demo: {err}", file=sys.stderr)
        return 2


def run(args, argv) -> int:
    if args.command in ("train", "evaluate"):
        from .malloc import tune_for_batch_work

        tune_for_batch_work()
    if args.command == "train":
        from .train import TrainSettings, train

        train(settings_from(TrainSettings, args))
    elif args.command == "evaluate":
        from .card import write_model_card
        from .evaluate import EvalSettings, evaluate, summary_table

        settings = settings_from(EvalSettings, args)
        report = evaluate(settings)
        print(summary_table(report))
        print(json.dumps(report["body_part"] | {"confusion_matrix": "see report.json"}, indent=1))
        if args.card:
            print(f"model card: {write_model_card(settings.weights, report | {'n_boot': settings.n_boot})}")
    elif args.command == "upload":
        from .card import upload

        for line in upload(args.weights, args.repo_id, dry_run=args.dry_run, revision=args.revision):
            print(("would upload " if args.dry_run else "uploaded ") + line)
    elif args.command == "batch":
        from .batch import run_batch
        from .predictor import Predictor

        methods = tuple(m.strip() for m in args.method.split(",") if m.strip())
        counts = run_batch(Predictor.from_spec(args.weights), args.folder, args.out, args.body_part, methods)
        print(json.dumps(counts))
    elif args.command in ("predict", "explain", "report"):
        from .predictor import Predictor

        predictor = Predictor.from_spec(args.weights)
        if args.command == "report":
            from .report import render_report, report_kind, save_report

            report_kind(args.out)  # a wrong suffix fails before the work, not after
            methods = tuple(m.strip() for m in args.method.split(",") if m.strip())
            analysis = predictor.analyze_study(args.images, args.body_part, methods, args.threshold)
            print(save_report(render_report(analysis), args.out))
        elif args.command == "predict" and args.study:
            result = predictor.predict_study(args.images, args.body_part, args.threshold)
            st = result["study"]
            prob = "-" if st["abnormality_probability"] is None else f"{st['abnormality_probability']:.3f}"
            print(json.dumps(result) if args.json else f"study\t{st['body_part']}\t{prob}\t{st['verdict']}")
        elif args.command == "predict":
            for image in args.images:
                p = predictor.predict(image, args.body_part, args.threshold)
                if args.json:
                    print(json.dumps({"image": image, **p.to_dict()}))
                else:
                    prob = "-" if p.abnormality_probability is None else f"{p.abnormality_probability:.3f}"
                    print(f"{image}\t{p.body_part or p.predicted_body_part}\t{prob}\t{p.verdict}")
        else:
            from PIL import Image

            from .explain import method_slug

            methods = tuple(m.strip() for m in args.method.split(","))
            explanation = predictor.explain(args.image, args.body_part, methods)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            for method, rgb in explanation.overlays().items():
                path = out / f"{Path(args.image).stem}_{method_slug(method)}.png"
                Image.fromarray(rgb).save(path)
                print(path)
    return 0
