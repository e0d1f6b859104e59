"""``macopt patch MODEL --config CFG.json --out DIR``: a model directory that loads optimized.

DIR gets MODEL's files as symbolic links (``--copy``: copies), the parameter files the config
names (calibrated phi maps, ...) copied in, and ``macopt.json``; then
``macopt.from_pretrained(DIR)`` loads the model with ``macopt.optimize`` applied. A MODEL that
is a transformers model type (or a directory with only a config) is built with random
weights, shrunk to ``--layers``, and saved into DIR. CFG.json is ``MethodConfig.to_dict()``
(e.g. ``{"method": "exact"}``), or ``{"config": {...}, "overrides": {module: {...} | null}}``.

The config is checked against the model before anything is written (optimize() runs on a
weightless copy of the model), and DIR appears complete or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from macopt.config import MethodConfig
from macopt.model_source import build_random_model, has_weights, load_config
from macopt.pretrained import PATCH_FILE, Patch, parameter_files, parse_config_file


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("patch", help="write a model directory that loads optimized",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="local model directory, or a transformers model type")
    parser.add_argument("--config", required=True, type=Path, help="method config JSON file")
    parser.add_argument("--out", required=True, type=Path, help="directory to write (new)")
    parser.add_argument("--copy", action="store_true", help="copy the model's files, not links")
    parser.add_argument("--layers", type=int, default=2,
                        help="layers of a random model built from a config (default 2)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    try:
        written = patch_model(args.model, args.config, args.out, copy=args.copy,
                              layers=args.layers)
    except (ValueError, OSError) as err:
        console.print(f"[red]macopt patch {args.model}:[/red] {err}")
        return 2
    console.print(f"wrote {written}: load it with macopt.from_pretrained({str(written)!r})")
    return 0


def patch_model(model: str | Path, config_file: str | Path, out: str | Path, *,
                copy: bool = False, layers: int = 2) -> Path:
    """Write the patched directory ``out`` for ``model`` and the config in ``config_file``.

    >>> patch_model("/models/llama", "mac.json", "/models/llama-mac")  # doctest: +SKIP
    PosixPath('/models/llama-mac')
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not empty; choose a new directory "
                         "or remove it first (patch never overwrites).")
    config, overrides = parse_config_file(config_file)
    for part in (config, *(c for c in overrides.values() if c is not None)):
        check_feature_maps(part)
    files = parameter_files(config)
    check_config_fits(model, config, overrides)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent.resolve()))
    try:
        _write_model_files(model, staging, copy, layers, skip={p.name for p in files.values()})
        stored = {}
        for name, path in files.items():
            stored[name] = path.name
            shutil.copy2(path, staging / path.name)
        patch = Patch(config, overrides, source=str(Path(model).resolve())
                      if Path(model).is_dir() else str(model))
        (staging / PATCH_FILE).write_text(json.dumps(patch.to_json(stored), indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def check_feature_maps(config: MethodConfig) -> None:
    """Every phi maps file the config names exists and loads (else generate's first step
    would fail, a corrupt file without its name)."""
    from macopt.phi_files import read_feature_maps

    def walk(fields: dict) -> None:
        for name, value in fields.items():
            if isinstance(value, dict):
                walk(value)
            elif name == "feature_maps" and value:
                read_feature_maps(value)

    walk(config.to_dict())


def check_config_fits(model: str | Path, config: MethodConfig,
                      overrides: dict[str, MethodConfig | None]) -> None:
    """Run optimize() on a weightless (meta-device) copy of ``model``: the same errors a user
    would meet at load time (no SDPA site, head dim, a method needing RoPE...), now."""
    from transformers import AutoModelForCausalLM

    import macopt

    hf_config = load_config(model)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(hf_config)
    except ValueError as err:
        raise ValueError(f"{str(model)!r} has no causal-LM class in transformers: {err}") from None
    macopt.optimize(skeleton, config, overrides=overrides)


def _write_model_files(model: str | Path, into: Path, copy: bool, layers: int,
                       skip: set[str]) -> None:
    if not has_weights(model):
        build_random_model(str(model), layers).save_pretrained(into)
        return
    for entry in sorted(Path(model).resolve().iterdir()):
        if entry.name in skip or entry.name == PATCH_FILE or entry.name.startswith("."):
            continue  # re-patching a patched directory replaces its macopt.json and params
        target = into / entry.name
        if not copy:
            target.symlink_to(entry, target_is_directory=entry.is_dir())
        elif entry.is_dir():
            shutil.copytree(entry, target)
        else:
            shutil.copy2(entry, target)
