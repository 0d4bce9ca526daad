"""The ``mura-demo`` command line: training, evaluation, export and serving."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--option`` per field of a settings dataclass, typed from its default."""
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        kind = type(default) if default is not None else str
        if field.type in ("int | None",):
            kind = int
        parser.add_argument(flag, type=kind, default=default, help=f"default: {default}")


def main(argv: list[str] | None = None) -> int:
    from .train import TrainSettings

    parser = argparse.ArgumentParser(prog="mura-demo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train on MURA + UNIFESP and export a weights folder")
    add_dataclass_options(p_train, TrainSettings)
    args = parser.parse_args(argv)

    if args.command == "train":
        from .train import train

        settings = TrainSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings)})
        train(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
