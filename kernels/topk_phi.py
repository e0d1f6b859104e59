"""Triton kernels for Top-K + phi decoding (docs/ALGORITHMS.md, section 2; math in
:mod:`macopt.kernels.topk_phi_reference`, shapes and conventions as there).

Prefill:
- :func:`build_summary`: the max-shifted mid-region summary ``(m, u~, T~)`` per (row, KV head),
  one pass over the mid keys (split over programs, partial summaries merged by their max shift).
- :func:`build_page_bounds`: elementwise min / max of each page's mid keys (Quest style).

Decode (no host sync: lengths, ranges and selections stay on the device):
- :func:`select_pages`: a Triton kernel scores every page by an upper bound of ``s q.k``, then
  one more (:mod:`macopt.kernels.page_select`) keeps the best pages per KV head and writes their
  token indices.
- :func:`topk_phi_decode_state` / :func:`topk_phi_decode`: one split-KV pass over sinks + tail +
  generated + retrieved keys (exact state), which also accumulates the retrieved keys' feature
  share from the K/V tiles it already holds; a second kernel merges the splits, builds the
  completion state from the summary minus that share, and merges the two.

Selection is per KV head (``selected[B, Hkv, K]``): a K/V tile is then read once for its whole
query group, as in exact decode. The subtraction is split as the math allows: ``u~_R`` per
feature (clamped to ``eps``, as in the reference) from a ``[F]`` accumulator, and
``sum_f phi_q[f] e^{m[f]} T~_R[f]`` as the summary's numerator minus ``sum_i <phi_q, phi_k(k_i)>
v_i`` (a ``[g, D]`` accumulator, not a ``[F, D]`` one). ``log phi_q`` is an input (a tiny batched
matmul that the caller runs, e.g. :func:`macopt.kernels.feature_maps.log_features`); ``phi_k`` is
evaluated in-kernel from its :class:`~macopt.kernels.feature_maps.FoldedFeatureMap`.

>>> summary = build_summary(k, v, phi_k, mid_start, mid_end)
>>> bounds = build_page_bounds(k, mid_start, mid_end, page_size=32)
>>> selected = select_pages(q, bounds, mid_start, mid_end, 32, scale, n_selected=80)
>>> out = topk_phi_decode(q, k, v, scale, starts, ends, summary, selected, log_phi_q, phi_k)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from macopt.kernels.attention_tile import load_kv_tile, online_softmax_update
from macopt.kernels.feature_maps import FoldedFeatureMap
from macopt.kernels.launch import interpreting, multiprocessor_count
from macopt.kernels.page_select import select_page_tokens
from macopt.kernels.topk_phi_reference import GroupCounts, PageBounds, PhiSummary

Tensor = torch.Tensor

# Every output and workspace buffer comes from here; tests swap in a NaN-filling allocator to
# prove that the kernels write every element.
_new_empty = torch.empty

_LOG2_E = 1.4426950408889634
# For half-precision inputs, the key features' products run on fp16 tensor cores (see
# _log_features_of), in the prefill summary and in the decode kernel alike: decoding subtracts
# the retrieved keys' features from the summary, so both sides must round the same way (they
# did not at first: 10x the output error of the tf32 path on the H100). Measured on the H100
# (BENCHMARKS.md 3d; batch 16, 128K, page 2%): 0.48 ms a step against 0.69 with tf32
# features, worst kernel-test error 0.0036 for both.
HALF_FEATURES = True
# The products that weigh values by features (the summary's T~ and the decode kernel's
# subtracted share) for half-precision inputs; fp32 inputs use "ieee". 3xTF32 cut the worst
# kernel-test error to 0.0013 but made the step 1.55x slower (same measurement).
SHARE_PRECISION = "tf32"
_LN_2 = tl.constexpr(0.6931471805599453)
_MAX_SPLITS = 64
# Pipeline stages of the decode launch: 2 against Triton's default 3 took 292 vs 305 us at 128K,
# batch 16, 2% (28.6 vs 30.4 at batch 1) on the H100; every other tile, warp or feature-chunk
# variant tried was slower (BENCHMARKS.md 12).
_DECODE_STAGES = 2
# The retrieved keys' feature share in a launch of its own (split over the retrieved keys
# alone) instead of from the attention launch's tiles: the fused launch holds the feature
# weights and products beside the softmax state (255 registers, spills, two programs an SM on
# sm_90a) and ran at ~0.6 TB/s (BENCHMARKS.md 15b, 16); apart, the attention is plain split-KV
# decode and the share re-reads the retrieved K/V (a 50th of the cache at 2%).
SEPARATE_SHARE = True  # 243 against 287 us at 128K, batch 16, page 2% on an H100 (BENCHMARKS 16)
SHARE_WARPS = 4
SHARE_BLOCK_N = None  # retrieved keys per tile of the share launch (None: the attention's)


@triton.jit
def _feature_weights_tile(
    head, lin_w_ptr, lin_b_ptr, in_w_ptr, in_b_ptr, out_w_ptr, sq_norm_ptr,
    head_dim, d_phi, width, f_offset,
    HAS_MLP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """One head's folded feature-map weights for features ``f_offset + [0, BLOCK_F)``, loaded
    once so that a loop over key tiles does not re-read them (zeros where padded)."""
    dims = tl.arange(0, BLOCK_D)
    feats = f_offset + tl.arange(0, BLOCK_F)
    dim_ok = dims < head_dim
    feat_ok = feats < d_phi
    lin_w = tl.load(lin_w_ptr + (head * d_phi + feats[None, :]) * head_dim + dims[:, None],
                    mask=dim_ok[:, None] & feat_ok[None, :], other=0.0)
    lin_b = tl.load(lin_b_ptr + head * d_phi + feats, mask=feat_ok, other=0.0)
    hid = tl.arange(0, BLOCK_E)
    hid_ok = (hid < width) & HAS_MLP
    in_w = tl.load(in_w_ptr + (head * width + hid[None, :]) * head_dim + dims[:, None],
                   mask=dim_ok[:, None] & hid_ok[None, :], other=0.0)
    in_b = tl.load(in_b_ptr + head * width + hid, mask=hid_ok, other=0.0)
    out_w = tl.load(out_w_ptr + (head * d_phi + feats[None, :]) * width + hid[:, None],
                    mask=hid_ok[:, None] & feat_ok[None, :], other=0.0)
    sq_norm = tl.load(sq_norm_ptr + head)
    return lin_w, lin_b, in_w, in_b, out_w, sq_norm


@triton.jit
def _log_features_of(
    x, lin_w, lin_b, in_w, in_b, out_w, sq_norm,
    HAS_MLP: tl.constexpr, PRECISION: tl.constexpr, HALF: tl.constexpr = False,
):
    """``log phi(x)`` of fp32 rows ``x[BN, BLOCK_D]`` from weights of
    :func:`_feature_weights_tile`; padded features come out finite, callers mask them.

    PRECISION is "ieee" for fp32 keys; for bf16/fp16 keys "tf32" already carries more bits than
    the keys, and errors in log phi become relative errors of the features. ``HALF``: the
    weights arrive as fp16 and the products run on fp16 tensor cores (fp16 keeps tf32's 10
    mantissa bits and holds bf16 keys' values; fp32 accumulation)."""
    if HALF:
        x_dot = x.to(tl.float16)
    else:
        x_dot = x
    out = tl.dot(x_dot, lin_w, input_precision=PRECISION) + lin_b[None, :]
    if HAS_MLP:
        pre = tl.dot(x_dot, in_w, input_precision=PRECISION) + in_b[None, :]
        act = 0.5 * pre * (1.0 + tl.erf(pre * 0.7071067811865476))  # exact GELU
        if HALF:
            act = act.to(tl.float16)
        out += tl.dot(act, out_w, input_precision=PRECISION)
    return out - sq_norm * tl.sum(x * x, axis=1)[:, None]


@triton.jit
def _log_features(
    x, head, lin_w_ptr, lin_b_ptr, in_w_ptr, in_b_ptr, out_w_ptr, sq_norm_ptr,
    head_dim, d_phi, width, f_offset,
    HAS_MLP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr,
    HALF: tl.constexpr = False,
):
    """``log phi(x)``: load the weights, then :func:`_log_features_of`."""
    lin_w, lin_b, in_w, in_b, out_w, sq_norm = _feature_weights_tile(
        head, lin_w_ptr, lin_b_ptr, in_w_ptr, in_b_ptr, out_w_ptr, sq_norm_ptr, head_dim, d_phi,
        width, f_offset, HAS_MLP, BLOCK_D, BLOCK_F, BLOCK_E)
    if HALF:
        lin_w, in_w, out_w = lin_w.to(tl.float16), in_w.to(tl.float16), out_w.to(tl.float16)
    return _log_features_of(x, lin_w, lin_b, in_w, in_b, out_w, sq_norm, HAS_MLP, PRECISION,
                            HALF)


@triton.jit
def _completion_logits(log_phi_q_ptr, m_ptr, q_rows, row_ok, kv_pid, feats, d_phi):
    """``log phi_q[g, f] + m[f]`` for a chunk of features; -inf where masked."""
    feat_ok = feats < d_phi
    log_phi_q = tl.load(log_phi_q_ptr + q_rows[:, None].to(tl.int64) * d_phi + feats[None, :],
                        mask=row_ok[:, None] & feat_ok[None, :], other=float("-inf"))
    m = tl.load(m_ptr + kv_pid.to(tl.int64) * d_phi + feats, mask=feat_ok, other=float("-inf"))
    return log_phi_q + m[None, :]


@triton.jit
def _summary_split_kernel(
    k_ptr, v_ptr, mid_start_ptr, mid_end_ptr,
    lin_w_ptr, lin_b_ptr, in_w_ptr, in_b_ptr, out_w_ptr, sq_norm_ptr,
    m_ptr, u_ptr, t_ptr,
    n_kv_heads, n_keys, head_dim, d_phi, width, num_splits,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    HAS_MLP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr,
    HALF: tl.constexpr = False, SHARE_PRECISION: tl.constexpr = "ieee",
):
    # A program owns one (row, KV head, split of the mid region, block of BLOCK_F features) and
    # streams [BLOCK_N, D] K/V tiles once, keeping (m, u~, T~) for its features max-shifted.
    kv_pid = tl.program_id(0)
    split = tl.program_id(1)
    f_offset = tl.program_id(2) * BLOCK_F
    batch = (kv_pid // n_kv_heads).to(tl.int64)
    kv_head = (kv_pid % n_kv_heads).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    feats = f_offset + tl.arange(0, BLOCK_F)
    dim_ok = dims < head_dim
    feat_ok = feats < d_phi

    lo = tl.maximum(tl.load(mid_start_ptr + batch).to(tl.int32), 0)
    hi = tl.minimum(tl.load(mid_end_ptr + batch).to(tl.int32), n_keys)
    chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), num_splits), BLOCK_N) * BLOCK_N
    split_lo = lo + split * chunk
    split_hi = tl.minimum(split_lo + chunk, hi)

    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    m = tl.full([BLOCK_F], float("-inf"), tl.float32)
    u = tl.zeros([BLOCK_F], tl.float32)
    t = tl.zeros([BLOCK_F, BLOCK_D], tl.float32)
    for block_start in range(split_lo, split_hi, BLOCK_N):
        keys = block_start + tl.arange(0, BLOCK_N)
        key_ok = keys < split_hi
        keys64 = keys.to(tl.int64)
        tile_ok = key_ok[:, None] & dim_ok[None, :]
        x = tl.load(k_base + keys64[:, None] * stride_kn + dims[None, :] * stride_kd,
                    mask=tile_ok, other=0.0).to(tl.float32)
        vals = tl.load(v_base + keys64[:, None] * stride_vn + dims[None, :] * stride_vd,
                       mask=tile_ok, other=0.0).to(tl.float32)
        log_phi = _log_features(x, kv_head, lin_w_ptr, lin_b_ptr, in_w_ptr, in_b_ptr, out_w_ptr,
                                sq_norm_ptr, head_dim, d_phi, width, f_offset,
                                HAS_MLP, DOT_PRECISION, BLOCK_D, BLOCK_F, BLOCK_E, HALF)
        log_phi = tl.where(key_ok[:, None] & feat_ok[None, :], log_phi, float("-inf"))
        new_m = tl.maximum(m, tl.max(log_phi, axis=0))
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)
        rescale = tl.exp(m - shift)
        weights = tl.exp(log_phi - shift[None, :])
        u = u * rescale + tl.sum(weights, axis=0)
        # The precision of the decode kernel's subtracted share (SHARE_PRECISION).
        t = t * rescale[:, None] + tl.dot(tl.trans(weights), vals,
                                          input_precision=SHARE_PRECISION)
        m = new_m

    part = (kv_pid * num_splits + split).to(tl.int64) * d_phi
    tl.store(m_ptr + part + feats, m, mask=feat_ok)
    tl.store(u_ptr + part + feats, u, mask=feat_ok)
    tl.store(t_ptr + (part + feats[:, None]) * head_dim + dims[None, :], t,
             mask=feat_ok[:, None] & dim_ok[None, :])


@triton.jit
def _page_bounds_kernel(
    k_ptr, mid_start_ptr, mid_end_ptr, kmin_ptr, kmax_ptr,
    n_kv_heads, n_keys, n_pages, head_dim,
    stride_kb, stride_kh, stride_kn, stride_kd,
    PAGE_SIZE: tl.constexpr, PAGES_PER_PROGRAM: tl.constexpr,
    BLOCK_PAGE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # A program owns PAGES_PER_PROGRAM consecutive pages of one (row, KV head); each page is one
    # [PAGE_SIZE, D] tile reduced to its elementwise min and max over the mid keys.
    kv_pid = tl.program_id(0)
    batch = (kv_pid // n_kv_heads).to(tl.int64)
    kv_head = (kv_pid % n_kv_heads).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    lo = tl.load(mid_start_ptr + batch).to(tl.int32)
    hi = tl.minimum(tl.load(mid_end_ptr + batch).to(tl.int32), n_keys)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    for i in range(PAGES_PER_PROGRAM):
        page = tl.program_id(1) * PAGES_PER_PROGRAM + i
        offsets = tl.arange(0, BLOCK_PAGE)
        keys = page * PAGE_SIZE + offsets
        key_ok = (offsets < PAGE_SIZE) & (keys >= lo) & (keys < hi)
        x = tl.load(k_base + keys.to(tl.int64)[:, None] * stride_kn + dims[None, :] * stride_kd,
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        kmin = tl.min(tl.where(key_ok[:, None], x, float("inf")), axis=0)
        kmax = tl.max(tl.where(key_ok[:, None], x, float("-inf")), axis=0)
        has_keys = tl.sum(key_ok.to(tl.int32), axis=0) > 0
        out = (kv_pid.to(tl.int64) * n_pages + page) * head_dim + dims
        store_ok = dim_ok & (page + tl.zeros([BLOCK_D], tl.int32) < n_pages)
        tl.store(kmin_ptr + out, tl.where(has_keys, kmin, 0.0), mask=store_ok)
        tl.store(kmax_ptr + out, tl.where(has_keys, kmax, 0.0), mask=store_ok)


@triton.jit
def _page_scores_kernel(
    q_ptr, kmin_ptr, kmax_ptr, mid_start_ptr, mid_end_ptr, scores_ptr,
    n_kv_heads, n_pages, group, head_dim, scale,
    stride_qb, stride_qh, stride_qd,
    PAGE_SIZE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    skip_ptr=None, HAS_SKIP: tl.constexpr = False,
):
    # A program scores BLOCK_P pages of one (row, KV head) for the whole query group:
    # max_k q.k <= q+ . kmax + q- . kmin, two [g, D] x [D, BLOCK_P] products.
    kv_pid = tl.program_id(0)
    batch = (kv_pid // n_kv_heads).to(tl.int64)
    kv_head = (kv_pid % n_kv_heads).to(tl.int64)
    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < group
    q_heads = kv_head * group + rows
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    pages = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    page_ok = pages < n_pages

    q_tile = batch * stride_qb + q_heads[:, None] * stride_qh + dims[None, :] * stride_qd
    q = tl.load(q_ptr + q_tile, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    tile = (kv_pid.to(tl.int64) * n_pages + pages[:, None]) * head_dim + dims[None, :]
    tile_ok = page_ok[:, None] & dim_ok[None, :]
    if HAS_SKIP:  # a skipped group reads no bounds; its pages score -inf
        # (the flag loaded per page: a scalar bool in a mask trips Triton's interpreter)
        read_ok = page_ok & (tl.load(skip_ptr + kv_pid + pages * 0) == 0)
        tile_ok = read_ok[:, None] & dim_ok[None, :]
    kmin = tl.load(kmin_ptr + tile, mask=tile_ok, other=0.0)
    kmax = tl.load(kmax_ptr + tile, mask=tile_ok, other=0.0)
    if UPCAST:
        q, kmin, kmax = q.to(tl.float32), kmin.to(tl.float32), kmax.to(tl.float32)
    q_pos = tl.maximum(q, 0.0).to(kmax.dtype)
    q_neg = tl.minimum(q, 0.0).to(kmin.dtype)
    bound = tl.dot(q_pos, tl.trans(kmax), input_precision=DOT_PRECISION)
    bound += tl.dot(q_neg, tl.trans(kmin), input_precision=DOT_PRECISION)

    lo = tl.load(mid_start_ptr + batch).to(tl.int32)
    hi = tl.load(mid_end_ptr + batch).to(tl.int32)
    first = pages * PAGE_SIZE
    has_mid = (first + PAGE_SIZE > lo) & (first < hi)
    if HAS_SKIP:
        has_mid = has_mid & read_ok
    bound = tl.where(has_mid[None, :], bound * scale, float("-inf"))
    out = (batch * n_kv_heads * group + q_heads[:, None]) * n_pages + pages[None, :]
    tl.store(scores_ptr + out, bound, mask=row_ok[:, None] & page_ok[None, :])


@triton.jit
def _query_features_kernel(
    x_ptr, out_ptr, lin_w_ptr, lin_b_ptr, in_w_ptr, in_b_ptr, out_w_ptr, sq_norm_ptr,
    n_rows, n_heads, head_dim, d_phi, width,
    stride_xb, stride_xh, stride_xd,
    HAS_MLP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # One program per (head, block of rows, block of features): the head's weights are read
    # once for its rows, and the products run in fp32 ("ieee"), as log_features' matmuls do.
    head = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    f_offset = tl.program_id(2) * BLOCK_F
    row_ok = rows < n_rows
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xb + head * stride_xh
                + dims[None, :] * stride_xd, mask=row_ok[:, None] & dim_ok[None, :],
                other=0.0).to(tl.float32)
    lin_w, lin_b, in_w, in_b, out_w, sq_norm = _feature_weights_tile(
        head, lin_w_ptr, lin_b_ptr, in_w_ptr, in_b_ptr, out_w_ptr, sq_norm_ptr, head_dim,
        d_phi, width, f_offset, HAS_MLP, BLOCK_D, BLOCK_F, BLOCK_E)
    out = _log_features_of(x, lin_w, lin_b, in_w, in_b, out_w, sq_norm, HAS_MLP, "ieee")
    feats = f_offset + tl.arange(0, BLOCK_F)
    tl.store(out_ptr + (rows[:, None].to(tl.int64) * n_heads + head) * d_phi + feats[None, :],
             out, mask=row_ok[:, None] & (feats < d_phi)[None, :])


def query_log_features(q: Tensor, phi_q: FoldedFeatureMap) -> Tensor:
    """``log phi_q(q)`` ``[B, Hq, F]`` fp32 of decode queries ``q[B, Hq, D]``: what
    :func:`macopt.kernels.feature_maps.log_features` computes, in one launch instead of the
    handful of small torch kernels (~17 us of a 0.24 ms step at batch 16 on the H200)."""
    batch, n_heads, head_dim = q.shape
    if phi_q.lin_w.shape[0] != n_heads or phi_q.lin_w.shape[2] != head_dim:
        raise ValueError(f"phi_q: expected lin_w [{n_heads}, d_phi, {head_dim}] (one map per "
                         f"query head), got {tuple(phi_q.lin_w.shape)}")
    d_phi, width = phi_q.lin_w.shape[1], phi_q.in_w.shape[1]
    out = _new_empty((batch, n_heads, d_phi), dtype=torch.float32, device=q.device)
    block_b, block_f = 16, min(_pow2(d_phi), 64)
    grid = (n_heads, triton.cdiv(batch, block_b), triton.cdiv(d_phi, block_f))
    _query_features_kernel[grid](
        q, out, *_feature_weights(phi_q, q.device), batch, n_heads, head_dim, d_phi, width,
        *q.stride(), HAS_MLP=phi_q.has_mlp, BLOCK_B=block_b, BLOCK_D=_pow2(head_dim),
        BLOCK_F=block_f, BLOCK_E=_pow2(width), num_warps=4,
    )
    return out


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, starts_ptr, ends_ptr, mid_start_ptr, mid_end_ptr, sel_ptr,
    log_phi_q_ptr, m_ptr,
    lin_w_ptr, lin_b_ptr, in_w_ptr, in_b_ptr, out_w_ptr, sq_norm_ptr,
    o_ptr, lse_ptr, sub_u_ptr, sub_n_ptr,
    qk_scale_log2, n_kv_heads, n_keys, n_selected, group, head_dim, d_phi, width, num_splits,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_sb, stride_sh, stride_sk,
    HAS_MLP: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HALF: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr, SHARE_PRECISION: tl.constexpr = "ieee",
    skip_ptr=None, HAS_SKIP: tl.constexpr = False,
    ATTEND: tl.constexpr = True, SHARE: tl.constexpr = True,
):
    # A program owns one (row, KV head, split) of the exact key list [sinks | tail + generated |
    # retrieved]; each [BLOCK_N, D] K/V tile serves the whole query group, and tiles holding
    # retrieved keys also feed the [F] and [g, D] subtraction accumulators.
    # ATTEND / SHARE: the exact state, the retrieved keys' feature share, or both from the same
    # tiles. A SHARE-only launch splits the retrieved keys alone; an ATTEND-only one carries
    # no feature weights (their registers and the feature products limit the fused launch's
    # occupancy: 255 registers with spills at 64 keys, 4 warps on sm_90a).
    kv_pid = tl.program_id(0)
    split = tl.program_id(1)
    batch = (kv_pid // n_kv_heads).to(tl.int64)
    kv_head = (kv_pid % n_kv_heads).to(tl.int64)
    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < group
    q_heads = kv_head * group + rows
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    feats = tl.arange(0, BLOCK_F)
    feat_ok = feats < d_phi

    start = tl.maximum(tl.load(starts_ptr + batch).to(tl.int32), 0)
    end = tl.minimum(tl.load(ends_ptr + batch).to(tl.int32), n_keys)
    lo = tl.load(mid_start_ptr + batch).to(tl.int32)
    hi = tl.load(mid_end_ptr + batch).to(tl.int32)
    n_sinks = tl.maximum(tl.minimum(lo, end) - start, 0)
    after_mid = tl.maximum(hi, start)
    n_exact = n_sinks + tl.maximum(end - after_mid, 0)
    total = n_exact + n_selected
    if HAS_SKIP:  # a skipped group attends nothing: its splits store empty states
        total = tl.where(tl.load(skip_ptr + kv_pid) != 0, 0, total)
    first = 0 if ATTEND else n_exact  # a share-only launch starts at the retrieved keys
    chunk = tl.cdiv(tl.cdiv(tl.maximum(total - first, 0), num_splits), BLOCK_N) * BLOCK_N
    split_lo = first + split * chunk
    split_hi = tl.minimum(split_lo + chunk, total)

    q_tile = batch * stride_qb + q_heads[:, None] * stride_qh + dims[None, :] * stride_qd
    q = tl.load(q_ptr + q_tile, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if SHARE:
        # Completion weights P[g, f] = phi_q[f] e^{m[f]} / e^{M_g}, M_g = max_f log of the same.
        log_phi_q = tl.load(log_phi_q_ptr + (batch * n_kv_heads * group + q_heads[:, None])
                            * d_phi + feats[None, :], mask=row_ok[:, None] & feat_ok[None, :],
                            other=float("-inf"))
        m = tl.load(m_ptr + kv_pid.to(tl.int64) * d_phi + feats, mask=feat_ok,
                    other=float("-inf"))
        m_shift = tl.where(m == float("-inf"), 0.0, m)
        shifted = log_phi_q + m[None, :]
        top = tl.max(shifted, axis=1)
        completion_w = tl.exp(shifted - tl.where(top == float("-inf"), 0.0, top)[:, None])

        # The feature map's weights are loop-invariant: read once, not once per retrieved tile
        # (64 KB at D = F = 128; on the H100 a retrieved key cost ~15x a streamed one with the
        # per-tile re-read).
        lin_w, lin_b, in_w, in_b, out_w, sq_norm = _feature_weights_tile(
            kv_head, lin_w_ptr, lin_b_ptr, in_w_ptr, in_b_ptr, out_w_ptr, sq_norm_ptr, head_dim,
            d_phi, width, 0, HAS_MLP, BLOCK_D, BLOCK_F, BLOCK_E)
        if HALF:  # half-precision keys: the feature products on fp16 tensor cores (see above)
            lin_w, in_w, out_w = (lin_w.to(tl.float16), in_w.to(tl.float16),
                                  out_w.to(tl.float16))
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    sel_base = sel_ptr + batch * stride_sb + kv_head * stride_sh
    running_max = tl.full([BLOCK_G], float("-inf"), tl.float32)  # log2 units
    running_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    sub_u = tl.zeros([BLOCK_F], tl.float32)
    sub_n = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for block_start in range(split_lo, split_hi, BLOCK_N):
        slots = block_start + tl.arange(0, BLOCK_N)
        in_split = slots < split_hi
        is_sel = slots >= n_exact
        sel = tl.load(sel_base + (slots - n_exact) * stride_sk, mask=in_split & is_sel, other=-1)
        sel_ok = (sel >= lo) & (sel < hi) & (sel >= start) & (sel < end)
        keys = tl.where(slots < n_sinks, start + slots,
                        tl.where(is_sel, sel, after_mid + slots - n_sinks))
        key_ok = in_split & (sel_ok | ~is_sel)
        keys64 = keys.to(tl.int64)
        tile_ok = key_ok[:, None] & dim_ok[None, :]
        k, v = load_kv_tile(k_base, v_base, keys64, tile_ok, dims, stride_kn, stride_kd,
                            stride_vn, stride_vd, UPCAST)
        if ATTEND:
            running_max, running_sum, acc = online_softmax_update(
                q, k, v, key_ok[None, :], running_max, running_sum, acc, qk_scale_log2,
                DOT_PRECISION)

        if SHARE and block_start + BLOCK_N > n_exact:  # the tile holds retrieved keys
            log_phi_k = _log_features_of(k.to(tl.float32), lin_w, lin_b, in_w, in_b, out_w,
                                         sq_norm, HAS_MLP, DOT_PRECISION, HALF)
            retrieved = (key_ok & is_sel)[:, None] & feat_ok[None, :]
            weights = tl.where(retrieved, tl.exp(log_phi_k - m_shift[None, :]), 0.0)
            sub_u += tl.sum(weights, axis=0)
            # Subtracted from the summary's numerator, where what is left can be a small
            # difference of large terms: the summary's T~ uses the same precision.
            kernel_w = tl.dot(completion_w, tl.trans(weights), input_precision=SHARE_PRECISION)
            sub_n += tl.dot(kernel_w, v.to(tl.float32), input_precision=SHARE_PRECISION)

    part_rows = ((batch * n_kv_heads * group + q_heads) * num_splits + split).to(tl.int64)
    row_tile = part_rows[:, None] * head_dim + dims[None, :]
    row_tile_ok = row_ok[:, None] & dim_ok[None, :]
    if ATTEND:
        has_keys = running_sum > 0
        o = acc / tl.where(has_keys, running_sum, 1.0)[:, None]
        lse = tl.where(has_keys,
                       (running_max + tl.log2(tl.where(has_keys, running_sum, 1.0))) * _LN_2,
                       float("-inf"))
        tl.store(o_ptr + row_tile, o, mask=row_tile_ok)
        tl.store(lse_ptr + part_rows, lse, mask=row_ok)
    if SHARE:
        tl.store(sub_n_ptr + row_tile, sub_n, mask=row_tile_ok)
        tl.store(sub_u_ptr + (kv_pid * num_splits + split).to(tl.int64) * d_phi + feats, sub_u,
                 mask=feat_ok)


@triton.jit
def _complete_kernel(
    o_parts_ptr, lse_parts_ptr, sub_u_ptr, sub_n_ptr, log_phi_q_ptr, m_ptr, u_ptr, t_ptr,
    completion_ptr, out_ptr, out_lse_ptr,
    n_kv_heads, group, head_dim, d_phi, num_splits, share_splits, eps,
    stride_ob, stride_oh, stride_od,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_S: tl.constexpr,
    skip_ptr=None, HAS_SKIP: tl.constexpr = False,
):
    # A program owns one (row, KV head, block of BLOCK_D output dims): it merges the splits'
    # exact states (num_splits) and sums their feature shares (share_splits: as many when one
    # launch made both), then builds the completion state in BLOCK_F feature chunks ([g, F] x
    # [F, BLOCK_D] against T~) and merges both. The per-row scalars (lse, mass) are the same
    # in every dim block; the first one stores the lse.
    kv_pid = tl.program_id(0)
    dim_block = tl.program_id(1)
    batch = (kv_pid // n_kv_heads).to(tl.int64)
    kv_head = (kv_pid % n_kv_heads).to(tl.int64)
    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < group
    q_rows = batch * n_kv_heads * group + kv_head * group + rows  # flat (row, query head)
    dims = dim_block * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    row_tile_ok = row_ok[:, None] & dim_ok[None, :]

    n_splits, n_shares, n_features = num_splits, share_splits, d_phi
    if HAS_SKIP:  # a skipped group reads no split and no summary: it stores the empty state
        skipped = tl.load(skip_ptr + kv_pid) != 0
        n_splits = tl.where(skipped, 0, num_splits)
        n_shares = tl.where(skipped, 0, share_splits)
        n_features = tl.where(skipped, 0, d_phi)
    run_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    sub_n = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for split in range(n_splits):
        part = (q_rows * num_splits + split).to(tl.int64)
        tile = part[:, None] * head_dim + dims[None, :]
        lse_s = tl.load(lse_parts_ptr + part, mask=row_ok, other=float("-inf"))
        new_max = tl.maximum(run_max, lse_s)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(run_max - shift)
        weight = tl.exp(lse_s - shift)
        run_sum = run_sum * rescale + weight
        acc = acc * rescale[:, None] + weight[:, None] * tl.load(o_parts_ptr + tile,
                                                               mask=row_tile_ok, other=0.0)
        run_max = new_max
    for split in range(n_shares):
        part = (q_rows * share_splits + split).to(tl.int64)
        sub_n += tl.load(sub_n_ptr + part[:, None] * head_dim + dims[None, :], mask=row_tile_ok,
                         other=0.0)
    exact_ok = run_sum > 0
    lse_exact = tl.where(exact_ok, run_max + tl.log(tl.where(exact_ok, run_sum, 1.0)),
                         float("-inf"))
    o_exact = acc / tl.where(exact_ok, run_sum, 1.0)[:, None]

    # Same shift M_g as the split kernel (a max: exact whatever the chunking).
    top = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for f_start in range(0, n_features, BLOCK_F):
        feats = f_start + tl.arange(0, BLOCK_F)
        shifted = _completion_logits(log_phi_q_ptr, m_ptr, q_rows, row_ok, kv_pid, feats, d_phi)
        top = tl.maximum(top, tl.max(shifted, axis=1))
    top_shift = tl.where(top == float("-inf"), 0.0, top)

    mass = tl.zeros([BLOCK_G], tl.float32)
    numer = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    splits = tl.arange(0, BLOCK_S)
    for f_start in range(0, n_features, BLOCK_F):
        feats = f_start + tl.arange(0, BLOCK_F)
        feat_ok = feats < d_phi
        shifted = _completion_logits(log_phi_q_ptr, m_ptr, q_rows, row_ok, kv_pid, feats, d_phi)
        weights = tl.exp(shifted - top_shift[:, None])
        sub_u = tl.load(sub_u_ptr + (kv_pid * share_splits + splits[:, None]).to(tl.int64)
                        * d_phi + feats[None, :],
                        mask=(splits < share_splits)[:, None] & feat_ok[None, :], other=0.0)
        u = tl.load(u_ptr + kv_pid.to(tl.int64) * d_phi + feats, mask=feat_ok, other=0.0)
        u_rest = tl.maximum(u - tl.sum(sub_u, axis=0), eps)  # rounding can empty a feature
        mass += tl.sum(weights * u_rest[None, :], axis=1)
        t = tl.load(t_ptr + (kv_pid.to(tl.int64) * d_phi + feats[:, None]) * head_dim
                    + dims[None, :], mask=feat_ok[:, None] & dim_ok[None, :],
                    other=0.0)
        numer += tl.dot(weights, t, input_precision="ieee")

    enabled = tl.load(completion_ptr + kv_head * group + rows, mask=row_ok, other=0) != 0
    has_completion = enabled & (mass > 0)
    safe_mass = tl.where(has_completion, mass, 1.0)
    lse_c = tl.where(has_completion, top_shift + tl.log(safe_mass), float("-inf"))
    o_c = (numer - sub_n) / safe_mass[:, None]

    both_max = tl.maximum(lse_exact, lse_c)
    shift = tl.where(both_max == float("-inf"), 0.0, both_max)
    w_exact = tl.exp(lse_exact - shift)
    w_c = tl.exp(lse_c - shift)
    total = w_exact + w_c
    safe_total = tl.where(total > 0, total, 1.0)
    o = (w_exact[:, None] * o_exact + w_c[:, None] * o_c) / safe_total[:, None]
    lse = tl.where(total > 0, shift + tl.log(safe_total), float("-inf"))
    heads = kv_head * group + rows
    tl.store(out_ptr + batch * stride_ob + heads[:, None] * stride_oh + dims[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=row_tile_ok)
    if dim_block == 0:
        tl.store(out_lse_ptr + q_rows, lse, mask=row_ok)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _share_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else SHARE_PRECISION


def _half_features(dtype: torch.dtype) -> bool:
    """Whether the key features run on fp16 tensor cores; the summary and the decode kernel
    must agree, since decoding subtracts the retrieved keys' features from the summary."""
    return HALF_FEATURES and dtype in (torch.float16, torch.bfloat16)


def _pow2(n: int, least: int = 16) -> int:
    """Tile extent for a runtime size: tl.dot needs powers of two of at least 16."""
    return max(least, triton.next_power_of_2(n))


def _num_splits(programs: int, n_items: int, block_n: int, device: torch.device) -> int:
    """Splits per (row, KV head) from static sizes: ~4 programs per SM, >= 2 blocks a split."""
    splits = triton.cdiv(4 * multiprocessor_count(device), max(programs, 1))
    return max(1, min(splits, triton.cdiv(n_items, 2 * block_n), _MAX_SPLITS))


def _complete_dim_block(programs: int, block_d: int, device: torch.device) -> int:
    """Output dims per completion program: all of them once (row, KV head) programs fill the
    SMs; else quarters (at least 16, for tl.dot). At batch 1 its 8 programs took 19 us beside
    the attention launch's 29 on the H100 (BENCHMARKS.md 12d)."""
    if programs >= multiprocessor_count(device):
        return block_d
    return max(16, block_d // 4)


def _block_n(head_dim: int, element_size: int) -> int:
    # As exact decode: a K + V stage of 64 keys is 32 KB at D = 128 in bf16; wider rows halve it.
    return 64 if 2 * triton.next_power_of_2(head_dim) * element_size <= 512 else 32


def _feature_weights(phi_k: FoldedFeatureMap, device: torch.device) -> list[Tensor]:
    """The folded map's tensors as contiguous fp32 (no copy when they already are)."""
    names = ("lin_w", "lin_b", "in_w", "in_b", "out_w", "sq_norm")
    return [getattr(phi_k, name).to(device=device, dtype=torch.float32).contiguous()
            for name in names]


def _check_feature_map(phi_k: FoldedFeatureMap, n_kv_heads: int, head_dim: int) -> None:
    if phi_k.lin_w.shape[0] != n_kv_heads or phi_k.lin_w.shape[2] != head_dim:
        raise ValueError(
            f"phi_k: expected lin_w [{n_kv_heads}, d_phi, {head_dim}] (one map per KV head), "
            f"got {tuple(phi_k.lin_w.shape)}"
        )


def build_summary(
    k: Tensor, v: Tensor, phi_k: FoldedFeatureMap, mid_start: Tensor, mid_end: Tensor,
    num_splits: int | None = None, block_f: int = 64,
) -> PhiSummary:
    """Summary ``(m, u~, T~)`` (fp32) of the mid keys ``[mid_start[b], mid_end[b])``.

    ``k, v[B, Hkv, N, D]``; ``phi_k`` holds one map per KV head (``FeatureMap.folded()``).
    An empty mid region gives ``m = -inf``, ``u~ = 0``, ``T~ = 0``.

    >>> summary = build_summary(k, v, maps.phi_k.folded(), mid_start, mid_end)
    """
    batch, n_kv_heads, n_keys, head_dim = k.shape
    _check_feature_map(phi_k, n_kv_heads, head_dim)
    d_phi, width = phi_k.lin_w.shape[1], phi_k.in_w.shape[1]
    block_n = _block_n(head_dim, k.element_size())
    if num_splits is None:
        num_splits = _num_splits(batch * n_kv_heads, n_keys, block_n, k.device)
    block_f = min(_pow2(block_f), _pow2(d_phi))
    parts = [_new_empty((batch, n_kv_heads, num_splits, *tail), dtype=torch.float32,
                        device=k.device) for tail in ((d_phi,), (d_phi,), (d_phi, head_dim))]
    grid = (batch * n_kv_heads, num_splits, triton.cdiv(d_phi, block_f))
    _summary_split_kernel[grid](
        k, v, mid_start, mid_end, *_feature_weights(phi_k, k.device), *parts,
        n_kv_heads, n_keys, head_dim, d_phi, width, num_splits,
        *k.stride(), *v.stride(),
        HAS_MLP=phi_k.has_mlp, DOT_PRECISION=_dot_precision(k.dtype),
        BLOCK_N=block_n, BLOCK_D=_pow2(head_dim), BLOCK_F=block_f, BLOCK_E=_pow2(width),
        HALF=_half_features(k.dtype), SHARE_PRECISION=_share_precision(k.dtype), num_warps=8,
    )
    m, u, t = _merge_summary_parts(*parts)
    return PhiSummary(m, u, t, mid_start, mid_end)


def _merge_summary_parts(m: Tensor, u: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge per-split summaries ``[B, Hkv, S, ...]`` by re-shifting each to the joint max."""
    if m.shape[2] == 1:
        return m[:, :, 0], u[:, :, 0], t[:, :, 0]
    joint = m.amax(dim=2, keepdim=True)
    shift = torch.where(torch.isinf(joint), torch.zeros_like(joint), joint)
    rescale = torch.exp(m - shift)  # 0 for an empty split
    return joint.squeeze(2), (u * rescale).sum(2), (t * rescale[..., None]).sum(2)


def build_page_bounds(k: Tensor, mid_start: Tensor, mid_end: Tensor, page_size: int,
                      pages_per_program: int = 8, out: PageBounds | None = None) -> PageBounds:
    """Elementwise min / max (``k.dtype``) of each page's mid keys, ``[B, Hkv, n_pages, D]``.

    ``out``: contiguous buffers to write (per-site state at static addresses), else new ones.

    >>> bounds = build_page_bounds(k, mid_start, mid_end, page_size=32)
    """
    batch, n_kv_heads, n_keys, head_dim = k.shape
    n_pages = triton.cdiv(n_keys, page_size)
    if out is None:
        out = PageBounds(*(_new_empty((batch, n_kv_heads, n_pages, head_dim), dtype=k.dtype,
                                      device=k.device) for _ in range(2)))
    kmin, kmax = out
    if kmin.shape != (batch, n_kv_heads, n_pages, head_dim) or not kmin.is_contiguous():
        raise ValueError(f"out: expected contiguous [{batch}, {n_kv_heads}, {n_pages}, "
                         f"{head_dim}] bounds, got {tuple(kmin.shape)}")
    pages_per_program = min(pages_per_program, n_pages)
    grid = (batch * n_kv_heads, triton.cdiv(n_pages, pages_per_program))
    _page_bounds_kernel[grid](
        k, mid_start, mid_end, kmin, kmax, n_kv_heads, n_keys, n_pages, head_dim, *k.stride(),
        PAGE_SIZE=page_size, PAGES_PER_PROGRAM=pages_per_program,
        BLOCK_PAGE=triton.next_power_of_2(page_size), BLOCK_D=_pow2(head_dim),
    )
    return PageBounds(kmin, kmax)


def page_scores(q: Tensor, bounds: PageBounds, mid_start: Tensor, mid_end: Tensor,
                page_size: int, scale: float, block_p: int = 64,
                skip: Tensor | None = None) -> Tensor:
    """Upper bound of ``scale * q.k`` over each page's mid keys, ``[B, Hq, n_pages]`` fp32;
    -inf for pages without mid keys. ``skip[B, Hkv]`` (uint8 or bool, optional): groups whose
    pages all score -inf without reading their bounds."""
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads, n_pages = bounds.kmin.shape[1], bounds.kmin.shape[2]
    group = n_q_heads // n_kv_heads
    scores = _new_empty((batch, n_q_heads, n_pages), dtype=torch.float32, device=q.device)
    block_p = min(_pow2(block_p), _pow2(n_pages))
    grid = (batch * n_kv_heads, triton.cdiv(n_pages, block_p))
    _page_scores_kernel[grid](
        q, bounds.kmin.contiguous(), bounds.kmax.contiguous(), mid_start, mid_end, scores,
        n_kv_heads, n_pages, group, head_dim, scale, *q.stride(),
        PAGE_SIZE=page_size, UPCAST=interpreting(), DOT_PRECISION=_dot_precision(q.dtype),
        BLOCK_G=_pow2(group), BLOCK_P=block_p, BLOCK_D=_pow2(head_dim),
        **_skip_args(skip, batch, n_kv_heads),
    )
    return scores


def _skip_args(skip: Tensor | None, batch: int, n_kv_heads: int) -> dict:
    """Kernel arguments of an optional per-(row, KV head) skip flag (HAS_SKIP False: the
    kernels compile exactly as without it)."""
    if skip is None:
        return {"HAS_SKIP": False}
    if skip.shape != (batch, n_kv_heads) or skip.dtype not in (torch.uint8, torch.bool):
        raise ValueError(f"skip: expected a uint8 or bool [{batch}, {n_kv_heads}] tensor, got "
                         f"{skip.dtype} {tuple(skip.shape)}")
    return {"skip_ptr": skip.contiguous().view(torch.uint8), "HAS_SKIP": True}


def select_pages(q: Tensor, bounds: PageBounds, mid_start: Tensor, mid_end: Tensor,
                 page_size: int, scale: float, n_selected: int,
                 skip: Tensor | None = None, counts: GroupCounts | None = None) -> Tensor:
    """Token indices ``[B, Hkv, min(n_selected, n_pages) * page_size]`` int32 of the best pages
    per KV head (see :func:`macopt.kernels.topk_phi_reference.select_pages`), ascending.

    The token budget is ``n_selected * page_size``; indices past the mid region are ignored by
    the decode kernel. Two launches, no host sync: the page scores, then
    :func:`macopt.kernels.page_select.select_page_tokens` (on a tie at the K-th group score,
    the lowest page indices are kept). ``skip[B, Hkv]`` (optional): groups that read no bounds
    and select nothing (their tokens are -1, which the decode kernels ignore). ``counts``
    (:class:`~macopt.kernels.topk_phi_reference.GroupCounts`, optional): pages each group keeps (at
    most ``n_selected``); the rest -1.
    """
    scores = page_scores(q, bounds, mid_start, mid_end, page_size, scale, skip=skip)
    return select_page_tokens(scores, bounds.kmin.shape[1], n_selected, page_size, skip=skip,
                              counts=counts)


def topk_phi_decode_state(
    q: Tensor, k: Tensor, v: Tensor, scale: float, starts: Tensor, ends: Tensor,
    summary: PhiSummary, selected: Tensor, log_phi_q: Tensor, phi_k: FoldedFeatureMap,
    completion: Tensor | None = None, eps: float = 1e-6, num_splits: int | None = None,
    block_n: int | None = None, num_warps: int | None = None, skip: Tensor | None = None,
    num_stages: int | None = None, separate_share: bool | None = None, complete: bool = True,
) -> tuple[Tensor, Tensor]:
    """Top-K + phi decode state ``(o fp32 [B, Hq, D], lse fp32 [B, Hq])``.

    Same meaning as :func:`macopt.kernels.topk_phi_reference.topk_phi_decode_state`, with a
    per-KV-head selection ``selected[B, Hkv, K]`` (int32 or int64 token indices; out-of-mid
    entries ignored, no repeats), ``log_phi_q[B, Hq, F]`` and the folded ``phi_k`` (one map
    per KV head, the map the summary was built with). ``completion[Hq]`` (bool, default all
    on) switches each head's completion; off gives Top-K-only renormalised attention.
    ``skip[B, Hkv]`` (uint8 or bool, optional): groups whose state is not needed (MAC + Top-K
    + phi: every head hits); they read nothing and get the empty state ``(0, -inf)``.
    ``separate_share``: the retrieved keys' feature share in its own launch (default
    :data:`SEPARATE_SHARE`); the result is the same up to summation order. ``complete``
    False: the caller knows (statically) that every head's completion is off: no feature share
    and no completion are computed (``log_phi_q`` is not read), the result is the same.

    >>> o, lse = topk_phi_decode_state(q, k, v, scale, starts, ends, summary, selected,
    ...                                log_phi_q, maps.phi_k.folded())
    """
    return _decode(q, k, v, scale, starts, ends, summary, selected, log_phi_q, phi_k,
                   completion, eps, num_splits, block_n, num_warps, torch.float32, skip,
                   num_stages, separate_share, complete)


def topk_phi_decode(
    q: Tensor, k: Tensor, v: Tensor, scale: float, starts: Tensor, ends: Tensor,
    summary: PhiSummary, selected: Tensor, log_phi_q: Tensor, phi_k: FoldedFeatureMap,
    completion: Tensor | None = None, eps: float = 1e-6, num_splits: int | None = None,
    block_n: int | None = None, num_warps: int | None = None, complete: bool = True,
) -> Tensor:
    """:func:`topk_phi_decode_state`'s output in ``q.dtype`` (same arguments)."""
    return _decode(q, k, v, scale, starts, ends, summary, selected, log_phi_q, phi_k,
                   completion, eps, num_splits, block_n, num_warps, q.dtype,
                   complete=complete)[0]


def _decode(
    q: Tensor, k: Tensor, v: Tensor, scale: float, starts: Tensor, ends: Tensor,
    summary: PhiSummary, selected: Tensor, log_phi_q: Tensor, phi_k: FoldedFeatureMap,
    completion: Tensor | None, eps: float, num_splits: int | None, block_n: int | None,
    num_warps: int | None, out_dtype: torch.dtype, skip: Tensor | None = None,
    num_stages: int | None = None, separate_share: bool | None = None, complete: bool = True,
) -> tuple[Tensor, Tensor]:
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    _check_feature_map(phi_k, n_kv_heads, head_dim)
    if selected.shape[:2] != (batch, n_kv_heads):
        raise ValueError(f"selected: expected [{batch}, {n_kv_heads}, K] (per KV head), "
                         f"got {tuple(selected.shape)}")
    group = n_q_heads // n_kv_heads
    d_phi, width = phi_k.lin_w.shape[1], phi_k.in_w.shape[1]
    n_selected = selected.shape[2]
    block_n = block_n or _block_n(head_dim, k.element_size())
    if num_splits is None:
        num_splits = _num_splits(batch * n_kv_heads, n_selected + 4 * block_n, block_n, q.device)
    if completion is None:
        completion = torch.ones(n_q_heads, dtype=torch.bool, device=q.device)
    if completion.dtype not in (torch.bool, torch.uint8):
        completion = completion != 0
    log_phi_q = log_phi_q.to(torch.float32).contiguous()
    m, u, t = (x.to(torch.float32).contiguous() for x in summary[:3])

    separate = SEPARATE_SHARE if separate_share is None else separate_share
    share_splits, share_block_n = num_splits, block_n
    if not complete:  # no head completes: no share launch, no features in the merge
        separate, share_splits = True, 0
    elif separate:
        share_block_n = min(block_n, SHARE_BLOCK_N or block_n)
        share_splits = _num_splits(batch * n_kv_heads, n_selected, share_block_n, q.device)
    o_parts = _new_empty((batch, n_q_heads, num_splits, head_dim), dtype=torch.float32,
                         device=q.device)
    lse_parts = _new_empty((batch, n_q_heads, num_splits), dtype=torch.float32, device=q.device)
    sub_n = _new_empty((batch, n_q_heads, share_splits, head_dim), dtype=torch.float32,
                       device=q.device)
    sub_u = _new_empty((batch, n_kv_heads, share_splits, d_phi), dtype=torch.float32,
                       device=q.device)
    weights = _feature_weights(phi_k, q.device)
    skip_args = _skip_args(skip, batch, n_kv_heads)
    block_g, block_d, block_f = _pow2(group), _pow2(head_dim), _pow2(d_phi)
    launches = [(num_splits, block_n, dict(ATTEND=True, SHARE=not separate), num_warps or 4)]
    if separate and complete:
        launches.append((share_splits, share_block_n, dict(ATTEND=False, SHARE=True),
                         SHARE_WARPS))
    for splits, tile, parts, warps in launches:
        _decode_split_kernel[(batch * n_kv_heads, splits)](
            q, k, v, starts, ends, summary.mid_start, summary.mid_end, selected, log_phi_q, m,
            *weights, o_parts, lse_parts, sub_u, sub_n,
            scale * _LOG2_E, n_kv_heads, n_keys, n_selected, group, head_dim, d_phi, width,
            splits, *q.stride(), *k.stride(), *v.stride(), *selected.stride(),
            HAS_MLP=phi_k.has_mlp, UPCAST=interpreting(), DOT_PRECISION=_dot_precision(q.dtype),
            HALF=_half_features(q.dtype), SHARE_PRECISION=_share_precision(q.dtype),
            BLOCK_G=block_g, BLOCK_N=tile, BLOCK_D=block_d, BLOCK_F=block_f,
            BLOCK_E=_pow2(width), num_warps=warps, **skip_args, **parts,
            num_stages=num_stages or _DECODE_STAGES,
        )
    out = _new_empty((batch, n_q_heads, head_dim), dtype=out_dtype, device=q.device)
    lse = _new_empty((batch, n_q_heads), dtype=torch.float32, device=q.device)
    dim_block = _complete_dim_block(batch * n_kv_heads, block_d, q.device)
    _complete_kernel[(batch * n_kv_heads, triton.cdiv(head_dim, dim_block))](
        o_parts, lse_parts, sub_u, sub_n, log_phi_q, m, u, t, completion.view(torch.uint8),
        out, lse, n_kv_heads, group, head_dim, d_phi if complete else 0, num_splits,
        share_splits, eps,
        *out.stride(), BLOCK_G=block_g, BLOCK_D=dim_block, BLOCK_F=min(block_f, 32),
        BLOCK_S=triton.next_power_of_2(max(share_splits, 1)), num_warps=4, **skip_args,
    )
    return out, lse
