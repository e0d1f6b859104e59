"""The "exact" selector's decode kernels: Top-K by exact scores, every key read once.

:func:`macopt.topk_phi_select.exact_selection` (torch) ranks each middle key by its best
log-probability over the KV group's query heads, ``max_h (s q_h.k - lse_h)`` with ``lse_h``
over the middle keys, and keeps the ``K`` best. In torch that is a matmul, an fp32 copy of the
scores, a masked fill, a logsumexp, a max and ``torch.topk`` over the whole context: several
passes over ``B x Hq x N`` scores after the key read (0.71x exact decode's speed at 128K,
batch 16, on the H100; BENCHMARKS.md 10). Here it is eleven launches, no host sync:

1. ``_scores_kernel`` (grid rows x chunks of ``CHUNK`` tokens): reads each key row once, for
   the whole group, writes its fp32 scores per head and the chunk's (max, sum of exp) per head.
2. ``_rank_kernel`` (same grid): every head's ``lse`` from the chunks' partials, then each
   token's rank ``max_h (s_h - lse_h)`` as an int32 key ordered like the fp32 value.
3. :func:`macopt.kernels.radix_select.radix_topk`: the exact threshold by radix select, one
   byte of the key per pass over all SMs (nine launches): the ``K`` best in index order, ties
   to the lower index, per-group counts honoured.

The key read is half of exact decode's bytes (no values), so the selector can approach 2x
over exact decode, not more; the page and sketch selectors read a sixteenth of the keys.
Exact by definition of the selector (the scores are fp32 dot products of the cache's keys; the
torch path multiplies in the cache dtype with fp32 accumulation, so near-ties may order
differently between the two).

>>> selected = exact_topk(q, k, scale, mid_start, mid_end, top_k)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from macopt.kernels.launch import interpreting
from macopt.kernels.radix_select import radix_topk
from macopt.kernels.sketch_select import _order32

Tensor = torch.Tensor

# Every output and workspace buffer comes from here (tests may swap in a poisoning allocator).
_new_empty = torch.empty

_BLOCK_N = 64  # keys per tile
_CHUNK = 1024  # tokens per program: the partials per head are N / CHUNK


@triton.jit
def _scores_kernel(
    q_ptr, k_ptr, mid_start_ptr, mid_end_ptr, scores_ptr, part_max_ptr, part_sum_ptr,
    scale, n_kv_heads, n_keys, group, head_dim, n_chunks,
    stride_kb, stride_kh, stride_kn, stride_kd,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (row x KV head, chunk): the group's heads are the rows of one [BLOCK_G, D]
    # query tile, so each [BLOCK_N, D] key tile is read once for all of them.
    pid = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    batch = pid // n_kv_heads
    kv_head = pid % n_kv_heads
    heads = tl.arange(0, BLOCK_G)
    head_ok = heads < group
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = tl.load(q_ptr + (pid * group + heads[:, None]) * head_dim + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    lo = tl.load(mid_start_ptr + batch)
    hi = tl.minimum(tl.load(mid_end_ptr + batch), n_keys)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    out = scores_ptr + (pid * group + heads[:, None]) * n_keys
    run_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_G], tl.float32)
    for start in range(0, CHUNK, BLOCK_N):
        keys = chunk * CHUNK + start + tl.arange(0, BLOCK_N)
        key_ok = keys < n_keys
        k = tl.load(k_base + keys.to(tl.int64)[:, None] * stride_kn + dims[None, :] * stride_kd,
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        inside = (keys >= lo) & (keys < hi)
        s = tl.where(inside[None, :], s, float("-inf"))
        tl.store(out + keys[None, :], s, mask=head_ok[:, None] & key_ok[None, :])
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
        run_max = new_max
    part = (pid * group + heads) * n_chunks + chunk
    tl.store(part_max_ptr + part, run_max, mask=head_ok)
    tl.store(part_sum_ptr + part, run_sum, mask=head_ok)


@triton.jit
def _rank_kernel(
    scores_ptr, part_max_ptr, part_sum_ptr, keys_ptr, n_keys, group, n_chunks,
    CHUNK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # One program per (row x KV head, chunk): each head's lse from all chunks' partials (0 when
    # the head has no middle key, as the torch selector), then the chunk's ranks.
    pid = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    heads = tl.arange(0, BLOCK_G)
    head_ok = heads < group
    chunks = tl.arange(0, BLOCK_C)
    lane_max = tl.full([BLOCK_G, BLOCK_C], float("-inf"), tl.float32)
    lane_sum = tl.zeros([BLOCK_G, BLOCK_C], tl.float32)
    for first in range(0, n_chunks, BLOCK_C):
        idx = first + chunks
        ok = head_ok[:, None] & (idx < n_chunks)[None, :]
        offsets = (pid * group + heads[:, None]) * n_chunks + idx[None, :]
        m = tl.load(part_max_ptr + offsets, mask=ok, other=float("-inf"))
        s = tl.load(part_sum_ptr + offsets, mask=ok, other=0.0)
        new_max = tl.maximum(lane_max, m)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = (lane_sum * tl.exp(lane_max - shift)
                    + s * tl.exp(tl.where(m == float("-inf"), shift, m) - shift))
        lane_max = new_max
    top = tl.max(lane_max, axis=1)
    safe = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(lane_sum * tl.exp(lane_max - safe[:, None]), axis=1)
    lse = tl.where(total > 0, safe + tl.log(tl.maximum(total, 1e-30)), 0.0)
    lanes = tl.arange(0, BLOCK_S)
    rows = scores_ptr + (pid * group + heads[:, None]) * n_keys
    for start in range(0, CHUNK, BLOCK_S):
        idx = chunk * CHUNK + start + lanes
        ok = idx < n_keys
        x = tl.load(rows + idx[None, :], mask=head_ok[:, None] & ok[None, :],
                    other=float("-inf"))
        rank = tl.max(x - lse[:, None], axis=0)
        tl.store(keys_ptr + pid * n_keys + idx, _order32(rank), mask=ok)


def exact_topk(q: Tensor, k: Tensor, scale: float, mid_start: Tensor, mid_end: Tensor,
               top_k: int, counts: Tensor | None = None) -> Tensor:
    """``[B, Hkv, top_k]`` int32 token indices, ascending: per KV group the ``top_k`` middle
    keys (``[mid_start[b], mid_end[b])``) of best ``max_h (s q_h.k - lse_h)`` (the ranking of
    :func:`macopt.topk_phi_select.exact_selection`), ties to the lower index. ``q[B, Hq, D]``,
    ``k[B, Hkv, N, D]`` (any strides on ``k``). ``counts[B, Hkv]`` int32 (optional): a group
    keeps only its best ``counts`` tokens, the rest of its row -1. Eleven launches, no host
    sync. A row whose middle is shorter than ``top_k`` also returns tokens outside it (the
    decode kernels ignore those)."""
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    if not 1 <= top_k <= n_keys:
        raise ValueError(f"top_k: expected 1..{n_keys}, got {top_k}")
    device = q.device
    n_chunks = triton.cdiv(n_keys, _CHUNK)
    scores = _new_empty((batch, n_kv_heads, group, n_keys), dtype=torch.float32, device=device)
    part_max = _new_empty((batch, n_kv_heads, group, n_chunks), dtype=torch.float32,
                          device=device)
    part_sum = _new_empty(part_max.shape, dtype=torch.float32, device=device)
    keys = _new_empty((batch, n_kv_heads, n_keys), dtype=torch.int32, device=device)
    if keys.numel() == 0:
        return _new_empty((batch, n_kv_heads, top_k), dtype=torch.int32, device=device)
    block_g = max(16, triton.next_power_of_2(group))
    grid = (batch * n_kv_heads, n_chunks)
    _scores_kernel[grid](
        q.contiguous(), k, mid_start, mid_end, scores, part_max, part_sum, scale, n_kv_heads,
        n_keys, group, head_dim, n_chunks, *k.stride(),
        UPCAST=interpreting(), DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
        CHUNK=_CHUNK, BLOCK_G=block_g, BLOCK_N=_BLOCK_N,
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4)
    _rank_kernel[grid](
        scores, part_max, part_sum, keys, n_keys, group, n_chunks, CHUNK=_CHUNK,
        BLOCK_G=triton.next_power_of_2(group),
        BLOCK_C=min(256, triton.next_power_of_2(n_chunks)),
        BLOCK_S=min(256, max(16, 2048 // triton.next_power_of_2(group))), num_warps=4)
    return radix_topk(keys, top_k, counts)


__all__ = ["exact_topk"]
