"""The "sketch" selector's decode kernels: candidate keys from a 4-bit channel-major key sketch.

Approximate by design. At prefill the prompt's keys are quantised to 4 bits per channel
(symmetric, one scale per (row, KV head, channel)) and stored channel-major, two tokens per
byte: ``codes[B, Hkv, D, ceil(N / 2)]`` uint8 (token ``2j`` in the low nibble of byte ``j``,
``2j + 1`` in the high one), so the keys' values on one channel are a contiguous byte row.
A decode step runs five stages, no host sync, static shapes (CUDA-graph safe):

0. :func:`sketch_query` (one program per row x KV head): the ``C`` channels where the group's
   queries are largest and each head's query there, scaled.
1. :func:`sketch_scores` (one launch, grid rows x token blocks): reads only those ``C`` byte
   rows (``C / (4 D)`` of the bf16 key bytes: 1/16 at ``C = D / 4``), and writes each token's
   group score, the best approximate ``s q.k`` over the group's query heads, as fp16
   (``-inf`` outside the middle ``[mid_start, mid_end)``).
2. :func:`select_candidates` (three launches over (row, chunk of 4096 tokens) programs): the
   ``n_keep`` best scores up to a bin of 1/8 nat: a histogram of each token's gap to the row's
   best score (256 bins), the threshold bin and per-chunk offsets, then a compaction (tokens
   of the threshold bin in index order until ``n_keep``). The scores (2 bytes a token) are
   read twice more, from L2 at the sizes that matter.
3. :func:`candidate_scores`: the candidates' full key rows, scored exactly for every head.
4. :func:`rerank_select` (one program per row x KV head): a candidate's best log-probability
   over the group's heads (softmax over the candidates), the budget's best exactly, per-group
   counts honoured.

:func:`macopt.topk_phi_select.sketch_selection` chains them (and holds the torch reference).

>>> scores, block_max = sketch_scores(codes, dims, q_scaled, mid_start, mid_end, n_keys,
...                                   block_max=True)
>>> candidates = select_candidates(scores, block_max, n_keep=2 * budget)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from macopt.kernels.launch import interpreting

Tensor = torch.Tensor

# Every output and workspace buffer comes from here (tests may swap in a poisoning allocator).
_new_empty = torch.empty

# Tokens and warps per scoring program at C <= 32 channels: 512 and 2 the fastest of 256 /
# 512 / 1024 x 2 / 4 / 8 on an H100 (212 us against 254 at 4 warps, 128K, batch 16:
# BENCHMARKS.md 19).
SCORE_TOKENS = 512
SCORE_WARPS = 2
MIN_BLOCK_C = 32  # channels per scoring product, padded (see sketch_scores)
_CHUNK = 4096  # tokens per program of the candidate passes
_BLOCK_S = 4096  # tokens a candidate-pass program loads at once (151 us against 163 at 1024
# for the three passes, 128K batch 16 on an H100; chunks of 16384 and 8 warps slower: BENCHMARKS 16)
HISTOGRAM_WARPS = 4
COMPACT_WARPS = 8  # 60 us against 68 at 4, 62 at 16 (128K batch 16, H100: BENCHMARKS 20)
CANDIDATE_ROWS = 32  # candidates per program of the exact scoring (32-128 within 8%: BENCHMARKS 19)
CANDIDATE_SCORE_WARPS = 4
RERANK_WARPS = 8  # 37 us against 58 at 4, 39 at 16 (the same point, BENCHMARKS 20)
RANK_TILE = 2048  # candidate scores (heads x candidates) the rerank's ranking loads at once
N_BINS = 256
BIN_WIDTH = 0.125  # nats of approximate score per bin: 256 bins span 32 nats below the best


def _ptx(device: torch.device) -> bool:
    """Whether a launch may run inline PTX (an NVIDIA GPU, not Triton's interpreter)."""
    return device.type == "cuda" and torch.version.hip is None and not interpreting()


# Four packed bytes -> their low and their high nibbles as fp16 levels n - 8, exactly: a nibble
# n under 0x6400 is the fp16 1024 + n (minus 1032: n - 8); a high nibble masked in place is
# 1024 + 16 n (times 1/16, minus 72: n - 8). Two byte permutes, four masks, four half2
# operations for eight levels; Triton's own integer ops took ~3 instructions a level.
_UNPACK_PTX = tl.constexpr("""{
.reg .b32 t0, t1, bias, sixteenth, shift;
mov.b32 bias, 0x64086408;
mov.b32 sixteenth, 0x2C002C00;
mov.b32 shift, 0xD480D480;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
lop3.b32 $0, t0, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $1, t1, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $2, t0, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 $3, t1, 0x00F000F0, 0x64006400, 0xEA;
sub.f16x2 $0, $0, bias;
sub.f16x2 $1, $1, bias;
fma.rn.f16x2 $2, $2, sixteenth, shift;
fma.rn.f16x2 $3, $3, sixteenth, shift;
}""")


@triton.jit
def _levels(byte, PTX: tl.constexpr):
    """The low and the high nibbles of uint8 ``byte`` as fp16 levels ``n - 8`` (exact)."""
    if PTX:
        # not pure: Triton would otherwise move it after the product's layout conversion,
        # where each thread's bytes are gathered one at a time from shared memory
        low, high = tl.inline_asm_elementwise(_UNPACK_PTX, "=r,=r,=r,=r,r", [byte],
                                              dtype=(tl.float16, tl.float16), is_pure=False,
                                              pack=4)
    else:  # the interpreter runs no PTX: the same levels from the same fp16 bit patterns
        wide = byte.to(tl.int16)
        low = ((wide & 15) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
        high = ((wide >> 4) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
    return low, high


@triton.jit
def _sketch_scores_kernel(
    codes_ptr, dims_ptr, q_ptr, mid_start_ptr, mid_end_ptr, out_ptr, block_max_ptr,
    n_kv_heads, n_keys, head_dim, n_packed, group, n_channels, n_blocks,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, PTX: tl.constexpr,
):
    # One program per (row x KV head, block of BLOCK_N tokens). The C chosen byte rows of
    # BLOCK_N / 2 bytes each are loaded at once as one [C, BLOCK_N / 2] tile, contiguous along
    # the row (wide coalesced loads). A byte holds an even token (low nibble) and the next odd
    # one (high nibble): the low nibbles are the block's even tokens, the high ones its odd.
    # Every head's score is a tensor-core product, tokens as its rows: [tokens, C] x [C, heads]
    # (summing the channels with CUDA-core reductions took ~25x the bytes' time on an H100,
    # BENCHMARKS.md 13); the best head is then a reduction along each token's row, mostly
    # within a thread (heads as the rows instead cost ~3x the shuffles: docs/SAFE_DEFAULTS.md 15).
    # The heads past the group repeat its heads (no mask before the maximum). The levels
    # (-8..7) are exact in fp16 and so is each product's fp32 sum; the query is rounded to
    # fp16 (a relative 2^-11, far inside the 4-bit levels' own error). Also writes the block's
    # best score, from which the candidate pass takes the row's best. (A loop over several
    # blocks per program, pipelined by Triton, was slower at every depth tried: BENCHMARKS.md 16.)
    HALF: tl.constexpr = BLOCK_N // 2
    pid = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    batch = pid // n_kv_heads
    chans = tl.arange(0, BLOCK_C)
    chan_ok = chans < n_channels
    dims = tl.load(dims_ptr + pid * n_channels + chans, mask=chan_ok, other=0).to(tl.int64)
    heads = tl.arange(0, BLOCK_G) % group
    q_t = tl.load(q_ptr + (pid * group + heads[None, :]) * n_channels + chans[:, None],
                  mask=chan_ok[:, None], other=0.0).to(tl.float16)  # [C, heads]
    pairs = block * HALF + tl.arange(0, HALF)
    byte = tl.load(codes_ptr + (pid * head_dim + dims[:, None]) * n_packed + pairs[None, :],
                   mask=chan_ok[:, None] & (pairs < n_packed)[None, :], other=0x88)
    low, high = _levels(byte, PTX)
    # even and odd tokens as two products straight from the loaded tile, stored with a stride
    # of two (joining them into token order first costs a register shuffle: 4% slower on an
    # H100, BENCHMARKS.md 15)
    even = 2 * pairs
    b_even = tl.max(tl.dot(tl.trans(low), q_t, out_dtype=tl.float32), axis=1)
    b_odd = tl.max(tl.dot(tl.trans(high), q_t, out_dtype=tl.float32), axis=1)
    lo = tl.load(mid_start_ptr + batch)
    hi = tl.load(mid_end_ptr + batch)
    b_even = tl.where((even >= lo) & (even < hi), b_even, float("-inf")).to(tl.float16)
    b_odd = tl.where((even + 1 >= lo) & (even + 1 < hi), b_odd, float("-inf")).to(tl.float16)
    tl.store(out_ptr + pid * n_keys + even, b_even, mask=even < n_keys)
    tl.store(out_ptr + pid * n_keys + even + 1, b_odd, mask=even + 1 < n_keys)
    top = tl.maximum(tl.max(b_even.to(tl.float32), axis=0), tl.max(b_odd.to(tl.float32), axis=0))
    tl.store(block_max_ptr + pid * n_blocks + block, top)


def sketch_scores(codes: Tensor, dims: Tensor, q_scaled: Tensor, mid_start: Tensor,
                  mid_end: Tensor, n_keys: int, block_max: bool = False):
    """Group scores ``[B, Hkv, n_keys]`` fp16 of every token from the sketch (see the module).

    ``codes[B, Hkv, D, P]`` uint8 (``2 P >= n_keys``), ``dims[B, Hkv, C]`` int32 (the chosen
    channels), ``q_scaled[B, Hkv, g, C]`` fp32 (each query head's value on those channels times
    the channel's dequantisation scale and the softmax scale): the score of token ``n`` for
    head ``h`` is ``sum_c q_scaled[h, c] * (code[dims[c], n] - 8)``; the group score is the
    best head's, summed in fp32 with the query rounded to fp16 (levels are exact in fp16; a
    relative 2^-11 on the query is far inside the 4-bit levels' own error). Tokens outside
    ``[mid_start[b], mid_end[b])`` get ``-inf``. ``block_max``: also return each block's best
    (fp32 ``[B, Hkv, n_blocks]``, what :func:`select_candidates` takes)."""
    batch, n_kv_heads, head_dim, n_packed = codes.shape
    group, n_channels = q_scaled.shape[2], q_scaled.shape[3]
    if codes.dtype != torch.uint8 or 2 * n_packed < n_keys:
        raise ValueError(f"codes: expected uint8 [B, Hkv, D, >= {-(-n_keys // 2)}], got "
                         f"{codes.dtype} {tuple(codes.shape)}")
    if dims.shape != (batch, n_kv_heads, n_channels) or q_scaled.shape[:2] != (batch,
                                                                              n_kv_heads):
        raise ValueError(f"dims {tuple(dims.shape)} / q_scaled {tuple(q_scaled.shape)}: "
                         f"expected [{batch}, {n_kv_heads}, C] and [{batch}, {n_kv_heads}, g, C]")
    # tensor-core products need 16 or more columns (heads) and channels: padding heads repeat
    # the group's, padding channels are zero. At 16 channels (head dim 64) Triton 3.6
    # miscompiled the product on an H100 (scores off, every SmolLM2 task lost: BENCHMARKS.md
    # 14c, 15): 32 or more, zero-padded, is exact.
    block_g = max(16, triton.next_power_of_2(group))
    block_c = max(MIN_BLOCK_C, triton.next_power_of_2(n_channels))
    # a [C, BLOCK_N] tile of levels in registers: fewer tokens when many channels are read
    block_n = max(32, min(SCORE_TOKENS * 32 // max(block_c, 32),
                          triton.next_power_of_2(max(n_keys, 16))))
    n_blocks = triton.cdiv(max(n_keys, 1), block_n)
    out = _new_empty((batch, n_kv_heads, n_keys), dtype=torch.float16, device=codes.device)
    maxima = _new_empty((batch, n_kv_heads, n_blocks), dtype=torch.float32, device=codes.device)
    if out.numel():
        _sketch_scores_kernel[(batch * n_kv_heads, n_blocks)](
            codes.contiguous(), dims.to(torch.int32).contiguous(), q_scaled.float().contiguous(),
            mid_start, mid_end, out, maxima, n_kv_heads, n_keys, head_dim, n_packed, group,
            n_channels, n_blocks, BLOCK_G=block_g, BLOCK_C=block_c, BLOCK_N=block_n,
            PTX=_ptx(codes.device), num_warps=SCORE_WARPS)
    return (out, maxima) if block_max else out


@triton.jit
def _row_best(block_max_ptr, pid, n_blocks, BLOCK_M: tl.constexpr):
    """The row's best score from its blocks' (0 when none is finite)."""
    offsets = tl.arange(0, BLOCK_M)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for start in range(0, n_blocks, BLOCK_M):
        idx = start + offsets
        best = tl.maximum(best, tl.load(block_max_ptr + pid * n_blocks + idx,
                                        mask=idx < n_blocks, other=float("-inf")))
    top = tl.max(best, axis=0)
    return tl.where(tl.abs(top) < float("inf"), top, 0.0)


@triton.jit
def _bins_of(scores_ptr, pid, idx, ok, top, n_keys, INV_WIDTH: tl.constexpr,
             N_BINS: tl.constexpr):
    """Bin of each score: floor((row best - score) / width), clamped to the last bin (-inf
    included)."""
    x = tl.load(scores_ptr + pid * n_keys + idx, mask=ok, other=float("-inf")).to(tl.float32)
    gap = tl.minimum(tl.maximum((top - x) * INV_WIDTH, 0.0), N_BINS - 1.0)
    return gap.to(tl.int32)  # (truncation of a non-negative value: floor)


@triton.jit
def _bin_histogram_kernel(
    scores_ptr, block_max_ptr, hist_ptr, n_keys, n_blocks, n_chunks,
    CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr,
    INV_WIDTH: tl.constexpr, N_BINS: tl.constexpr,
):
    # One program per (row, chunk of CHUNK tokens): the chunk's bin counts.
    pid = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    top = _row_best(block_max_ptr, pid, n_blocks, BLOCK_M)
    bins = tl.arange(0, N_BINS)
    hist = tl.zeros([N_BINS], tl.int32)
    for start in range(0, CHUNK, BLOCK_S):
        idx = chunk * CHUNK + start + tl.arange(0, BLOCK_S)
        ok = idx < n_keys
        b = _bins_of(scores_ptr, pid, idx, ok, top, n_keys, INV_WIDTH, N_BINS)
        hist += tl.histogram(b, N_BINS)
        # padding lanes fell in the last bin: take them back out
        n_pad = tl.sum((~ok).to(tl.int32), axis=0)
        hist -= tl.where(bins == N_BINS - 1, n_pad, 0)
    tl.store(hist_ptr + (pid * n_chunks + chunk) * N_BINS + bins, hist)


@triton.jit
def summed_histogram(hist_ptr, row, n_chunks, BLOCK_CH: tl.constexpr, N_BINS: tl.constexpr):
    """A row's bin counts summed over its chunks' histograms ``hist[row, chunk, N_BINS]``."""
    bins = tl.arange(0, N_BINS)
    chunks = tl.arange(0, BLOCK_CH)
    total = tl.zeros([N_BINS], tl.int32)
    for start in range(0, n_chunks, BLOCK_CH):
        ch = start + chunks
        tile = tl.load(hist_ptr + (row * n_chunks + ch[:, None]) * N_BINS + bins[None, :],
                       mask=(ch < n_chunks)[:, None], other=0)
        total += tl.sum(tile, axis=0)
    return total


@triton.jit
def _bin_threshold_kernel(
    hist_ptr, offsets_ptr, n_chunks, n_keep,
    BLOCK_CH: tl.constexpr, N_BINS: tl.constexpr,
):
    # One program per row: the threshold bin t (fewer than n_keep scores in the bins before
    # it, at least n_keep up to it) and each chunk's first slot for its above-threshold and
    # threshold-bin tokens.
    pid = tl.program_id(0).to(tl.int64)
    bins = tl.arange(0, N_BINS)
    chunks = tl.arange(0, BLOCK_CH)
    total = summed_histogram(hist_ptr, pid, n_chunks, BLOCK_CH, N_BINS)
    cum = tl.cumsum(total, axis=0)
    t = tl.sum((cum < n_keep).to(tl.int32), axis=0)
    n_before = tl.sum(tl.where(bins < t, total, 0), axis=0)
    above_base = tl.zeros([], tl.int32)
    tie_base = tl.zeros([], tl.int32)
    for start in range(0, n_chunks, BLOCK_CH):
        ch = start + chunks
        ch_ok = ch < n_chunks
        tile = tl.load(hist_ptr + (pid * n_chunks + ch[:, None]) * N_BINS + bins[None, :],
                       mask=ch_ok[:, None], other=0)
        above = tl.sum(tl.where(bins[None, :] < t, tile, 0), axis=1)
        ties = tl.sum(tl.where(bins[None, :] == t, tile, 0), axis=1)
        above_off = above_base + tl.cumsum(above, axis=0) - above
        tie_off = tie_base + tl.cumsum(ties, axis=0) - ties
        base = offsets_ptr + (pid * n_chunks + ch) * 4
        tl.store(base, above_off, mask=ch_ok)
        tl.store(base + 1, tie_off, mask=ch_ok)
        tl.store(base + 2, tl.zeros([BLOCK_CH], tl.int32) + t, mask=ch_ok)
        tl.store(base + 3, tl.zeros([BLOCK_CH], tl.int32) + n_before, mask=ch_ok)
        above_base += tl.sum(above, axis=0)
        tie_base += tl.sum(ties, axis=0)


@triton.jit
def _bin_compact_kernel(
    scores_ptr, block_max_ptr, offsets_ptr, out_ptr, n_keys, n_blocks, n_chunks, n_keep,
    CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr,
    INV_WIDTH: tl.constexpr, N_BINS: tl.constexpr,
):
    # One program per (row, chunk): writes its tokens above the threshold bin, then those of
    # the threshold bin whose rank (in index order over the row) is within the budget.
    tl.static_assert(BLOCK_S < 65536)  # the two running counts share one int32 scan
    pid = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    top = _row_best(block_max_ptr, pid, n_blocks, BLOCK_M)
    base = offsets_ptr + (pid * n_chunks + chunk) * 4
    n_above = tl.load(base)
    n_ties = tl.load(base + 1)
    t = tl.load(base + 2)
    n_before = tl.load(base + 3)
    ties_wanted = n_keep - n_before
    out_ptr += pid * n_keep
    for start in range(0, CHUNK, BLOCK_S):
        idx = chunk * CHUNK + start + tl.arange(0, BLOCK_S)
        ok = idx < n_keys
        b = _bins_of(scores_ptr, pid, idx, ok, top, n_keys, INV_WIDTH, N_BINS)
        above = (b < t) & ok
        tie = (b == t) & ok
        # one scan for both: above-threshold tokens in the low 16 bits, ties in the high 16
        run = tl.cumsum(above.to(tl.int32) + (tie.to(tl.int32) << 16), axis=0)
        above_slot = n_above + (run & 0xFFFF) - 1
        tie_rank = n_ties + (run >> 16) - 1
        tl.store(out_ptr + above_slot, idx.to(tl.int32), mask=above)
        tl.store(out_ptr + n_before + tie_rank, idx.to(tl.int32),
                 mask=tie & (tie_rank < ties_wanted))
        n_above += tl.sum(above.to(tl.int32), axis=0)
        n_ties += tl.sum(tie.to(tl.int32), axis=0)


def select_candidates(scores: Tensor, block_max: Tensor, n_keep: int) -> Tensor:
    """``n_keep`` candidate token indices ``[B, H, n_keep]`` int32 per row of fp16 ``scores[B,
    H, N]`` (``n_keep <= N``), from their gap to the row's best (``block_max[B, H, n_blocks]``
    of :func:`sketch_scores`) in bins of ``BIN_WIDTH`` (gaps past the last bin share it): every
    token of the bins before the threshold bin, then the threshold bin's in index order until
    ``n_keep``. So the set is a top ``n_keep`` up to one bin's width. Order: the first group
    ascending, then the second ascending. Three launches (bin counts per chunk of the row, the
    threshold and each chunk's offsets, the compaction), no host sync."""
    batch, heads, n_keys = scores.shape
    if scores.dtype != torch.float16:
        raise ValueError(f"scores: expected fp16, got {scores.dtype}")
    if not 1 <= n_keep <= n_keys:
        raise ValueError(f"n_keep: expected 1..{n_keys}, got {n_keep}")
    device = scores.device
    out = _new_empty((batch, heads, n_keep), dtype=torch.int32, device=device)
    if out.numel() == 0:
        return out
    rows, n_blocks = batch * heads, block_max.shape[-1]
    n_chunks = triton.cdiv(n_keys, _CHUNK)
    hist = _new_empty((rows, n_chunks, N_BINS), dtype=torch.int32, device=device)
    offsets = _new_empty((rows, n_chunks, 4), dtype=torch.int32, device=device)
    scores, block_max = scores.contiguous(), block_max.contiguous()
    common = dict(CHUNK=_CHUNK, BLOCK_S=min(_BLOCK_S, triton.next_power_of_2(n_keys)),
                  BLOCK_M=min(1024, triton.next_power_of_2(n_blocks)),
                  INV_WIDTH=1.0 / BIN_WIDTH, N_BINS=N_BINS)
    _bin_histogram_kernel[(rows, n_chunks)](scores, block_max, hist, n_keys, n_blocks,
                                            n_chunks, **common, num_warps=HISTOGRAM_WARPS)
    _bin_threshold_kernel[(rows,)](hist, offsets, n_chunks, n_keep,
                                   BLOCK_CH=max(16, min(32, triton.next_power_of_2(n_chunks))),
                                   N_BINS=N_BINS, num_warps=4)
    _bin_compact_kernel[(rows, n_chunks)](scores, block_max, offsets, out, n_keys, n_blocks,
                                          n_chunks, n_keep, **common,
                                          num_warps=COMPACT_WARPS)
    return out


def score_bins(scores: Tensor) -> Tensor:
    """The bins :func:`select_candidates` gives fp16 ``scores[..., N]``, int64 (torch)."""
    x = scores.float()
    top = x.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    gap = ((top - x) * (1.0 / BIN_WIDTH)).clamp(0.0, N_BINS - 1.0)
    return gap.to(torch.int64)


@triton.jit
def _candidate_scores_kernel(
    q_ptr, k_ptr, cand_ptr, mid_start_ptr, mid_end_ptr, out_ptr,
    n_kv_heads, n_cand, head_dim, group, scale,
    stride_kb, stride_kh, stride_kn, stride_kd,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # One program per (row x KV head, block of BLOCK_R candidates): their key rows are read
    # once (each row contiguous) and scored for every query head of the group in one
    # tensor-core product [candidates, D] x [D, heads] (a CUDA-core reduction per head took
    # ~3x the instructions at 4 heads a group: docs/SAFE_DEFAULTS.md 15). Padding heads
    # repeat the group's.
    pid = tl.program_id(0).to(tl.int64)
    batch = pid // n_kv_heads
    kv_head = pid % n_kv_heads
    slots = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot_ok = slots < n_cand
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    heads = tl.arange(0, BLOCK_G)
    token = tl.load(cand_ptr + pid * n_cand + slots, mask=slot_ok, other=0).to(tl.int64)
    keys = tl.load(k_ptr + batch * stride_kb + kv_head * stride_kh
                   + token[:, None] * stride_kn + dims[None, :] * stride_kd,
                   mask=slot_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter's products in fp32
        keys = keys.to(tl.float32)
    q_t = tl.load(q_ptr + (pid * group + heads[None, :] % group) * head_dim + dims[:, None],
                  mask=dim_ok[:, None], other=0.0).to(keys.dtype)  # [D, heads]
    scores = tl.dot(keys, q_t, out_dtype=tl.float32, input_precision=PRECISION) * scale
    lo = tl.load(mid_start_ptr + batch)
    hi = tl.load(mid_end_ptr + batch)
    inside = (token >= lo) & (token < hi)
    scores = tl.where(inside[:, None], scores, float("-inf"))
    tl.store(out_ptr + (pid * group + heads[None, :]) * n_cand + slots[:, None], scores,
             mask=slot_ok[:, None] & (heads < group)[None, :])


def candidate_scores(q: Tensor, k: Tensor, candidates: Tensor, mid_start: Tensor,
                     mid_end: Tensor, scale: float) -> Tensor:
    """Exact scores ``[B, Hkv, g, R]`` fp32 (``s q.k``, fp32 sums of the cache dtype's
    products) of ``candidates[B, Hkv, R]`` (token indices < N) for every query head of ``q[B,
    Hq, D]`` against ``k[B, Hkv, N, D]``; ``-inf`` for candidates outside ``[mid_start[b],
    mid_end[b])``. One launch."""
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    group, n_cand = n_q_heads // n_kv_heads, candidates.shape[-1]
    out = _new_empty((batch, n_kv_heads, group, n_cand), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    # fp32 products are CUDA-core FMAs whose [rows, D] tiles spill past 16 rows (sm_90a, offline)
    rows = 16 if k.dtype == torch.float32 else CANDIDATE_ROWS
    block_r = max(16, min(rows, triton.next_power_of_2(n_cand)))
    # fp32 caches: fp32 products (tf32 would round the keys to 10 bits); a query of another
    # dtype than the cache is cast to it (the decode ops pass one dtype)
    upcast = interpreting()
    precision = "ieee" if k.dtype == torch.float32 or upcast else "tf32"
    _candidate_scores_kernel[(batch * n_kv_heads, triton.cdiv(n_cand, block_r))](
        q.contiguous(), k, candidates.to(torch.int32).contiguous(), mid_start, mid_end, out,
        n_kv_heads, n_cand, head_dim, group, scale, *k.stride(),
        BLOCK_R=block_r, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_G=max(16, triton.next_power_of_2(group)), PRECISION=precision, UPCAST=upcast,
        num_warps=CANDIDATE_SCORE_WARPS)
    return out


@triton.jit
def _sketch_query_kernel(
    q_ptr, scales_ptr, dims_ptr, out_ptr, group, head_dim, n_channels, scale,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (row, KV head): rank the channels by the group's summed |q| (ties: lower
    # channel first) and write the best n_channels with each head's scaled query there.
    pid = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    ok = (heads < group)[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + (pid * group + heads[:, None]) * head_dim + dims[None, :], mask=ok,
                other=0.0).to(tl.float32)
    weight = tl.where(dim_ok, tl.sum(tl.abs(q), axis=0), -1.0)
    ahead = (weight[:, None] > weight[None, :]) | ((weight[:, None] == weight[None, :])
                                                   & (dims[:, None] < dims[None, :]))
    rank = tl.sum(ahead.to(tl.int32), axis=0)  # [BLOCK_D]: channels ranked before each
    chosen = dim_ok & (rank < n_channels)
    tl.store(dims_ptr + pid * n_channels + rank, dims, mask=chosen)
    factor = tl.load(scales_ptr + pid * head_dim + dims, mask=dim_ok, other=0.0) * scale
    tl.store(out_ptr + (pid * group + heads[:, None]) * n_channels + rank[None, :],
             q * factor[None, :], mask=ok & chosen[None, :])


def sketch_query(q: Tensor, scales: Tensor, scale: float, n_channels: int
                 ) -> tuple[Tensor, Tensor]:
    """``(dims [B, Hkv, C] int32, q_scaled [B, Hkv, g, C] fp32)`` for :func:`sketch_scores`:
    per KV group the ``C`` channels of largest summed |q| over its heads (best first; ties to
    the lower channel) and each head's q there times the channel's scale ``scales[B, Hkv, D]``
    and the softmax ``scale``. One launch."""
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads = scales.shape[1]
    group = n_q_heads // n_kv_heads
    dims = _new_empty((batch, n_kv_heads, n_channels), dtype=torch.int32, device=q.device)
    out = _new_empty((batch, n_kv_heads, group, n_channels), dtype=torch.float32,
                     device=q.device)
    if out.numel():
        _sketch_query_kernel[(batch * n_kv_heads,)](
            q.contiguous(), scales.contiguous(), dims, out, group, head_dim, n_channels, scale,
            BLOCK_G=triton.next_power_of_2(group), BLOCK_D=triton.next_power_of_2(head_dim),
            num_warps=4)
    return dims, out


@triton.jit
def _order32(x):
    """int32 ordering like the fp32 ``x`` (-inf lowest; -0.0 just below +0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _rank_candidates(scores_ptr, keys_ptr, pid, n_cand, group, BLOCK_G: tl.constexpr,
                     BLOCK_T: tl.constexpr):
    """Each candidate's best log-probability over the group's heads (softmax over the
    candidates) as an ordered int32 key, written to ``keys_ptr``."""
    # Pass 1: every head's log-sum-exp over the candidates (online max / sum per lane).
    heads = tl.arange(0, BLOCK_G)
    head_ok = heads < group
    rows = scores_ptr + (pid * group + heads[:, None]) * n_cand
    lane_max = tl.full([BLOCK_G, BLOCK_T], float("-inf"), tl.float32)
    lane_sum = tl.zeros([BLOCK_G, BLOCK_T], tl.float32)
    lanes = tl.arange(0, BLOCK_T)
    for start in range(0, n_cand, BLOCK_T):
        idx = start + lanes
        x = tl.load(rows + idx[None, :], mask=head_ok[:, None] & (idx < n_cand)[None, :],
                    other=float("-inf"))
        new_max = tl.maximum(lane_max, x)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(lane_max - safe) + tl.exp(x - safe)
        lane_max = new_max
    m = tl.max(lane_max, axis=1)
    safe_m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(lane_sum * tl.exp(lane_max - safe_m[:, None]), axis=1)
    lse = tl.where(total > 0, safe_m + tl.log(tl.maximum(total, 1e-30)), 0.0)  # none: 0
    # Pass 2: each candidate's best log-probability over the heads, as an ordered int32 key.
    for start in range(0, n_cand, BLOCK_T):
        idx = start + lanes
        ok = idx < n_cand
        x = tl.load(rows + idx[None, :], mask=head_ok[:, None] & ok[None, :],
                    other=float("-inf"))
        rank = tl.max(x - lse[:, None], axis=0)
        tl.store(keys_ptr + idx, _order32(rank), mask=ok)
    tl.debug_barrier()  # other threads read these keys back


@triton.jit
def unsigned_key(key):
    """An int32 key (:func:`_order32`) as an int64 in [0, 2^32), same order: its bytes, high
    first, order it as an unsigned number (what a radix select picks byte by byte)."""
    return key.to(tl.int64) + 2147483648


@triton.jit
def pick_digit(counts, wanted, BINS: tl.constexpr):
    """Radix select's step: ``counts[BINS]`` of one byte among the keys matching the prefix so
    far; the highest byte value with at least ``wanted`` of them at or above it (the last when
    nothing is wanted), and how many lie strictly above it."""
    at_least = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
    digit = tl.maximum(tl.sum((at_least >= wanted).to(tl.int32), axis=0) - 1, 0)
    return digit, tl.sum(tl.where(tl.arange(0, BINS) > digit, counts, 0), axis=0)


@triton.jit
def _rerank_select_kernel(
    scores_ptr, cand_ptr, keys_ptr, out_ptr, counts_ptr, n_cand, group, n_keep,
    HAS_COUNTS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # One program per (row, KV head): each candidate's best log-probability over the group's
    # heads (softmax over the candidates), then its n_keep best, exactly (ties to the lower
    # candidate slot).
    pid = tl.program_id(0).to(tl.int64)
    keys_ptr += pid * n_cand
    width = n_keep
    if HAS_COUNTS:
        n_keep = tl.minimum(tl.maximum(tl.load(counts_ptr + pid), 0), n_keep)
    _rank_candidates(scores_ptr, keys_ptr, pid, n_cand, group, BLOCK_G, BLOCK_T)

    # The threshold (the n_keep-th largest key) a byte at a time, high byte first: among the
    # keys whose higher bytes equal the threshold's so far, one histogram of this byte, then
    # the highest value with at least `wanted` keys at or above it. (Bisection by 16
    # thresholds a pass, 8 passes each reduced across the program through shared memory,
    # took ~55 us at any batch: BENCHMARKS.md 20.)
    prefix = tl.zeros([], tl.int64)
    wanted = n_keep
    for shift in tl.static_range(24, -1, -8):
        hist = tl.zeros([256], tl.int32)
        for start in range(0, n_cand, BLOCK_S):
            idx = start + tl.arange(0, BLOCK_S)
            u = unsigned_key(tl.load(keys_ptr + idx, mask=idx < n_cand, other=0))
            match = (idx < n_cand) & ((u >> (shift + 8)) == (prefix >> (shift + 8)))
            hist += tl.histogram(((u >> shift) & 255).to(tl.int32), 256, mask=match)
        digit, n_greater = pick_digit(hist, wanted, 256)
        wanted -= n_greater
        prefix += digit.to(tl.int64) << shift
    threshold = (prefix - 2147483648).to(tl.int32)

    # The keys above the threshold and the first `wanted` of its ties, in candidate order:
    # one scan counts both (above in the low 16 bits, ties in the high 16).
    tl.static_assert(BLOCK_S < 65536)
    out_ptr += pid * width
    cand_ptr += pid * n_cand
    n_above = tl.zeros([], tl.int32)
    n_ties = tl.zeros([], tl.int32)
    for start in range(0, n_cand, BLOCK_S):
        idx = start + tl.arange(0, BLOCK_S)
        ok = idx < n_cand
        key = tl.load(keys_ptr + idx, mask=ok, other=0)
        above = (key > threshold) & ok
        tie = (key == threshold) & ok
        run = tl.cumsum(above.to(tl.int32) + (tie.to(tl.int32) << 16), axis=0)
        ties_so_far = n_ties + (run >> 16)  # this one included
        chosen = above | (tie & (ties_so_far <= wanted))
        slot = n_above + (run & 0xFFFF) + tl.minimum(ties_so_far, wanted) - 1
        token = tl.load(cand_ptr + idx, mask=chosen, other=0)
        tl.store(out_ptr + slot, token, mask=chosen)
        n_above += tl.sum(above.to(tl.int32), axis=0)
        n_ties += tl.sum(tie.to(tl.int32), axis=0)
    for start in range(0, width, BLOCK_S):  # slots past this group's count: -1
        idx = start + tl.arange(0, BLOCK_S)
        tl.store(out_ptr + idx, tl.full([BLOCK_S], -1, tl.int32),
                 mask=(idx < width) & (idx >= n_keep))


def rerank_select(scores: Tensor, candidates: Tensor, n_keep: int,
                  counts: Tensor | None = None) -> Tensor:
    """The ``n_keep`` best of ``candidates[B, H, R]`` (token indices) by exact ``scores[B, H, g,
    R]`` fp32: a candidate's best log-probability over the ``g`` heads, each head's softmax
    taken over the candidates (``-inf``: never chosen before a finite one), exactly (ties: the
    earlier candidate slot). ``[B, H, n_keep]`` int32 in candidate order (not sorted).
    ``counts[B, H]`` int32 (optional): a row keeps only its best ``counts`` (at most
    ``n_keep``), the rest of its slots -1. One launch, no host sync. (Every token of a long row
    ranked: :func:`macopt.kernels.radix_select.radix_topk`.)"""
    batch, heads, group, n_cand = scores.shape
    if not 1 <= n_keep <= n_cand:
        raise ValueError(f"n_keep: expected 1..{n_cand}, got {n_keep}")
    out = _new_empty((batch, heads, n_keep), dtype=torch.int32, device=scores.device)
    if out.numel() == 0:
        return out
    keys = _new_empty((batch, heads, n_cand), dtype=torch.int32, device=scores.device)
    _rerank_select_kernel[(batch * heads,)](
        scores.contiguous(), candidates.to(torch.int32).contiguous(), keys, out,
        None if counts is None else counts.to(torch.int32).contiguous(), n_cand, group,
        n_keep, HAS_COUNTS=counts is not None,
        BLOCK_S=min(4096, triton.next_power_of_2(n_cand)), BLOCK_G=triton.next_power_of_2(group),
        BLOCK_T=min(max(16, RANK_TILE // triton.next_power_of_2(group)),
                    triton.next_power_of_2(n_cand)), num_warps=RERANK_WARPS)
    return out


def select_candidates_reference(scores: Tensor, n_keep: int) -> Tensor:
    """:func:`select_candidates` in torch, same indices in the same order."""
    n_keys = scores.shape[-1]
    bins = score_bins(scores)
    index = torch.arange(n_keys, device=scores.device)
    order = bins * n_keys + index  # by bin, then index
    first = torch.sort(order, dim=-1).values[..., :n_keep]
    chosen_bins, chosen = first // n_keys, first % n_keys
    t = chosen_bins[..., -1:]
    # the kernel's order: the bins before t ascending by index, then t's tokens
    key = torch.where(chosen_bins < t, chosen, n_keys + chosen)
    return (torch.sort(key, dim=-1).values % n_keys).to(torch.int32)


__all__ = ["BIN_WIDTH", "N_BINS", "candidate_scores", "rerank_select", "score_bins",
           "select_candidates", "select_candidates_reference", "sketch_query", "sketch_scores"]
