"""Record what each attention layer of a Hugging Face model sees: pre-RoPE queries, post-RoPE
queries, keys and values, and let a function replace its output.

Attention inputs come through transformers' ``AttentionInterface`` (a registered attention
function that records and then runs SDPA, or whatever ``attend`` computes), so every family
whose attention goes through that interface is covered without knowing where its RoPE lives.
The pre-RoPE query is what macopt's MAC matches on: the output of the module's ``q_norm`` when
it has one (Qwen3, Gemma3), else of ``q_proj``, as ``[B, Hq, L, D]``.

>>> with AttentionTap(model) as tap:                                     # doctest: +SKIP
...     model(ids)
>>> tap.calls[0].q_pre.shape, tap.calls[0].k.shape                       # doctest: +SKIP
(torch.Size([1, 8, 512, 128]), torch.Size([1, 2, 512, 128]))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor
_NAME = "macopt_attention_tap"


@dataclass
class AttentionCall:
    """One attention call: ``q_pre, q[B, Hq, L, D]``, ``k, v[B, Hkv, Nk, D]`` (the whole cache
    when the model runs with one), the layer's index, qualified module name and scale."""

    layer: int
    name: str
    q_pre: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    scale: float


# attend(call, sdpa) -> output [B, L, Hq, D] (transformers' layout), or None to run SDPA.
Attend = Callable[[AttentionCall, Callable[[], Tensor]], Tensor | None]


class AttentionTap:
    """Context manager: while active, every attention call of ``model`` is recorded in
    ``calls`` (``keep`` False: not kept, only passed to ``attend``) and its output is
    ``attend(call, sdpa)``'s (SDPA's when ``attend`` is None or returns None)."""

    def __init__(self, model: torch.nn.Module, attend: Attend | None = None, keep: bool = True):
        if not hasattr(model, "set_attn_implementation"):
            raise ValueError(f"{type(model).__name__} is not a Hugging Face model with a "
                             "settable attention implementation")
        self.model, self.attend, self.keep = model, attend, keep
        self.calls: list[AttentionCall] = []
        self._names = {id(m): n for n, m in model.named_modules()}
        self._q_pre: dict[int, Tensor] = {}
        self._hooks: list[Any] = []

    def __enter__(self) -> AttentionTap:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        for module in self.model.modules():
            source = getattr(module, "q_norm", None) or getattr(module, "q_proj", None)
            if hasattr(module, "layer_idx") and isinstance(source, torch.nn.Module):
                self._hooks.append(source.register_forward_hook(self._pre_rope_hook(module)))
        if not self._hooks:
            raise ValueError(f"{type(self.model).__name__}: no attention module with q_proj "
                             "(or q_norm) found; cannot record pre-RoPE queries")
        AttentionInterface.register(_NAME, self._record)
        AttentionMaskInterface.register(_NAME, sdpa_mask)  # masks as for SDPA (chunks too)
        self._previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(_NAME)
        return self

    def __exit__(self, *exc: object) -> None:
        self.model.set_attn_implementation(self._previous)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _pre_rope_hook(self, attention: torch.nn.Module):
        def hook(_module, _inputs, output: Tensor) -> None:
            batch, length = output.shape[:2]
            head_dim = attention.head_dim
            self._q_pre[id(attention)] = output.view(batch, length, -1, head_dim).transpose(1, 2)
        return hook

    def _record(self, module, query, key, value, attention_mask, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        call = AttentionCall(module.layer_idx, self._names.get(id(module), ""),
                             self._q_pre.pop(id(module)), query, key, value, scale)
        if self.keep:
            self.calls.append(call)

        def sdpa() -> Tensor:
            return sdpa_attention_forward(module, query, key, value, attention_mask,
                                          **kwargs)[0]

        out = self.attend(call, sdpa) if self.attend is not None else None
        return (sdpa() if out is None else out), None
