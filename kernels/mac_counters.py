"""Per-head MAC statistics accumulated on the device: one tiny launch per decode step.

``counters[COUNTER_ROWS, Hq]`` int64 (rows named by :data:`COUNTERS`); a step adds, per query
head, its hits, the keys it read, the keys full attention would have read (``t - s0 + 1`` per
row), the rows it decoded and 1 step. One program per head sums over the batch rows, so no two
programs write the same counter and no atomics are needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

COUNTERS = ("hits", "keys_read", "keys_full", "queries", "steps", "prefills")
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
