"""Reasons an attention module is out of scope, read from the module and its config.

Model code is duck-typed here (no transformers import): Hugging Face attention modules carry
``sliding_window``, ``is_causal``, ``config.attn_logit_softcapping`` and the like.
"""

from __future__ import annotations

import torch


def _attr(module: torch.nn.Module, name: str) -> object:
    """``module.name``, else ``module.config.name``, else None."""
    if hasattr(module, name):
        return getattr(module, name)
    return getattr(getattr(module, "config", None), name, None)


def unsupported_module_reason(module: torch.nn.Module | None) -> str | None:
    """Why sites in ``module`` must stay untouched, or None when nothing rules them out."""
    if module is None:
        return None
    window = getattr(module, "sliding_window", None)
    if window:
        return f"sliding-window attention (window {window}): the methods assume keys [0, t]"
    softcap = _attr(module, "attn_logit_softcapping")
    if softcap:
        return f"attention logit softcap ({softcap}) is not in the decode kernels"
    if getattr(module, "is_cross_attention", False):
        return "cross-attention: keys come from the encoder, not the KV cache"
    if getattr(module, "is_causal", True) is False:
        return "non-causal (encoder) attention"
    return None
