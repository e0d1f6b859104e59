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


def static_cache(model: torch.nn.Module, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str) -> Any:
    """A ``StaticCache`` for ``model`` whose tensors exist now and have static addresses.

    Why: transformers allocates a static cache's tensors lazily at the first ``update`` and
    marks them static (``mark_static_address``) only when not tracing. Compiling
    ``model.forward`` itself compiles the prefill too, so the allocation happens under
    tracing, the marks are skipped, and CUDA graphs then skip every graph that mutates the
    cache ("skipping cudagraphs due to mutated inputs": keys, values, and 5.x's
    ``cumulative_length`` counter, 3 per layer). Allocating eagerly here and marking every
    tensor the layers hold avoids that on every 5.x release.
    """
    from transformers import StaticCache

    text = model.config.get_text_config()
    try:
        cache = StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # releases that still size the batch up front
        cache = StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    cache.early_initialization(batch_size=batch, num_heads=kv_heads, head_dim=head_dim,
                               dtype=dtype, device=torch.device(device))
    for tensor in static_cache_tensors(cache):
        torch._dynamo.mark_static_address(tensor)
    return cache


def static_cache_tensors(cache: Any) -> list[torch.Tensor]:
    """Every tensor the layers of a ``StaticCache`` hold (keys, values, length counters)."""
    return [value for layer in getattr(cache, "layers", []) for value in vars(layer).values()
            if isinstance(value, torch.Tensor)]
