"""A prompt into an empty cache, traced by the ``macopt_eager`` route, builds no causal mask.

Why. Stateful methods run their prefill through a dynamo trace (:mod:`macopt.api`). Traced,
transformers cannot see that a static cache is empty (its offset is a tensor), so its SDPA mask
function materialises the causal mask over the whole cache, ``[B, 1, C, N]`` booleans: 16 GiB a
row for a 128K prompt (BENCHMARKS.md 13a), where eager transformers passes no mask and SDPA's
``is_causal``, cutting the keys to the prompt's.

What. The routed forward checks, outside the trace and once per prompt (one host sync), what
eager transformers checks before it skips the mask: more than one token, an empty cache, no
padding (:func:`fresh_causal_prompt`). Only inside such a call does the SDPA mask function that
transformers looks up return None, and only for a plain causal mask (no sliding window, no
extra mask function, skipping allowed by the caller): the call eager transformers makes.
Dynamo guards on the flag, so such prompts get a graph of their own; every other call, and
every model not routed, gets transformers' own function.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch


class _Flag:
    # An attribute, not a module global rebound by callers: dynamo guards on its value.
    causal_prompt = False


FLAG = _Flag()


def install() -> None:
    """Wrap transformers' SDPA mask function once per process (idempotent)."""
    from transformers import masking_utils

    mapping = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    original = mapping.get("sdpa")
    if original is None or getattr(original, "_macopt_wraps", None) is not None:
        return
    causal = masking_utils.causal_mask_function

    @functools.wraps(original)
    def sdpa_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
        plain_causal = (not args and kwargs.get("mask_function", causal) is causal
                        and kwargs.get("local_size") is None
                        and kwargs.get("allow_is_causal_skip", True))
        if FLAG.causal_prompt and plain_causal:
            return None
        return original(*args, **kwargs)

    sdpa_mask._macopt_wraps = original
    masking_utils.ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa", sdpa_mask)


def fresh_causal_prompt(args: tuple, kwargs: dict) -> bool:
    """Whether a transformers forward call is a prompt of several tokens into an empty cache
    with no padding (``attention_mask`` all ones or absent). Reads the cache's length and the
    mask on the host: called for prompts only, never per decode step."""
    from macopt._hf_compat import cache_argument, input_tokens

    ids = input_tokens(args, kwargs)
    if ids is None or ids.dim() < 2 or ids.shape[1] <= 1:
        return False
    cache = cache_argument(kwargs)
    if cache is not None:
        try:
            if int(cache.get_seq_length()) != 0:
                return False
        except (AttributeError, TypeError, ValueError):  # a cache we cannot read: keep the mask
            return False
    mask = kwargs.get("attention_mask")
    if mask is None:
        return True
    if not isinstance(mask, torch.Tensor):  # e.g. a dict of prepared masks: theirs to keep
        return False
    return mask.dim() == 2 and mask.shape[1] == ids.shape[1] and bool(mask.all())


@contextlib.contextmanager
def causal_prompt(active: bool) -> Iterator[None]:
    """Within: transformers' SDPA mask function skips a plain causal mask (when ``active``)."""
    before, FLAG.causal_prompt = FLAG.causal_prompt, active
    try:
        yield
    finally:
        FLAG.causal_prompt = before
