"""Patched model directories: a model's files plus ``macopt.json``, loaded already optimized.

``macopt patch MODEL --config CFG.json --out DIR`` writes one; :func:`from_pretrained` loads
it. ``macopt.json`` holds the method config (``MethodConfig.to_dict()``), optional per-module
``overrides`` and the parameter files the config references (copied into DIR), by field::

    {"format": 1, "source": "/models/llama", "config": {"method": "topk_phi", ...},
     "overrides": {"model.layers.0.self_attn": null}, "files": {"feature_maps": "phi.safetensors"}}

A new method plugs in through :meth:`MethodConfig.from_dict`: nothing here names a method.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from macopt.config import MethodConfig

PATCH_FILE = "macopt.json"
FORMAT = 1


@dataclass(frozen=True)
class Patch:
    """What ``macopt.json`` says: the config, overrides and parameter files (paths resolved)."""

    config: MethodConfig
    overrides: dict[str, MethodConfig | None] = field(default_factory=dict)
    source: str = ""

    def to_json(self, files: dict[str, str]) -> dict[str, Any]:
        config = self.config.to_dict()
        for name, relative in files.items():  # parameter fields point inside the patched dir
            _set_field(config, name, relative)
        overrides = {name: c.to_dict() if c else None for name, c in self.overrides.items()}
        return {"format": FORMAT, "source": self.source, "config": config,
                "overrides": overrides, "files": files}


def parse_config_file(path: str | Path) -> tuple[MethodConfig, dict[str, MethodConfig | None]]:
    """Read a method config JSON: ``{"method": ...}`` (``MethodConfig.to_dict()``), or
    ``{"config": {"method": ...}, "overrides": {module name: config dict or null}}``.

    >>> parse_config_file("exact.json")  # doctest: +SKIP
    (ExactConfig(), {})
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"config file {path}: cannot read it as JSON ({err})") from None
    return config_from_json(data, where=str(path))


def config_from_json(data: Any, where: str) -> tuple[MethodConfig, dict[str, MethodConfig | None]]:
    """The config and overrides of a JSON object (see :func:`parse_config_file`)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    body = data.get("config", data)
    overrides = data.get("overrides") or {}
    try:
        config = MethodConfig.from_dict(body)
        parsed = {name: MethodConfig.from_dict(c) if c is not None else None
                  for name, c in overrides.items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: not a valid macopt method config: {err}. Write one with "
                         f"`json.dumps(macopt.ExactConfig().to_dict())`.") from None
    return config, parsed


def parameter_files(config: MethodConfig, base: Path | None = None) -> dict[str, Path]:
    """Fields of ``config`` naming an existing file (calibrated parameters), by field name;
    a nested config's fields by dotted name (``MACTopKPhiConfig``: ``topk_phi.feature_maps``).

    Found by value rather than by a per-method list, so a new method's file fields travel
    with a patched model without code here.
    """
    found = {}

    def walk(fields: dict[str, Any], prefix: str) -> None:
        for name, value in fields.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{name}.")
            elif name != "method" and isinstance(value, str) and value:
                path = Path(value) if base is None else base / value
                if path.is_file():
                    found[prefix + name] = path

    walk(config.to_dict(), "")
    return found


def _set_field(fields: dict[str, Any], dotted: str, value: Any) -> None:
    """``fields["a"]["b"] = value`` for ``dotted`` ``"a.b"`` (a :func:`parameter_files` name)."""
    *parents, last = dotted.split(".")
    for name in parents:
        fields = fields[name]
    fields[last] = value


def read_patch(directory: str | Path) -> Patch:
    """The :class:`Patch` of a directory written by ``macopt patch``, parameter paths made
    absolute (they are stored relative to the directory)."""
    directory = Path(directory)
    path = directory / PATCH_FILE
    if not path.is_file():
        raise ValueError(f"{directory} has no {PATCH_FILE}: it is not a patched model directory. "
                         f"Write one with `macopt patch MODEL --config CFG.json --out DIR`, or "
                         f"load the plain model and call macopt.optimize(model, config).")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r}, this macopt reads format "
                         f"{FORMAT}; rewrite it with `macopt patch`.")
    body = json.loads(json.dumps(data["config"]))  # a deep copy: nested fields are set below
    for name, relative in (data.get("files") or {}).items():
        _set_field(body, name, str(directory / relative))
    config, overrides = config_from_json({**data, "config": body}, where=str(path))
    return Patch(config, overrides, data.get("source", ""))


def from_pretrained(directory: str | Path, **hf_kwargs: Any) -> torch.nn.Module:
    """Load a patched model directory, already optimized (``macopt.optimize`` applied).

    ``hf_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``,
    ...); nothing downloads. Compile it as usual afterwards.

    >>> import macopt, torch
    >>> model = macopt.from_pretrained("llama-mac", dtype=torch.bfloat16)  # doctest: +SKIP
    >>> model.forward = torch.compile(model.forward, fullgraph=True)  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    import macopt

    patch = read_patch(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, **hf_kwargs)
    return macopt.optimize(model.eval(), patch.config, overrides=patch.overrides)
