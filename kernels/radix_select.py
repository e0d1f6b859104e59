"""Exact Top-K of int32 rank keys by radix select over all SMs: the exact selector's last step.

``radix_topk(ranks[R, N], n_keep)``: per row, the ``n_keep`` largest keys' indices, ascending,
ties to the lower index. The keys are ordered like fp32 values
(:func:`macopt.kernels.sketch_select._order32`). Nine launches, no host sync, static shapes:

1. four passes, one per byte of the key (high byte first), each two launches:
   ``_digit_histogram_kernel`` (grid rows x chunks of ``CHUNK`` keys: every SM) counts, among
   the keys whose higher bytes equal the row's prefix so far, each value of this byte, and the
   keys whose higher bytes are above the prefix; ``_pick_digit_kernel`` (one program per row)
   sums the chunks' counts and fixes this byte of the threshold, the ``n_keep``-th largest key.
2. the last pick also gives each chunk its first output slot and the ties before it, and
   ``_compact_kernel`` (rows x chunks) writes the keys above the threshold and the first ties.

Why not one program per row (as ``sketch_select.rerank_select`` ranks a few thousand
candidates): for every key of a row, at batch 1 that is 8 programs walking 128K keys 9 times,
0.57 ms on an H100 against 0.18 ms for the whole exact decode (BENCHMARKS.md 13).

>>> chosen = radix_topk(ranks, n_keep, counts=None)     # [R, n_keep] int32
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from macopt.kernels.sketch_select import pick_digit, summed_histogram, unsigned_key

Tensor = torch.Tensor

# Every output and workspace buffer comes from here (tests may swap in a poisoning allocator).
_new_empty = torch.empty

CHUNK = 4096  # keys per program of the counting and compaction launches (32 a row at 128K)
_BLOCK = 1024  # keys a program handles at once
_BINS = 256  # one byte of the key per pass


@triton.jit
def _digit_histogram_kernel(
    keys_ptr, state_ptr, hist_ptr, greater_ptr, n_keys, n_chunks, SHIFT: tl.constexpr,
    FIRST: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, BINS: tl.constexpr,
):
    # One program per (row, chunk): among the chunk's keys whose bytes above SHIFT + 8 equal
    # the row's prefix, the count of each value of the byte at SHIFT; and the count of keys
    # whose higher bytes are above the prefix.
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    if FIRST:  # no byte fixed yet (and the state not written): every key matches
        prefix_hi = tl.zeros([], tl.int64)
    else:
        prefix_hi = tl.load(state_ptr + row * 4) >> (SHIFT + 8)
    bins = tl.arange(0, BINS)
    hist = tl.zeros([BINS], tl.int32)
    greater = tl.zeros([], tl.int32)
    for start in range(0, CHUNK, BLOCK):
        idx = chunk * CHUNK + start + tl.arange(0, BLOCK)
        ok = idx < n_keys
        u = unsigned_key(tl.load(keys_ptr + row * n_keys + idx, mask=ok, other=0))
        hi = u >> (SHIFT + 8)
        match = ok & (hi == prefix_hi)
        digit = tl.where(match, (u >> SHIFT) & (BINS - 1), 0).to(tl.int32)
        # keys that do not match were counted in bin 0: take them back out
        hist += tl.histogram(digit, BINS)
        hist -= tl.where(bins == 0, tl.sum((~match).to(tl.int32), axis=0), 0)
        greater += tl.sum((ok & (hi > prefix_hi)).to(tl.int32), axis=0)
    tl.store(hist_ptr + (row * n_chunks + chunk) * BINS + bins, hist)
    tl.store(greater_ptr + row * n_chunks + chunk, greater)


@triton.jit
def _pick_digit_kernel(
    hist_ptr, greater_ptr, state_ptr, counts_ptr, offsets_ptr, out_ptr, n_chunks, n_keep,
    SHIFT: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, HAS_COUNTS: tl.constexpr,
    BLOCK_CH: tl.constexpr, BINS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # One program per row. State: [prefix (the threshold's bytes fixed so far), wanted (how
    # many of the keys matching the prefix are still to take), the row's count, keys above].
    row = tl.program_id(0).to(tl.int64)
    state = state_ptr + row * 4
    if FIRST:
        count = tl.zeros([], tl.int32) + n_keep
        if HAS_COUNTS:
            count = tl.minimum(tl.maximum(tl.load(counts_ptr + row), 0), n_keep)
        prefix = tl.zeros([], tl.int64)
        wanted = count.to(tl.int64)
        n_above = tl.zeros([], tl.int64)
    else:
        prefix = tl.load(state)
        wanted = tl.load(state + 1)
        count = tl.load(state + 2).to(tl.int32)
        n_above = tl.load(state + 3)
    bins = tl.arange(0, BINS)
    chunks = tl.arange(0, BLOCK_CH)
    total = summed_histogram(hist_ptr, row, n_chunks, BLOCK_CH, BINS)
    digit, n_greater = pick_digit(total, wanted, BINS)  # the wanted-th largest key's byte
    n_greater = n_greater.to(tl.int64)
    prefix += digit.to(tl.int64) << SHIFT
    wanted -= n_greater
    n_above += n_greater
    tl.store(state, prefix)
    tl.store(state + 1, wanted)
    tl.store(state + 2, count.to(tl.int64))
    tl.store(state + 3, n_above)
    if LAST:
        # Each chunk's first output slot and the threshold's ties before it, in index order:
        # a chunk takes its keys above the threshold and its ties while ties are wanted.
        taken_base = tl.zeros([], tl.int32)
        ties_base = tl.zeros([], tl.int32)
        for start in range(0, n_chunks, BLOCK_CH):
            ch = start + chunks
            ch_ok = ch < n_chunks
            tile = tl.load(hist_ptr + (row * n_chunks + ch[:, None]) * BINS + bins[None, :],
                           mask=ch_ok[:, None], other=0)
            above = tl.load(greater_ptr + row * n_chunks + ch, mask=ch_ok, other=0)
            above += tl.sum(tl.where(bins[None, :] > digit, tile, 0), axis=1)
            ties = tl.sum(tl.where(bins[None, :] == digit, tile, 0), axis=1)
            ties_before = ties_base + tl.cumsum(ties, axis=0) - ties
            taken_ties = tl.minimum(tl.maximum(wanted.to(tl.int32) - ties_before, 0), ties)
            taken = above + taken_ties
            base = offsets_ptr + (row * n_chunks + ch) * 2
            tl.store(base, taken_base + tl.cumsum(taken, axis=0) - taken, mask=ch_ok)
            tl.store(base + 1, ties_before, mask=ch_ok)
            taken_base += tl.sum(taken, axis=0)
            ties_base += tl.sum(ties, axis=0)
        for start in range(0, n_keep, BLOCK_S):  # slots past the row's count: -1
            idx = start + tl.arange(0, BLOCK_S)
            tl.store(out_ptr + row * n_keep + idx, tl.full([BLOCK_S], -1, tl.int32),
                     mask=(idx < n_keep) & (idx >= count))


@triton.jit
def _compact_kernel(
    keys_ptr, state_ptr, offsets_ptr, out_ptr, n_keys, n_chunks, n_keep,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per (row, chunk): its keys above the threshold and its ties still wanted,
    # at their slots in index order.
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    threshold = tl.load(state_ptr + row * 4)
    wanted = tl.load(state_ptr + row * 4 + 1).to(tl.int32)
    slot_base = tl.load(offsets_ptr + (row * n_chunks + chunk) * 2)
    ties_base = tl.load(offsets_ptr + (row * n_chunks + chunk) * 2 + 1)
    for start in range(0, CHUNK, BLOCK):
        idx = chunk * CHUNK + start + tl.arange(0, BLOCK)
        ok = idx < n_keys
        u = unsigned_key(tl.load(keys_ptr + row * n_keys + idx, mask=ok, other=0))
        tie = (ok & (u == threshold)).to(tl.int32)
        tie_rank = ties_base + tl.cumsum(tie, axis=0) - tie
        chosen = ((ok & (u > threshold)) | ((tie != 0) & (tie_rank < wanted))).to(tl.int32)
        slot = slot_base + tl.cumsum(chosen, axis=0) - 1
        tl.store(out_ptr + row * n_keep + slot, idx.to(tl.int32), mask=chosen != 0)
        slot_base += tl.sum(chosen, axis=0)
        ties_base += tl.sum(tie, axis=0)


def radix_topk(ranks: Tensor, n_keep: int, counts: Tensor | None = None) -> Tensor:
    """Per row of ``ranks[..., N]`` int32 (ordered like fp32 values), the indices of its
    ``n_keep`` largest keys, ascending, ties to the lower index: ``[..., n_keep]`` int32.
    ``counts[...]`` int32 (optional): a row keeps only its ``counts`` largest (clamped to
    ``0..n_keep``), its other slots -1. Exact; nine launches, no host sync."""
    *lead, n_keys = ranks.shape
    if ranks.dtype != torch.int32:
        raise ValueError(f"ranks: expected int32, got {ranks.dtype}")
    if not 1 <= n_keep <= n_keys:
        raise ValueError(f"n_keep: expected 1..{n_keys}, got {n_keep}")
    if counts is not None and tuple(counts.shape) != tuple(lead):
        raise ValueError(f"counts: expected shape {tuple(lead)}, got {tuple(counts.shape)}")
    device = ranks.device
    out = _new_empty((*lead, n_keep), dtype=torch.int32, device=device)
    rows = out.numel() // n_keep
    if rows == 0:
        return out
    keys = ranks.contiguous()
    chunk = min(CHUNK, triton.next_power_of_2(n_keys))
    block = min(_BLOCK, chunk)
    n_chunks = triton.cdiv(n_keys, chunk)
    hist = _new_empty((rows, n_chunks, _BINS), dtype=torch.int32, device=device)
    greater = _new_empty((rows, n_chunks), dtype=torch.int32, device=device)
    state = _new_empty((rows, 4), dtype=torch.int64, device=device)
    offsets = _new_empty((rows, n_chunks, 2), dtype=torch.int32, device=device)
    counts = None if counts is None else counts.to(torch.int32).contiguous()
    for shift in (24, 16, 8, 0):
        _digit_histogram_kernel[(rows, n_chunks)](
            keys, state, hist, greater, n_keys, n_chunks, SHIFT=shift, FIRST=shift == 24,
            CHUNK=chunk, BLOCK=block, BINS=_BINS, num_warps=4)
        _pick_digit_kernel[(rows,)](
            hist, greater, state, counts, offsets, out, n_chunks, n_keep, SHIFT=shift,
            FIRST=shift == 24, LAST=shift == 0, HAS_COUNTS=counts is not None,
            BLOCK_CH=max(16, min(32, triton.next_power_of_2(n_chunks))), BINS=_BINS,
            BLOCK_S=min(1024, triton.next_power_of_2(n_keep)), num_warps=4)
    _compact_kernel[(rows, n_chunks)](keys, state, offsets, out, n_keys, n_chunks, n_keep,
                                      CHUNK=chunk, BLOCK=block, num_warps=4)
    return out
