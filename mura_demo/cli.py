"""The command line: ``python -m mura_demo`` (or ``mura-demo`` once the package is installed).

train     train on MURA + UNIFESP and export a weights folder
average   one network from the average of runs' weights, finalized on the holdout
pair      one model from two networks (body part from one, abnormality from the other)
split     a pair's two networks as single-network folders (to start a run from, or to pair anew)
evaluate  score weights on held-out data (report, plots, optional model card)
upload    publish a weights folder to a Hub model repo (--dry-run to check only)
predict   body part, abnormality probability and verdict for images (files or folders)
explain   write explanation overlays for an image
report    a one-page report (PDF or PNG) for an image or the views of one study
batch     predict a folder tree: predictions.csv, studies.csv and heatmaps

Every command that cannot do what was asked exits non-zero with a one-line reason on stderr.
Training code is imported only by the commands that train or evaluate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .core.checks import SUFFIXES, UserError, find_images
from .core.weights import WeightsError
from .training.settings import JOINING_SETTINGS, VIEW_CHOICES, EvalSettings, TrainSettings


def methods_list(text: str) -> tuple[str, ...]:
    """``--method gradcam,saliency`` -> ("gradcam", "saliency"); names are checked with the request."""
    return tuple(m.strip() for m in text.split(",") if m.strip())


def add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--option`` per field of a settings dataclass, typed from its annotation."""
    types = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str, "float | None": float}
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
            continue
        parser.add_argument(flag, type=types[field.type], default=field.default, help=f"default: {field.default}")


def settings_from(cls, args):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def image_files(paths: list[str]) -> list[str]:
    """The named files, with each named folder replaced by the images under it (sorted)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = [str(p) for p in find_images(path)]
            if not found:
                raise UserError(f"{path} holds no image ({', '.join(SUFFIXES)}).")
            files += found
        else:
            files.append(str(path))
    return files


def predictor_for(args):
    from .serving.predictor import Predictor

    return Predictor.from_spec(args.weights)


def run_train(args) -> None:
    from .core.malloc import tune_for_batch_work
    from .training.train import train

    tune_for_batch_work()
    train(settings_from(TrainSettings, args))


def combining_settings(args) -> TrainSettings:
    """Settings of a command that joins trained networks (`average`, `pair`): where the data is, where the model
    goes, its version, the CPU threads its holdout pass may use and what chooses the body part's view."""
    return TrainSettings(**{name: getattr(args, name) for name in JOINING_SETTINGS})


def run_average(args) -> None:
    from .core.malloc import tune_for_batch_work
    from .training.train import average_runs

    tune_for_batch_work()
    average_runs(args.folders, combining_settings(args), args.shares)


def run_pair(args) -> None:
    from .core.malloc import tune_for_batch_work
    from .training.train import pair_networks

    tune_for_batch_work()
    pair_networks(args.body_part, args.abnormality, combining_settings(args))


def run_split(args) -> None:
    from .training.train import split_pair

    for folder in split_pair(args.weights, args.out_dir):
        print(folder)


def run_evaluate(args) -> None:
    from .core.malloc import tune_for_batch_work
    from .training.card import write_model_card
    from .training.evaluate import evaluate, summary_table

    tune_for_batch_work()
    settings = settings_from(EvalSettings, args)
    report = evaluate(settings)
    print(summary_table(report))
    print(json.dumps(report["body_part"] | {"confusion_matrix": "see report.json"}, indent=1))
    if args.card:
        print(f"model card: {write_model_card(settings.weights, report | {'n_boot': settings.n_boot})}")


def run_upload(args) -> None:
    from .core.weights import upload_to_hub

    for line in upload_to_hub(args.weights, args.repo_id, dry_run=args.dry_run, revision=args.revision):
        print(("would upload " if args.dry_run else "uploaded ") + line)


PREDICT_COLUMNS = ("image", "body_part", "body_part_status", "abnormality_probability", "threshold", "verdict",
                   "validated")  # fmt: skip


def run_predict(args) -> None:
    predictor = predictor_for(args)
    images = image_files(args.images)
    if args.study:
        result = predictor.predict_study(images, args.body_part, args.threshold)
        if args.json:
            print(json.dumps(result))
            return
        rows = [{"image": "study", **result["study"]}]
    else:
        rows = [
            {"image": image, **predictor.predict(image, args.body_part, args.threshold).to_dict()} for image in images
        ]
        if args.json:
            print("\n".join(json.dumps(row) for row in rows))
            return
    print("\t".join(PREDICT_COLUMNS))
    for row in rows:
        print("\t".join("-" if row[c] is None else str(row[c]) for c in PREDICT_COLUMNS))
        if row["note"]:
            print(f"  note: {row['note']}")


def run_explain(args) -> None:
    from PIL import Image

    from .core.explain import method_slug

    explanation = predictor_for(args).explain(args.image, args.body_part, args.method)
    if not explanation.maps:
        raise UserError(
            f"{args.image} does not look like an upper-extremity radiograph, so there is nothing to explain; "
            "pass --body-part to explain it anyway."
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for method, rgb in explanation.overlays().items():
        path = out / f"{Path(args.image).stem}_{method_slug(method)}.png"
        Image.fromarray(rgb).save(path)
        print(path)


def run_report(args) -> None:
    from .serving.report import render_report, report_kind, save_report

    report_kind(args.out)  # a wrong suffix fails before the work, not after
    analysis = predictor_for(args).analyze_study(image_files(args.images), args.body_part, args.method, args.threshold)
    print(save_report(render_report(analysis), args.out))


def run_batch(args) -> None:
    from .serving.batch import run_batch as batch

    counts = batch(predictor_for(args), args.folder, args.out, args.body_part, args.method, args.studies)
    print(json.dumps(counts))


def build_parser() -> argparse.ArgumentParser:
    from .serving.batch import STUDY_RULES

    parser = argparse.ArgumentParser(
        prog="mura-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str, **kw) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, **kw)
        p.set_defaults(func=func)
        return p

    def combining_options(p: argparse.ArgumentParser, out_dir: str) -> None:
        p.add_argument("--version", required=True)
        p.add_argument("--export-dir", required=True)
        p.add_argument("--out-dir", default=out_dir)
        p.add_argument("--data-root", default=TrainSettings.data_root)
        p.add_argument("--threads", type=int, default=None, help="CPU threads (default: OMP_NUM_THREADS or the cores)")
        p.add_argument("--view-choice", choices=VIEW_CHOICES, default=TrainSettings.view_choice,
                       help="what the body part's size and view maximise on the holdout (see `train`)")  # fmt: skip
        p.add_argument("--other-shift", action="store_true",
                       help="shift the body-part head's other logit by a holdout choice (see `train`)")  # fmt: skip

    def reading_options(p: argparse.ArgumentParser, methods: str | None = "gradcam,gradcam++,saliency") -> None:
        p.add_argument("--body-part", default="auto", help="a body part, or 'auto' to let the model decide")
        p.add_argument("--weights", default=None, help="weights folder or hf://owner/name@revision")
        if methods:
            p.add_argument("--method", type=methods_list, default=methods_list(methods), help=f"default: {methods}")

    add_dataclass_options(command("train", run_train, "train and export a weights folder"), TrainSettings)
    p = command("average", run_average, "one network from the average of training runs' weights")
    p.add_argument("folders", nargs="+", help="weights folders of runs of one architecture and input size")
    p.add_argument("--shares", type=float, nargs="+", help="each run's weight in the average (default: equal)")
    combining_options(p, out_dir="runs/average")
    p = command("pair", run_pair, "one model from two networks: the body part from one, the abnormality from the other")
    p.add_argument("--body-part", required=True, help="weights folder of the network that reads the body part")
    p.add_argument("--abnormality", required=True, help="weights folder of the network that reads the abnormality")
    combining_options(p, out_dir="runs/pair")
    p = command("split", run_split, "a pair's two networks as folders OUT_DIR/body_part and OUT_DIR/abnormality")
    p.add_argument("weights", help="weights folder of a pair")
    p.add_argument("--out-dir", required=True)
    p = command(
        "evaluate", run_evaluate, "score weights on MURA valid, the elbow test share and the UNIFESP test share"
    )
    add_dataclass_options(p, EvalSettings)
    p.add_argument("--card", action="store_true", help="also write the model card into the weights folder")
    p = command("upload", run_upload, "upload a weights folder to a Hub model repo")
    p.add_argument("repo_id")
    p.add_argument("--weights", default="weights")
    p.add_argument("--revision", default=None)
    p.add_argument("--dry-run", action="store_true")
    p = command("predict", run_predict, "classify images (files, or folders of them)")
    p.add_argument("images", nargs="+")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p.add_argument("--study", action="store_true", help="the images are views of one study")
    reading_options(p, methods=None)
    p = command("explain", run_explain, "write explanation overlays as PNG")
    p.add_argument("image")
    p.add_argument("--out", required=True)
    reading_options(p)
    p = command("report", run_report, "one-page report (PDF or PNG) for an image or one study's views")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True, help="report file, .pdf or .png")
    p.add_argument("--threshold", type=float, default=None)
    reading_options(p)
    p = command("batch", run_batch, "predict a folder tree: predictions.csv, studies.csv, heatmaps/")
    p.add_argument("folder")
    p.add_argument("--out", required=True)
    p.add_argument("--studies", choices=list(STUDY_RULES), default="auto", help="; ".join(STUDY_RULES.values()))
    reading_options(p, methods="gradcam")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        args.func(args)
    except (WeightsError, UserError, FileNotFoundError, ValueError) as err:
        print(f"mura-demo: {err}", file=sys.stderr)
        return 2
    return 0
