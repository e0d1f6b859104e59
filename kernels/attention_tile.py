"""The block step shared by the decode-attention kernels: load a K/V tile, fold it into an
online-softmax state.

:mod:`macopt.kernels.decode`, :mod:`macopt.kernels.mac` and :mod:`macopt.kernels.topk_phi`
stream keys in ``[BLOCK_N, D]`` tiles against a ``[BLOCK_G, D]`` query tile and differ only in
which keys a tile holds and which (query, key) pairs attend; these helpers are the rest.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_kv_tile(
    k_base, v_base, keys64, tile_ok, dims, stride_kn, stride_kd, stride_vn, stride_vd,
    UPCAST: tl.constexpr,
):
    """Load the ``[BLOCK_N, D]`` K and V tiles of keys ``keys64`` (int64), zero where not
    ``tile_ok``; fp32 when ``UPCAST``."""
    # One copy of the gather keeps the three kernels' loads identical; Triton inlines jit
    # helpers, so the generated code (and its pipelining) is that of the inline form.
    k = tl.load(k_base + keys64[:, None] * stride_kn + dims[None, :] * stride_kd,
                mask=tile_ok, other=0.0)
    v = tl.load(v_base + keys64[:, None] * stride_vn + dims[None, :] * stride_vd,
                mask=tile_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def online_softmax_update(
    q, k, v, attend, running_max, running_sum, acc, qk_scale_log2,
    DOT_PRECISION: tl.constexpr,
):
    """Fold one K/V tile into the state ``(running_max, running_sum, acc)`` (log2 units):
    scores ``q k^T * qk_scale_log2``, ``-inf`` where not ``attend`` ([BLOCK_G, BLOCK_N] or
    broadcastable to it)."""
    # The kernels' results are compared bit for bit, so the arithmetic order lives here once;
    # the shift guards rows that have attended no key yet (max -inf) against inf - inf = NaN.
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
    scores = tl.where(attend, scores, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows with no key yet
    rescale = tl.exp2(running_max - shift)
    p = tl.exp2(scores - shift[:, None])
    running_sum = running_sum * rescale + tl.sum(p, axis=1)
    acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return new_max, running_sum, acc
