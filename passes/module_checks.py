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


def alibi_reason(model: torch.nn.Module) -> str | None:
    """Why a model's attention is out of scope because it adds an ALiBi position bias to the
    scores, or None: Bloom always does (its model builds the bias), MPT and Falcon where their
    config says ``alibi``. The decode kernels add no bias, so no site can be rewritten."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    flags = (getattr(text, "alibi", None), getattr(getattr(text, "attn_config", None), "alibi",
                                                   None))
    builds_bias = any(callable(getattr(m, "build_alibi_tensor", None)) for m in model.modules())
    if any(flag is True for flag in flags) or builds_bias:
        return ("ALiBi: an ALiBi position bias is added to the attention scores, and the decode "
                "kernels add no bias")
    return None


def quantized_modules_reason(model: torch.nn.Module) -> str | None:
    """Why a model with eager-quantized modules (``torch.ao.quantization.quantize_dynamic``,
    static quantization) cannot be rewritten, or None: dynamo cannot trace their packed
    weights (TorchScript objects), so each one breaks the graph and runs outside it."""
    found: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(outer + ".") for outer, _ in found)  # its packed params
        if not inside and type(module).__module__.startswith(("torch.ao.nn.quantized",
                                                              "torch.nn.quantized")):
            found.append((name, type(module).__name__))
    if not found:
        return None
    name, cls = found[0]
    return (f"{len(found)} quantized modules (e.g. {name!r}, {cls} from torch.ao.nn.quantized): "
            "torch.compile cannot trace their packed weights, so every one breaks the graph "
            "and macopt's passes never see an attention site whole")
