"""Reasons an attention module is out of scope, read from the module and its config.

Model code is duck-typed here (no transformers import): Hugging Face attention modules carry
``sliding_window``, ``is_causal``, ``config.attn_logit_softcapping`` and the like.
"""

from __future__ import annotations

import torch

from macopt.kernels.limits import SUPPORTED_HEAD_DIMS


def _attr(module: torch.nn.Module, name: str) -> object:
    """``module.name``, else ``module.config.name``, else None."""
    if hasattr(module, name):
        return getattr(module, name)
    return getattr(getattr(module, "config", None), name, None)


def unsupported_module_reason(module: torch.nn.Module | None) -> str | None:
    """Why sites in ``module`` must stay untouched, or None when nothing rules them out."""
    if module is None:
        return None
    mla = latent_attention_reason(module)
    if mla:
        return mla
    # Softcap before the window: it holds at every layer (Gemma2), the window at some.
    softcap = _attr(module, "attn_logit_softcapping")
    if softcap:
        return f"softcap: attention logit softcap ({softcap}) is not in the decode kernels"
    window = getattr(module, "sliding_window", None)
    if window:
        return f"sliding-window attention (window {window}): the methods assume keys [0, t]"
    if getattr(module, "is_cross_attention", False):
        return "cross-attention: keys come from the encoder, not the KV cache"
    if getattr(module, "is_causal", True) is False:
        return "non-causal (encoder) attention"
    return None


def latent_attention_reason(config_or_module: object) -> str | None:
    """Why a multi-head latent attention (MLA: DeepSeek-V2/V3, MiniCPM3) module or config is
    out of scope, or None (not MLA, or one head dim for q, k and v that the kernels support).
    Its q/k head dim is ``qk_nope_head_dim + qk_rope_head_dim``; ``head_dim`` is the RoPE part."""
    def get(name: str) -> object:
        found = getattr(config_or_module, name, None)
        if found is None and isinstance(config_or_module, torch.nn.Module):
            found = _attr(config_or_module, name)
        return found

    rope, nope, v_dim = get("qk_rope_head_dim"), get("qk_nope_head_dim"), get("v_head_dim")
    if not all(isinstance(x, int) for x in (rope, nope, v_dim)):
        return None
    qk_dim = rope + nope
    if qk_dim not in SUPPORTED_HEAD_DIMS:
        return (f"multi-head latent attention: q/k head dim {qk_dim} is not one of "
                f"{SUPPORTED_HEAD_DIMS}")
    if v_dim != qk_dim:
        return (f"multi-head latent attention: q/k head dim {qk_dim} is supported, but the v "
                f"head dim {v_dim} differs from it (the decode kernels need one head dim for "
                f"q, k and v)")
    return None
