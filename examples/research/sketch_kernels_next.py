"""The sketch selector's scoring and candidate-scoring kernels rewritten in the twelfth session
(docs/SAFE_DEFAULTS.md 15), waiting for a GPU run before they replace those of
:mod:`macopt.kernels.sketch_select`: ``topk_speed_sweep.py`` checks them against torch and
times them beside the current ones, then the whole step with them patched in.

Why (offline sm_90a SASS, Triton 3.6 and 3.9, ``examples/research/offline_ptx.py``): the
current scoring launch issues ~10.6 warp instructions a token at 512 tokens, 4 warps, about
the launch's whole time at 128K, batch 16 (272 us): Triton moves the layout conversion of
the [channels, tokens] byte tile to the product's operand layout before the unpacking, so
each thread gathers its bytes one at a time from shared memory; the heads as the product's
rows cost three shuffles a value for the best head; the query goes in as an fp16 pair. Here:
the levels unpacked in PTX (not pure, so the conversion stays after it, 16-byte shared
stores and ldmatrix loads), tokens as the product's rows (the best head mostly within a
thread), padding heads repeating the group's (no mask), the query in fp16: ~6.1
instructions a token. The candidates' exact scores: one tensor-core product instead of a
CUDA-core reduction per head (~3x fewer instructions at 4 heads a group).

Checked on the CPU interpreter against torch (the interpreter runs the Triton-op levels, not
the PTX); compiled offline for sm_90a with Triton 3.6; not yet run on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from macopt.kernels.launch import interpreting
from macopt.kernels.sketch_select import MIN_BLOCK_C

Tensor = torch.Tensor

SCORE_TOKENS = 512
SCORE_WARPS = 4
CANDIDATE_ROWS = 64  # candidates per program of the exact scoring
CANDIDATE_SCORE_WARPS = 4


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
    """:func:`macopt.kernels.sketch_select.sketch_scores` with these kernels: the query is
    rounded to fp16 (its torch reference is ``sketch_scores_reference`` with ``q_scaled``
    rounded to fp16 first)."""
    batch, n_kv_heads, head_dim, n_packed = codes.shape
    group, n_channels = q_scaled.shape[2], q_scaled.shape[3]
    block_g = max(16, triton.next_power_of_2(group))
    block_c = max(MIN_BLOCK_C, triton.next_power_of_2(n_channels))
    block_n = max(32, min(SCORE_TOKENS * 32 // max(block_c, 32),
                          triton.next_power_of_2(max(n_keys, 16))))
    n_blocks = triton.cdiv(max(n_keys, 1), block_n)
    out = torch.empty((batch, n_kv_heads, n_keys), dtype=torch.float16, device=codes.device)
    maxima = torch.empty((batch, n_kv_heads, n_blocks), dtype=torch.float32,
                         device=codes.device)
    if out.numel():
        _sketch_scores_kernel[(batch * n_kv_heads, n_blocks)](
            codes.contiguous(), dims.to(torch.int32).contiguous(), q_scaled.float().contiguous(),
            mid_start, mid_end, out, maxima, n_kv_heads, n_keys, head_dim, n_packed, group,
            n_channels, n_blocks, BLOCK_G=block_g, BLOCK_C=block_c, BLOCK_N=block_n,
            PTX=_ptx(codes.device), num_warps=SCORE_WARPS)
    return (out, maxima) if block_max else out


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
    out = torch.empty((batch, n_kv_heads, group, n_cand), dtype=torch.float32, device=q.device)
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
