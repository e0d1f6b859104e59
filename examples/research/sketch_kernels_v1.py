"""The sketch selector's scoring and candidate-scoring kernels as they were before the
twelfth session (BENCHMARKS.md 19): kept for the side-by-side in ``topk_speed_sweep.py``.

Scoring: the heads as the rows of a [heads, C] x [C, tokens] product, the query as an fp16
pair (value + residue), the 4-bit levels by integer ops that Triton moved before the product's
layout conversion (a byte at a time through shared memory). Candidate scores: a CUDA-core
reduction per query head.
"""

import triton
import triton.language as tl


@triton.jit
def _sketch_scores_kernel(
    codes_ptr, dims_ptr, q_ptr, mid_start_ptr, mid_end_ptr, out_ptr, block_max_ptr,
    n_kv_heads, n_keys, head_dim, n_packed, group, n_channels, n_blocks,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (row x KV head, block of BLOCK_N tokens). The C chosen byte rows of
    # BLOCK_N / 2 bytes each are loaded at once as one [C, BLOCK_N / 2] tile, contiguous along
    # the row (wide coalesced loads). A byte holds an even token (low nibble) and the next odd
    # one (high nibble): the low nibbles are the block's even tokens, the high ones its odd.
    # Every head's score is a tensor-core product [heads, C] x [C, tokens]: summing the
    # channels with CUDA-core reductions split them over threads and warps (shared memory and
    # barriers per head), and that took ~25x the bytes' time on an H100 (BENCHMARKS.md 13).
    # The levels (-8..7) are exact in fp16; the queries go in as an fp16 pair (value + rounding
    # residue), so the sums keep fp32 precision. Also writes the block's best score, from
    # which the candidate pass takes the row's best. (A loop over several blocks per program,
    # pipelined by Triton, was slower at every depth tried: BENCHMARKS.md 16.)
    HALF: tl.constexpr = BLOCK_N // 2
    pid = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    batch = pid // n_kv_heads
    chans = tl.arange(0, BLOCK_C)
    chan_ok = chans < n_channels
    dims = tl.load(dims_ptr + pid * n_channels + chans, mask=chan_ok, other=0).to(tl.int64)
    heads = tl.arange(0, BLOCK_G)
    head_ok = heads < group
    q = tl.load(q_ptr + (pid * group + heads[:, None]) * n_channels + chans[None, :],
                mask=head_ok[:, None] & chan_ok[None, :], other=0.0)
    q_hi = q.to(tl.float16)
    q_lo = (q - q_hi.to(tl.float32)).to(tl.float16)
    pairs = block * HALF + tl.arange(0, HALF)
    byte = tl.load(codes_ptr + (pid * head_dim + dims[:, None]) * n_packed + pairs[None, :],
                   mask=chan_ok[:, None] & (pairs < n_packed)[None, :], other=0x88)
    # A nibble n as the fp16 bits 0x6400 | n is exactly 1024 + n: two bit operations and one
    # fp16 subtraction per level, where integer-to-float conversions (quarter-rate on the SM)
    # bound the launch: 272 against 376 us at 128K, batch 16 on an H100 (BENCHMARKS.md 16).
    wide = byte.to(tl.int16)
    low = ((wide & 15) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
    high = ((wide >> 4) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
    # even and odd tokens as two products straight from the loaded tile, stored with a stride
    # of two (joining them into token order first costs a register shuffle: 4% slower on an
    # H100, BENCHMARKS.md 15)
    even = 2 * pairs
    s_even = tl.dot(q_lo, low, tl.dot(q_hi, low, out_dtype=tl.float32), out_dtype=tl.float32)
    s_odd = tl.dot(q_lo, high, tl.dot(q_hi, high, out_dtype=tl.float32), out_dtype=tl.float32)
    b_even = tl.max(tl.where(head_ok[:, None], s_even, float("-inf")), axis=0)
    b_odd = tl.max(tl.where(head_ok[:, None], s_odd, float("-inf")), axis=0)
    lo = tl.load(mid_start_ptr + batch)
    hi = tl.load(mid_end_ptr + batch)
    b_even = tl.where((even >= lo) & (even < hi), b_even, float("-inf")).to(tl.float16)
    b_odd = tl.where((even + 1 >= lo) & (even + 1 < hi), b_odd, float("-inf")).to(tl.float16)
    tl.store(out_ptr + pid * n_keys + even, b_even, mask=even < n_keys)
    tl.store(out_ptr + pid * n_keys + even + 1, b_odd, mask=even + 1 < n_keys)
    top = tl.maximum(tl.max(b_even.to(tl.float32), axis=0), tl.max(b_odd.to(tl.float32), axis=0))
    tl.store(block_max_ptr + pid * n_blocks + block, top)



@triton.jit
def _candidate_scores_kernel(
    q_ptr, k_ptr, cand_ptr, mid_start_ptr, mid_end_ptr, out_ptr,
    n_kv_heads, n_cand, head_dim, group, scale,
    stride_kb, stride_kh, stride_kn, stride_kd,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (row x KV head, block of BLOCK_R candidates): their key rows are read
    # once (each row contiguous) and scored for every query head of the group.
    pid = tl.program_id(0).to(tl.int64)
    batch = pid // n_kv_heads
    kv_head = pid % n_kv_heads
    slots = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot_ok = slots < n_cand
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    token = tl.load(cand_ptr + pid * n_cand + slots, mask=slot_ok, other=0).to(tl.int64)
    keys = tl.load(k_ptr + batch * stride_kb + kv_head * stride_kh
                   + token[:, None] * stride_kn + dims[None, :] * stride_kd,
                   mask=slot_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
    lo = tl.load(mid_start_ptr + batch)
    hi = tl.load(mid_end_ptr + batch)
    inside = (token >= lo) & (token < hi)
    for h in range(group):
        q = tl.load(q_ptr + (pid * group + h) * head_dim + dims, mask=dim_ok,
                    other=0.0).to(tl.float32)
        score = tl.sum(keys * q[None, :], axis=1) * scale
        score = tl.where(inside, score, float("-inf"))
        tl.store(out_ptr + (pid * group + h) * n_cand + slots, score, mask=slot_ok)
