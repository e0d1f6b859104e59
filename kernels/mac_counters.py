"""Per-head MAC statistics accumulated on the device: one tiny launch per decode step.

``counters[COUNTER_ROWS, Hq]`` int64 (rows named by :data:`COUNTERS`); a step adds, per query
head, its hits, the keys it read, the keys full attention would have read (``t - s0 + 1`` per
row), the rows it decoded and 1 step. One program per head sums over the batch rows, so no two
programs write the same counter and no atomics are needed. The prefill ops count the rest
(:func:`macopt.mac_ops.count_prefill_`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

# _count_kernel writes the first five rows by their index: new rows go at the end
COUNTERS = ("hits", "keys_read", "keys_full", "queries", "steps", "prefills",
            "short_continued_chunks")
COUNTER_ROWS = len(COUNTERS)


@triton.jit
def _count_kernel(
    counters_ptr, hit_ptr, keys_ptr, t_ptr, s0_ptr, batch, stride_cr, stride_ch,
    stride_b, stride_h, BLOCK_B: tl.constexpr,
):
    head = tl.program_id(0)
    hits = tl.zeros([BLOCK_B], tl.int64)
    keys = tl.zeros([BLOCK_B], tl.int64)
    full = tl.zeros([BLOCK_B], tl.int64)
    for first in range(0, batch, BLOCK_B):
        rows = first + tl.arange(0, BLOCK_B)
        ok = rows < batch
        hits += tl.load(hit_ptr + rows * stride_b + head * stride_h, mask=ok, other=0).to(tl.int64)
        keys += tl.load(keys_ptr + rows * stride_b + head * stride_h, mask=ok, other=0).to(tl.int64)
        t = tl.load(t_ptr + rows, mask=ok, other=0).to(tl.int64)
        s0 = tl.load(s0_ptr + rows, mask=ok, other=1).to(tl.int64)
        full += t - s0 + 1
    _add(counters_ptr + head * stride_ch, tl.sum(hits, axis=0))
    _add(counters_ptr + stride_cr + head * stride_ch, tl.sum(keys, axis=0))
    _add(counters_ptr + 2 * stride_cr + head * stride_ch, tl.sum(full, axis=0))
    _add(counters_ptr + 3 * stride_cr + head * stride_ch, batch)
    _add(counters_ptr + 4 * stride_cr + head * stride_ch, 1)


@triton.jit
def _add(ptr, value):
    tl.store(ptr, tl.load(ptr) + value)


def count_decode_(counters: Tensor, hit: Tensor, keys_read: Tensor, positions: Tensor,
                  key_starts: Tensor) -> None:
    """Add one decode step's ``hit[B, Hq]`` and ``keys_read[B, Hq]`` to ``counters`` in place."""
    batch, q_heads = hit.shape
    hit8 = hit.view(torch.uint8)
    _count_kernel[(q_heads,)](
        counters, hit8, keys_read, positions.contiguous(), key_starts.contiguous(), batch,
        *counters.stride(), *hit8.stride(), BLOCK_B=min(64, triton.next_power_of_2(batch)),
    )


def count_decode_reference_(counters: Tensor, hit: Tensor, keys_read: Tensor,
                            positions: Tensor, key_starts: Tensor) -> None:
    """The same update in PyTorch (CPU)."""
    batch = hit.shape[0]
    full = (positions.long() - key_starts.long() + 1).sum()
    counters[0] += hit.long().sum(0)
    counters[1] += keys_read.long().sum(0)
    counters[2] += full
    counters[3] += batch
    counters[4] += 1


@triton.jit
def _add_prefix_keys_kernel(
    counters_ptr, keys_ptr, hit_ptr, sel_ptr, t_ptr, s0_ptr, mid_start_ptr, mid_end_ptr,
    q_heads, group, n_selected, offset, stride_cr, stride_ch, stride_b, stride_h,
    stride_sb, stride_sh, stride_sk, BLOCK_K: tl.constexpr,
):
    # One program per (row, query head): the keys its Top-K + phi prefix state attended, if
    # it missed (sinks, retrieved middle keys, [mid_end, E(t))), added to its keys_read and,
    # atomically (rows of one head share it), to the head's counter.
    pid = tl.program_id(0)
    batch = (pid // q_heads).to(tl.int64)
    head = (pid % q_heads).to(tl.int64)
    t = tl.load(t_ptr + batch).to(tl.int64)
    s0 = tl.load(s0_ptr + batch).to(tl.int64)
    lo = tl.load(mid_start_ptr + batch).to(tl.int64)
    hi = tl.load(mid_end_ptr + batch).to(tl.int64)
    end = tl.maximum(t + 1 - offset, s0)  # E(t)
    hit = tl.load(hit_ptr + batch * stride_b + head * stride_h) != 0
    n_keys = tl.maximum(tl.minimum(lo, end) - s0, 0) + tl.maximum(end - tl.maximum(hi, s0), 0)
    sel_base = sel_ptr + batch * stride_sb + (head // group) * stride_sh
    inside = tl.zeros([BLOCK_K], tl.int64)
    last = tl.where(hit, 0, n_selected)  # a hit reads no selection
    for first in range(0, last, BLOCK_K):
        slots = first + tl.arange(0, BLOCK_K)
        sel = tl.load(sel_base + slots * stride_sk, mask=slots < last, other=-1).to(tl.int64)
        inside += ((sel >= lo) & (sel < hi) & (sel < end)).to(tl.int64)
    added = tl.where(hit, 0, n_keys + tl.sum(inside, axis=0))
    keys = keys_ptr + batch * stride_b + head * stride_h
    tl.store(keys, tl.load(keys) + added.to(tl.int32))
    tl.atomic_add(counters_ptr + stride_cr + head * stride_ch, added, sem="relaxed")


def add_prefix_keys_(counters: Tensor | None, keys_read: Tensor, hit: Tensor, selected: Tensor,
                     positions: Tensor, key_starts: Tensor, mid_start: Tensor, mid_end: Tensor,
                     offset: int) -> None:
    """MAC + Top-K + phi: add to ``keys_read[B, Hq]`` (int32) and, when given, to the
    ``keys_read`` row of ``counters`` the keys of ``[s0, E(t))`` a missing head's Top-K + phi
    state attended exactly: the sinks ``[s0, mid_start)``, the retrieved middle keys
    (``selected[B, Hkv, K']``, entries outside ``[mid_start, min(mid_end, E(t)))`` ignored)
    and ``[mid_end, E(t))``. One launch, no host sync."""
    batch, q_heads = hit.shape
    hit8 = hit.view(torch.uint8)
    if keys_read.stride() != hit8.stride():
        raise ValueError("keys_read, hit: expected one [B, Hq] layout")
    target = counters if counters is not None else torch.zeros(
        COUNTER_ROWS, q_heads, dtype=torch.int64, device=hit.device)
    n_selected = selected.shape[2]
    _add_prefix_keys_kernel[(batch * q_heads,)](
        target, keys_read, hit8, selected, positions.contiguous(), key_starts.contiguous(),
        mid_start, mid_end, q_heads, q_heads // selected.shape[1], n_selected, offset,
        *target.stride(), *hit8.stride(), *selected.stride(),
        BLOCK_K=min(1024, triton.next_power_of_2(max(n_selected, 16))),
    )


def prefix_keys_reference(hit: Tensor, selected: Tensor, positions: Tensor, key_starts: Tensor,
                          mid_start: Tensor, mid_end: Tensor, offset: int) -> Tensor:
    """The keys :func:`add_prefix_keys_` adds per (row, query head) ``[B, Hq]`` int32, in
    PyTorch (CPU)."""
    s0 = key_starts.long()[:, None]
    end = torch.maximum(positions.long()[:, None] + 1 - offset, s0)
    lo, hi = mid_start.long()[:, None], mid_end.long()[:, None]
    n_keys = (torch.minimum(lo, end) - s0).clamp(min=0) + (end - torch.maximum(hi, s0)).clamp(min=0)
    sel = selected.long()
    inside = (sel >= lo[..., None]) & (sel < hi[..., None]) & (sel < end[..., None])
    per_kv_head = n_keys + inside.sum(-1)
    per_head = per_kv_head.repeat_interleave(hit.shape[1] // selected.shape[1], dim=1)
    return torch.where(hit, 0, per_head).to(torch.int32)
