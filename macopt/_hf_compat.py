"""Transformers specifics that moved or are private, in one place (5.17 through 5.25).

``passes/_compat.py`` holds the torch ones; this module the Hugging Face ones, so supporting a
new transformers release means editing this file.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from macopt import distributed


def compile_config(mode: str = "default", fullgraph: bool = True,
                   backend: Any = "inductor") -> Any:
    """A ``transformers.CompileConfig`` that generate() honours on every device.

    transformers compiles the decode step of a static-cache generate() on GPUs only unless the
    private ``_compile_all_devices`` is set; macopt wants the same path on CPU (tests, CLI).
    Also compiles sliding-window cache lengths dynamically (:func:`compile_window_lengths_dynamic`).
    """
    from transformers import CompileConfig

    compile_window_lengths_dynamic()
    config = CompileConfig(fullgraph=fullgraph, mode=mode, backend=backend)
    config._compile_all_devices = True
    return config


# Dynamo source names of the Python-int length counter of transformers' sliding-window static
# cache layers (``StaticSlidingWindowLayer.cumulative_length_int``), as a dynamic_sources regex.
WINDOW_LENGTH_SOURCES = r".*\.cumulative_length_int$"


def compile_window_lengths_dynamic() -> None:
    """Compile the sliding-window layers' Python-int cache length as a dynamic int from the
    first compile on (process-wide, idempotent; adds to ``torch.compiler.config.dynamic_sources``).

    Why: ``StaticSlidingWindowLayer.update`` branches on ``cumulative_length_int >=
    max_cache_len`` (is the window full?). Dynamo specializes a Python int on first sight, so
    the first decode graph guards ``cumulative_length_int == <prompt length>`` and the second
    decode step recompiles (automatic dynamic), even in the unmodified model. Marked dynamic,
    the int is guarded by the branch only (``<= window - 1``, then ``>= window``): one decode
    graph while the window fills and one once it is full, and just one when the prompt
    already fills the window. The full/not-full split itself is transformers' Python control
    flow; no compile option removes it.
    """
    entries = [e for e in torch.compiler.config.dynamic_sources.replace(" ", "").split(",") if e]
    if WINDOW_LENGTH_SOURCES not in entries:
        torch.compiler.config.dynamic_sources = ",".join([*entries, WINDOW_LENGTH_SOURCES])


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

    compile_window_lengths_dynamic()
    try:
        cache = StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # releases that still size the batch up front
        cache = StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len)
    ready_static_cache(model, cache, batch, dtype, torch.device(device))
    return cache


def ready_static_cache(model: torch.nn.Module, cache: Any, batch: int, dtype: torch.dtype,
                       device: torch.device) -> bool:
    """Allocate a static cache that ``generate()`` made (lazily allocated) now, outside any
    trace, and mark its tensors static; False if ``cache`` is no uninitialised static cache.

    Why: a stateful method's prefill runs through the traced ``macopt_eager`` route, where
    transformers' lazy allocation skips ``mark_static_address``; the decode step that
    ``generate()`` compiles with CUDA graphs would then skip them ("mutated inputs").
    """
    layers = getattr(cache, "layers", None)
    if not layers or not getattr(cache, "is_compileable", False):
        return False
    if all(getattr(layer, "is_initialized", True) for layer in layers):
        return False
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    kv_heads = distributed.local_kv_heads(model) or kv_heads  # tensor parallel: this rank's
    cache.early_initialization(batch_size=batch, num_heads=kv_heads, head_dim=head_dim,
                               dtype=dtype, device=device)
    for tensor in static_cache_tensors(cache):
        torch._dynamo.mark_static_address(tensor)
    return True


def input_tokens(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The ids (or embeddings) a transformers forward was given, ``[B, L, ...]``, or None."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    return kwargs.get("inputs_embeds") if ids is None else ids


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for a call of a transformers forward: ``cache`` where the model's
    forward takes it (transformers 5.25 on, where ``past_key_values`` is deprecated and goes in
    5.40), else ``past_key_values``. ``model``: the model, its (compiled) forward, or any
    callable running one (judged by transformers' Llama)."""
    owner = getattr(model, "_orig_mod", model)
    owner = getattr(owner, "__self__", owner)  # a bound forward
    if not isinstance(owner, torch.nn.Module):
        import transformers

        owner = transformers.LlamaForCausalLM
    return {_cache_keyword(owner if isinstance(owner, type) else type(owner)): cache}


@functools.cache
def _cache_keyword(model_class: type) -> str:
    try:
        parameters = inspect.signature(model_class.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The cache a transformers forward returned (``cache`` from 5.25, ``past_key_values``
    before)."""
    found = getattr(output, "cache", None)
    return found if found is not None else getattr(output, "past_key_values", None)


def cache_argument(kwargs: dict) -> Any:
    """The cache a transformers forward was given (``cache`` from 5.2x, ``past_key_values``
    before)."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def static_cache_tensors(cache: Any) -> list[torch.Tensor]:
    """Every tensor the layers of a ``StaticCache`` hold (keys, values, length counters)."""
    return [value for layer in getattr(cache, "layers", []) for value in vars(layer).values()
            if isinstance(value, torch.Tensor)]
