"""Exact attention's custom ops (``torch.ops.macopt.*``): ``decode_attention`` (what the
``exact`` rewrite inserts), ``decode_attention_or`` (the mask-hole fallback,
:mod:`macopt.passes.mask_holes`), and ``decode_attention_state`` / ``merge_states`` (states to
merge; public, README).

Each op has a fake (meta) implementation for torch.compile, a CPU implementation (the
reference math of :mod:`macopt.kernels.reference`), and a CUDA implementation (Triton).
Setting ``MACOPT_CPU_KERNELS=triton`` (with ``TRITON_INTERPRET=1`` set before triton is
imported) runs the Triton kernels on CPU tensors through Triton's interpreter: that is how CI
tests the kernels without a GPU.
"""

from __future__ import annotations

import os

import torch

from macopt.kernels import reference
from macopt.validation import check_decode_inputs, check_states

Tensor = torch.Tensor


def _use_triton(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return os.environ.get("MACOPT_CPU_KERNELS", "reference") == "triton"


@torch.library.custom_op("macopt::decode_attention_state", mutates_args=())
def decode_attention_state(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    starts: Tensor,
    ends: Tensor,
    key_mask: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """State ``(o fp32 [B,Hq,D], lse fp32 [B,Hq])`` of one decode query per row over keys
    ``[starts[b], ends[b])`` of ``k/v[B,Hkv,N,D]`` (and ``key_mask[b]`` when given)."""
    check_decode_inputs(q, k, v, starts, ends, key_mask, scale)
    if _use_triton(q.device):
        from macopt.kernels import decode

        return decode.decode_attention_state(q, k, v, starts, ends, key_mask, scale)
    return reference.attention_state(q, k, v, scale, starts, ends, key_mask)


@decode_attention_state.register_fake
def _(q, k, v, starts, ends, key_mask, scale):
    check_decode_inputs(q, k, v, starts, ends, key_mask)
    o = q.new_empty(q.shape, dtype=torch.float32)
    lse = q.new_empty(q.shape[:2], dtype=torch.float32)
    return o, lse


@torch.library.custom_op("macopt::decode_attention", mutates_args=())
def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    starts: Tensor,
    ends: Tensor,
    key_mask: Tensor | None,
    scale: float,
) -> Tensor:
    """Exact decode attention ``o[B,Hq,D]`` in ``q``'s dtype; a row with no key gives zeros."""
    check_decode_inputs(q, k, v, starts, ends, key_mask, scale)
    if _use_triton(q.device):
        from macopt.kernels import decode

        return decode.decode_attention(q, k, v, starts, ends, key_mask, scale)
    return reference.attention(q, k, v, scale, starts, ends, key_mask)


@decode_attention.register_fake
def _(q, k, v, starts, ends, key_mask, scale):
    check_decode_inputs(q, k, v, starts, ends, key_mask)
    return torch.empty_like(q)


@torch.library.custom_op("macopt::decode_attention_or", mutates_args=())
def decode_attention_or(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    starts: Tensor,
    ends: Tensor,
    key_mask: Tensor | None,
    scale: float,
    otherwise: Tensor,
) -> Tensor:
    """:func:`decode_attention`, but a query that attends no key takes its row of
    ``otherwise[B,Hq,D]`` (not zeros): a method's output kept where the exact op is given an
    empty range (:mod:`macopt.passes.mask_holes`). One launch on CUDA."""
    check_decode_inputs(q, k, v, starts, ends, key_mask, scale)
    _check_otherwise(q, otherwise)
    if _use_triton(q.device):
        from macopt.kernels import decode

        return decode.decode_attention(q, k, v, starts, ends, key_mask, scale,
                                       otherwise=otherwise)
    o, lse = reference.attention_state(q, k, v, scale, starts, ends, key_mask)
    return torch.where(torch.isneginf(lse)[..., None], otherwise, o.to(q.dtype))


@decode_attention_or.register_fake
def _(q, k, v, starts, ends, key_mask, scale, otherwise):
    check_decode_inputs(q, k, v, starts, ends, key_mask)
    _check_otherwise(q, otherwise)
    return torch.empty_like(q)


def _check_otherwise(q: Tensor, otherwise: Tensor) -> None:
    if otherwise.shape != q.shape or otherwise.dtype != q.dtype:
        raise ValueError(f"otherwise: expected {q.dtype} {tuple(q.shape)} (as q), got "
                         f"{otherwise.dtype} {tuple(otherwise.shape)}")


@torch.library.custom_op("macopt::merge_states", mutates_args=())
def merge_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """State of the union of two disjoint key sets (fp32 states; empty = ``(0, -inf)``)."""
    check_states(o_a, lse_a, o_b, lse_b)
    if _use_triton(o_a.device):
        from macopt.kernels import merge

        return merge.merge_state(o_a, lse_a, o_b, lse_b)
    return reference.merge_state(o_a, lse_a, o_b, lse_b)


@merge_states.register_fake
def _(o_a, lse_a, o_b, lse_b):
    check_states(o_a, lse_a, o_b, lse_b)
    return torch.empty_like(o_a), torch.empty_like(lse_a)


# What the rewrites insert: the exact op, and its form that keeps a method's output for rows
# given no key (passes/mask_holes.py).
DECODE_ATTENTION = torch.ops.macopt.decode_attention.default
DECODE_ATTENTION_OR = torch.ops.macopt.decode_attention_or.default
