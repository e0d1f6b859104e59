"""The ``macopt`` command line: one sub-command per module in :mod:`macopt.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines ``add_parser(subparsers)``; its parser sets ``func(args) -> int``.
COMMANDS = ("inspect", "patch", "generate", "bench", "eval", "calibrate", "models")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="macopt", description="Fast long-context decoding for PyTorch / Hugging Face models."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"macopt.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"macopt.commands.{name}":
                raise
            continue  # not built yet
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
