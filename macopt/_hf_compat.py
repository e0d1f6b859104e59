"""Transformers specifics that moved or are private, in one place (5.17 through 5.23).

``passes/_compat.py`` holds the torch ones; this module the Hugging Face ones, so supporting a
new transformers release means editing this file.
"""

from __future__ import annotations

from typing import Any

import torch


def compile_config(mode: str = "default", fullgraph: bool = True,
                   backend: Any = "inductor") -> Any:
    """A ``transformers.CompileConfig`` that generate() honours on every device.

    transformers compiles the decode step of a static-cache generate() on GPUs only unless the
    private ``_compile_all_devices`` is set; macopt wants the same path on CPU (tests, CLI).
    """
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=fullgraph, mode=mode, backend=backend)
    config._compile_all_devices = True
    return config


def static_cache(model: torch.nn.Module, batch: int, max_len: int) -> Any:
    """A ``StaticCache`` for ``model`` (its constructor's keywords changed across 5.x)."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len)


def static_cache_tensors(cache: Any) -> list[torch.Tensor]:
    """Every tensor a ``StaticCache`` mutates during a forward (keys, values and any length
    counters such as 5.x's ``cumulative_length``), after its lazy initialisation."""
    tensors = []
    for layer in getattr(cache, "layers", []):
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                tensors.append(value)
    return tensors
