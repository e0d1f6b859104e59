"""The "sketch" selector's decode kernels: candidate keys from a 4-bit channel-major key sketch.

Approximate by design. At prefill the prompt's keys are quantised to 4 bits per channel
(symmetric, one scale per (row, KV head, channel)) and stored channel-major, two tokens per
byte: ``codes[B, Hkv, D, ceil(N / 2)]`` uint8 (token ``2j`` in the low nibble of byte ``j``,
``2j + 1`` in the high one), so the keys' values on one channel are a contiguous byte row.
A decode step picks, per KV group, the ``C`` channels where the group's queries are largest
(torch, ``[B, Hkv, D]`` only) and then:

1. :func:`sketch_scores` (one launch, grid rows x token blocks): reads only those ``C`` byte
   rows (``C / (4 D)`` of the bf16 key bytes: 1/16 at ``C = D / 4``), and writes each token's
   group score, the best approximate ``s q.k`` over the group's query heads, as fp16
   (``-inf`` outside the middle ``[mid_start, mid_end)``).
2. :func:`select_candidates` (one launch, one program per row): the ``n_keep`` best fp16
   scores, exactly, by a 16-way bisection on their order-preserving 16-bit image (4 counting
   passes over the row) and an ascending compaction (ties at the threshold: lowest indices).

The caller re-scores the candidates' full keys exactly and keeps the budget
(:func:`macopt.topk_phi_ops.sketch_selection`). No host sync, static shapes: CUDA-graph safe.

>>> scores = sketch_scores(codes, dims, q_scaled, mid_start, mid_end, n_keys)
>>> candidates = select_candidates(scores, n_keep=2 * budget)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

# Every output and workspace buffer comes from here (tests may swap in a poisoning allocator).
_new_empty = torch.empty

_BLOCK_N = 512
_BLOCK_S = 1024
_WAYS = 16  # thresholds tested per counting pass (4 bits of the 16-bit keys per pass)


@triton.jit
def _sketch_scores_kernel(
    codes_ptr, dims_ptr, q_ptr, mid_start_ptr, mid_end_ptr, out_ptr,
    n_kv_heads, n_keys, head_dim, n_packed, group, n_channels,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (row x KV head, block of BLOCK_N tokens): C byte rows of BLOCK_N / 2
    # bytes each, contiguous. A byte is loaded by the two lanes of its tokens (one sector).
    pid = tl.program_id(0).to(tl.int64)
    batch = pid // n_kv_heads
    tokens = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    token_ok = tokens < n_keys
    heads = tl.arange(0, BLOCK_G)
    head_ok = heads < group
    shift = (tokens & 1) * 4
    acc = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
    code_rows = codes_ptr + pid * head_dim * n_packed
    for c in range(n_channels):
        dim = tl.load(dims_ptr + pid * n_channels + c).to(tl.int64)
        qc = tl.load(q_ptr + (pid * group + heads) * n_channels + c, mask=head_ok, other=0.0)
        byte = tl.load(code_rows + dim * n_packed + tokens // 2, mask=token_ok, other=8)
        level = ((byte.to(tl.int32) >> shift) & 15) - 8
        acc += qc[:, None] * level.to(tl.float32)[None, :]
    acc = tl.where(head_ok[:, None], acc, float("-inf"))
    best = tl.max(acc, axis=0)
    lo = tl.load(mid_start_ptr + batch)
    hi = tl.load(mid_end_ptr + batch)
    inside = (tokens >= lo) & (tokens < hi)
    best = tl.where(inside, best, float("-inf"))
    tl.store(out_ptr + pid * n_keys + tokens, best.to(tl.float16), mask=token_ok)


def sketch_scores(codes: Tensor, dims: Tensor, q_scaled: Tensor, mid_start: Tensor,
                  mid_end: Tensor, n_keys: int) -> Tensor:
    """Group scores ``[B, Hkv, n_keys]`` fp16 of every token from the sketch (see the module).

    ``codes[B, Hkv, D, P]`` uint8 (``2 P >= n_keys``), ``dims[B, Hkv, C]`` int32 (the chosen
    channels), ``q_scaled[B, Hkv, g, C]`` fp32 (each query head's value on those channels times
    the channel's dequantisation scale and the softmax scale): the score of token ``n`` for
    head ``h`` is ``sum_c q_scaled[h, c] * (code[dims[c], n] - 8)``; the group score is the
    best head's. Tokens outside ``[mid_start[b], mid_end[b])`` get ``-inf``."""
    batch, n_kv_heads, head_dim, n_packed = codes.shape
    group, n_channels = q_scaled.shape[2], q_scaled.shape[3]
    if codes.dtype != torch.uint8 or 2 * n_packed < n_keys:
        raise ValueError(f"codes: expected uint8 [B, Hkv, D, >= {-(-n_keys // 2)}], got "
                         f"{codes.dtype} {tuple(codes.shape)}")
    if dims.shape != (batch, n_kv_heads, n_channels) or q_scaled.shape[:2] != (batch,
                                                                              n_kv_heads):
        raise ValueError(f"dims {tuple(dims.shape)} / q_scaled {tuple(q_scaled.shape)}: "
                         f"expected [{batch}, {n_kv_heads}, C] and [{batch}, {n_kv_heads}, g, C]")
    out = _new_empty((batch, n_kv_heads, n_keys), dtype=torch.float16, device=codes.device)
    if out.numel() == 0:
        return out
    block_n = min(_BLOCK_N, triton.next_power_of_2(max(n_keys, 16)))
    grid = (batch * n_kv_heads, triton.cdiv(n_keys, block_n))
    _sketch_scores_kernel[grid](
        codes.contiguous(), dims.to(torch.int32).contiguous(), q_scaled.float().contiguous(),
        mid_start, mid_end, out, n_kv_heads, n_keys, head_dim, n_packed, group, n_channels,
        BLOCK_G=triton.next_power_of_2(group), BLOCK_N=block_n, num_warps=4)
    return out


@triton.jit
def _order16(x):
    """int32 ordering like the fp16 ``x`` (-inf lowest; -0.0 just below +0.0)."""
    bits = x.to(tl.int16, bitcast=True).to(tl.int32)
    return tl.where(bits < 0, bits ^ 0x7FFF, bits)


@triton.jit
def _select_candidates_kernel(
    scores_ptr, out_ptr, n_keys, n_keep,
    BLOCK_S: tl.constexpr, WAYS: tl.constexpr,
):
    # One program per row: 4 counting passes of WAYS thresholds each find the n_keep-th best
    # key exactly (16-bit keys: 65536 values, 16 ways a pass), then one compaction pass.
    pid = tl.program_id(0).to(tl.int64)
    row = scores_ptr + pid * n_keys
    out_ptr += pid * n_keep
    offsets = tl.arange(0, BLOCK_S)
    ways = tl.arange(0, WAYS)
    lo = tl.full([], -32768, tl.int32)
    step = tl.full([], 65536 // WAYS, tl.int32)
    n_above = tl.zeros([], tl.int32)  # keys above the current range (none at first)
    for _ in range(4):
        thresholds = lo + ways * step
        counts = tl.zeros([WAYS], tl.int32)
        for start in range(0, n_keys, BLOCK_S):
            idx = start + offsets
            ok = idx < n_keys
            key = _order16(tl.load(row + idx, mask=ok, other=float("-inf")))
            hit = (key[:, None] >= thresholds[None, :]) & ok[:, None]
            counts += tl.sum(hit.to(tl.int32), axis=0)
        # counts fall with the threshold; way 0 (the range's low end) always has n_keep.
        n_ok = tl.sum((counts >= n_keep).to(tl.int32), axis=0)
        best = tl.maximum(n_ok - 1, 0)
        above = tl.sum(tl.where(ways == best + 1, counts, 0), axis=0)
        n_above = tl.where(best + 1 < WAYS, above, n_above)
        lo = lo + best * step
        step = step // WAYS
    threshold = lo

    ties_wanted = n_keep - n_above
    n_taken = tl.zeros([], tl.int32)
    n_ties = tl.zeros([], tl.int32)
    for start in range(0, n_keys, BLOCK_S):
        idx = start + offsets
        ok = idx < n_keys
        key = _order16(tl.load(row + idx, mask=ok, other=float("-inf")))
        tie = ((key == threshold) & ok).to(tl.int32)
        tie_rank = n_ties + tl.cumsum(tie, axis=0) - tie
        chosen = (((key > threshold) & ok) | ((tie != 0) & (tie_rank < ties_wanted)))
        chosen = chosen.to(tl.int32)
        slot = n_taken + tl.cumsum(chosen, axis=0) - 1
        tl.store(out_ptr + slot, idx.to(tl.int32), mask=chosen != 0)
        n_taken += tl.sum(chosen, axis=0)
        n_ties += tl.sum(tie, axis=0)


def select_candidates(scores: Tensor, n_keep: int) -> Tensor:
    """Indices ``[B, H, n_keep]`` int32, ascending, of the ``n_keep`` best fp16 ``scores[B, H,
    N]`` per row (``n_keep <= N``); at a tie on the ``n_keep``-th score the lowest indices win
    (so the set is ``torch.topk``'s whenever the ``n_keep``-th and next scores differ).
    ``-inf`` entries are ranked like any other (lowest). One launch, no host sync."""
    batch, heads, n_keys = scores.shape
    if scores.dtype != torch.float16:
        raise ValueError(f"scores: expected fp16, got {scores.dtype}")
    if not 1 <= n_keep <= n_keys:
        raise ValueError(f"n_keep: expected 1..{n_keys}, got {n_keep}")
    out = _new_empty((batch, heads, n_keep), dtype=torch.int32, device=scores.device)
    if out.numel() == 0:
        return out
    _select_candidates_kernel[(batch * heads,)](
        scores.contiguous(), out, n_keys, n_keep,
        BLOCK_S=min(_BLOCK_S, triton.next_power_of_2(n_keys)), WAYS=_WAYS, num_warps=8)
    return out


def select_candidates_reference(scores: Tensor, n_keep: int) -> Tensor:
    """:func:`select_candidates` in torch: a stable descending sort (ties keep index order),
    the first ``n_keep``, ascending. -0.0 and +0.0 tie here (the kernel puts -0.0 below)."""
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    return order[..., :n_keep].sort(dim=-1).values.to(torch.int32)


__all__ = ["select_candidates", "select_candidates_reference", "sketch_scores"]
