"""Triton kernels that merge partial attention states (docs: docs/ALGORITHMS.md, section 0).

A state is ``(o[..., D], lse[...])`` in fp32 with ``lse`` a natural log; the empty state is
``(0, -inf)``. Merging never produces NaN: an all-empty merge gives the empty state.

>>> o, lse = merge_state(o_a, lse_a, o_b, lse_b)          # two states, any leading shape
>>> o, lse = merge_states(o_parts, lse_parts)               # o_parts[..., S, D] -> o[..., D]
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

# Every output buffer comes from here; tests swap in a NaN-filling allocator to prove that the
# kernels write every element.
_new_empty = torch.empty


@triton.jit
def _merge_state_kernel(
    o_a_ptr, lse_a_ptr, o_b_ptr, lse_b_ptr, out_o_ptr, out_lse_ptr,
    n_rows, head_dim,
    stride_oa_r, stride_oa_d, stride_la_r,
    stride_ob_r, stride_ob_d, stride_lb_r,
    stride_out_r, stride_out_d, stride_out_lse_r,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program merges BLOCK_R rows of two [rows, D] states elementwise; the whole padded head
    # dim is one tile row, so each state element is read once and written once.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    tile_ok = row_ok[:, None] & (dims < head_dim)[None, :]
    rows = rows.to(tl.int64)

    lse_a = tl.load(lse_a_ptr + rows * stride_la_r, mask=row_ok, other=float("-inf"))
    lse_b = tl.load(lse_b_ptr + rows * stride_lb_r, mask=row_ok, other=float("-inf"))
    o_a = tl.load(o_a_ptr + rows[:, None] * stride_oa_r + dims[None, :] * stride_oa_d,
                  mask=tile_ok, other=0.0)
    o_b = tl.load(o_b_ptr + rows[:, None] * stride_ob_r + dims[None, :] * stride_ob_d,
                  mask=tile_ok, other=0.0)

    lse_max = tl.maximum(lse_a, lse_b)
    shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # both empty: avoid -inf - -inf
    w_a = tl.exp(lse_a - shift)
    w_b = tl.exp(lse_b - shift)
    total = w_a + w_b
    safe_total = tl.where(total > 0, total, 1.0)
    lse = tl.where(total > 0, shift + tl.log(safe_total), float("-inf"))
    o = (w_a[:, None] * o_a + w_b[:, None] * o_b) / safe_total[:, None]

    tl.store(out_o_ptr + rows[:, None] * stride_out_r + dims[None, :] * stride_out_d, o,
             mask=tile_ok)
    tl.store(out_lse_ptr + rows * stride_out_lse_r, lse, mask=row_ok)


@triton.jit
def merge_step(running_max, total, acc, lse, o):
    """Fold a ``[S]`` stack of states ``(o[S, D], lse[S])`` into a running merge: ``acc[D]``
    and ``total`` are sums weighted by ``exp(lse - running_max)`` (online softmax over states)."""
    new_max = tl.maximum(running_max, tl.max(lse, axis=0))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # all empty so far
    rescale = tl.exp(running_max - shift)
    weights = tl.exp(lse - shift)
    total = total * rescale + tl.sum(weights, axis=0)
    acc = acc * rescale + tl.sum(weights[:, None] * o, axis=0)
    return new_max, total, acc


@triton.jit
def merge_finish(running_max, total, acc):
    """The state ``(o[D], lse)`` of a running merge; nothing but empty states gives (0, -inf)."""
    shift = tl.where(running_max == float("-inf"), 0.0, running_max)
    safe_total = tl.where(total > 0, total, 1.0)
    lse = tl.where(total > 0, shift + tl.log(safe_total), float("-inf"))
    return acc / safe_total, lse


@triton.jit
def merge_row_states(
    o_ptr, lse_ptr, n_states, stride_o_s, stride_o_d, stride_l_s, dims, dim_ok,
    BLOCK_S: tl.constexpr,
):
    """Merge ``n_states`` states ``(o[s, D], lse[s])`` into fp32 ``(o[D], lse)``.

    Reads BLOCK_S states per step as one ``[BLOCK_S, D]`` tile, so any count fits in bounded
    registers. The loads bypass L1 (``.cg``): the fused split kernels read states that other
    programs of the same launch just wrote.
    """
    running_max = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), axis=0)
    total = tl.sum(tl.zeros([BLOCK_S], tl.float32), axis=0)
    acc = tl.zeros(dims.shape, tl.float32)
    for first in range(0, n_states, BLOCK_S):
        states = first + tl.arange(0, BLOCK_S)
        state_ok = states < n_states
        lse = tl.load(lse_ptr + states * stride_l_s, mask=state_ok, other=float("-inf"),
                      cache_modifier=".cg")
        o = tl.load(o_ptr + states[:, None] * stride_o_s + dims[None, :] * stride_o_d,
                    mask=state_ok[:, None] & dim_ok[None, :], other=0.0, cache_modifier=".cg")
        running_max, total, acc = merge_step(running_max, total, acc, lse, o)
    return merge_finish(running_max, total, acc)


@triton.jit
def _merge_states_kernel(
    o_ptr, lse_ptr, out_o_ptr, out_lse_ptr,
    n_states, head_dim,
    stride_o_r, stride_o_s, stride_o_d,
    stride_l_r, stride_l_s,
    stride_out_r, stride_out_d, stride_out_lse_r,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per row merges its S states, BLOCK_S states per step as one [BLOCK_S, D] tile.
    row = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    o, lse = merge_row_states(o_ptr + row * stride_o_r, lse_ptr + row * stride_l_r, n_states,
                              stride_o_s, stride_o_d, stride_l_s, dims, dim_ok, BLOCK_S)
    tl.store(out_o_ptr + row * stride_out_r + dims * stride_out_d,
             o.to(out_o_ptr.dtype.element_ty), mask=dim_ok)
    tl.store(out_lse_ptr + row * stride_out_lse_r, lse)


def merge_state(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """State of the union of two disjoint key sets, elementwise over any leading shape.

    ``o_a, o_b``: fp32 ``[..., D]``; ``lse_a, lse_b``: fp32 ``[...]`` (natural log).
    Returns fp32 ``(o[..., D], lse[...])``.

    >>> o, lse = merge_state(o_a, lse_a, o_b, lse_b)
    """
    head_dim = o_a.shape[-1]
    o_a2, o_b2 = o_a.reshape(-1, head_dim), o_b.reshape(-1, head_dim)
    lse_a1, lse_b1 = lse_a.reshape(-1), lse_b.reshape(-1)
    n_rows = lse_a1.shape[0]
    out_o = _new_empty(o_a.shape, dtype=torch.float32, device=o_a.device)
    out_lse = _new_empty(lse_a.shape, dtype=torch.float32, device=o_a.device)
    if n_rows == 0 or head_dim == 0:
        return out_o, out_lse
    out_o2, out_lse1 = out_o.view(-1, head_dim), out_lse.view(-1)
    block_d = triton.next_power_of_2(head_dim)
    block_r = max(1, min(triton.next_power_of_2(n_rows), 4096 // block_d))
    _merge_state_kernel[(triton.cdiv(n_rows, block_r),)](
        o_a2, lse_a1, o_b2, lse_b1, out_o2, out_lse1,
        n_rows, head_dim,
        o_a2.stride(0), o_a2.stride(1), lse_a1.stride(0),
        o_b2.stride(0), o_b2.stride(1), lse_b1.stride(0),
        out_o2.stride(0), out_o2.stride(1), out_lse1.stride(0),
        BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return out_o, out_lse


def merge_states(
    o: Tensor, lse: Tensor, out_dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Merge the ``S`` states stacked on the second-to-last dim of ``o``.

    ``o``: fp32 ``[..., S, D]``; ``lse``: fp32 ``[..., S]``. Returns ``(o[..., D]`` in
    ``out_dtype``, ``lse[...]`` fp32). ``S = 0`` gives the empty state.

    >>> o, lse = merge_states(torch.randn(2, 4, 3, 64), torch.randn(2, 4, 3))
    """
    out_o = _new_empty(o.shape[:-2] + o.shape[-1:], dtype=out_dtype, device=o.device)
    out_lse = _new_empty(lse.shape[:-1], dtype=torch.float32, device=o.device)
    merge_states_into(o, lse, out_o, out_lse)
    return out_o, out_lse


def merge_states_into(o: Tensor, lse: Tensor, out_o: Tensor, out_lse: Tensor) -> None:
    """:func:`merge_states` writing into preallocated ``out_o[..., D]`` and ``out_lse[...]``."""
    n_states, head_dim = o.shape[-2], o.shape[-1]
    n_rows = math.prod(lse.shape[:-1])
    o3 = o.reshape(n_rows, n_states, head_dim)
    lse2 = lse.reshape(n_rows, n_states)
    out_o2, out_lse1 = out_o.view(n_rows, head_dim), out_lse.view(n_rows)
    if n_rows == 0 or head_dim == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    # A [BLOCK_S, BLOCK_D] fp32 tile of at most 8K elements: <= 64 registers a thread at 4 warps.
    block_s = max(1, min(triton.next_power_of_2(max(n_states, 1)), 8192 // block_d))
    _merge_states_kernel[(n_rows,)](
        o3, lse2, out_o2, out_lse1,
        n_states, head_dim,
        o3.stride(0), o3.stride(1), o3.stride(2),
        lse2.stride(0), lse2.stride(1),
        out_o2.stride(0), out_o2.stride(1), out_lse1.stride(0),
        BLOCK_S=block_s, BLOCK_D=block_d,
    )
