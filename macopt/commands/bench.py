"""``macopt bench BENCHMARK``: one sub-command per module of :mod:`macopt.bench`.

A benchmark module defines ``add_parser(subparsers)``, registers its own sub-parser there and
sets ``func(args) -> int`` on it; adding ``bench mac`` or ``bench e2e`` is one name below.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = ("decode", "mac", "mac_reference", "topk", "e2e", "generate")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="benchmarks: decode attention, MAC-Attention, end-to-end decoding",
        description="Run one of macopt's benchmarks; each prints a table and can write JSON.",
    )
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name in BENCHMARKS:
        try:
            module = importlib.import_module(f"macopt.bench.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"macopt.bench.{name}":
                raise
            continue  # not built yet
        module.add_parser(benchmarks)
    return parser
