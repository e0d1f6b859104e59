"""MAC prefill in Triton: the exact ring entries of a prompt (or prompt chunk), one launch.

Same math as :func:`macopt.kernels.mac_reference.prefill_entries`: the chunk's queries sit at
cache positions ``[end - N, end)`` of each row; the entry of position ``p`` (slot ``p mod M``)
is the state of ``q_post_p`` over keys ``[s0 + F, E(p))``, ``E(p) = max(p + 1 - S, s0)``; every
slot is rewritten (empty where no query of the chunk reaches it), which is the reset that
starts a sequence.

A program owns ``BLOCK_Q`` consecutive ring positions of one (row, query head) and streams
keys ``[s0 + F, max E(p))`` once for them, flash-attention style, with each row masked at its
own ``E(p)``. The key loop's bounds are read from the device (``key_starts``, ``ends``), so a
short prompt in a long static cache reads only its own keys and nothing syncs with the host.
Work is ``M x prompt`` per query head: about 1/(2 N / M) of the prompt's own causal attention.

>>> prefill_entries_(ring, q_post, q_pre, k, v, 0.125, starts, ends, offset=256)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from macopt.kernels.attention_tile import load_kv_tile, online_softmax_update
from macopt.kernels.launch import interpreting
from macopt.kernels.mac_reference import MACRing

Tensor = torch.Tensor

_LOG2_E = 1.4426950408889634


@triton.jit
def _prefill_entries_kernel(
    q_ptr, q_pre_ptr, k_ptr, v_ptr, s0_ptr, end_ptr,
    ring_q_ptr, ring_o_ptr, ring_lse_ptr, ring_pos_ptr, ring_depth_ptr,
    qk_scale_log2, q_heads, group, n_queries, n_keys, head_dim, ring_size, offset, sinks,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_qpb, stride_qph, stride_qpn, stride_qpd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_rb, stride_rh, stride_rm, stride_rd,
    stride_rob, stride_roh, stride_rom, stride_rod,
    stride_lb, stride_lh, stride_lm,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    batch = (bh // q_heads).to(tl.int64)
    head = (bh % q_heads).to(tl.int64)
    kv_head = head // group
    s0 = tl.load(s0_ptr + batch).to(tl.int64)
    end = tl.load(end_ptr + batch).to(tl.int64)
    first_query = end - n_queries  # cache position of the chunk's first query

    m = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # index among the last M positions
    pos = end - ring_size + m
    valid = (m < ring_size) & (pos >= s0) & (pos >= first_query)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    rows_ok = valid[:, None] & dim_ok[None, :]
    query = pos - first_query
    q = tl.load(q_ptr + batch * stride_qb + head * stride_qh + query[:, None] * stride_qn
                + dims[None, :] * stride_qd, mask=rows_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    prefix_end = tl.where(valid, tl.maximum(pos + 1 - offset, s0), 0)  # E(p); 0: no keys
    lo = s0 + sinks
    hi = tl.minimum(tl.max(prefix_end, axis=0), n_keys)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    running_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for block_start in range(lo, hi, BLOCK_N):
        keys = block_start + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        k, v = load_kv_tile(k_base, v_base, keys.to(tl.int64), key_ok[:, None] & dim_ok[None, :],
                            dims, stride_kn, stride_kd, stride_vn, stride_vd, UPCAST)
        attend = key_ok[None, :] & (keys[None, :] < prefix_end[:, None])
        running_max, running_sum, acc = online_softmax_update(
            q, k, v, attend, running_max, running_sum, acc, qk_scale_log2, DOT_PRECISION)

    has_keys = running_sum > 0
    safe_sum = tl.where(has_keys, running_sum, 1.0)
    o = tl.where(rows_ok, acc / safe_sum[:, None], 0.0)
    lse = tl.where(has_keys & valid, (running_max + tl.log2(safe_sum)) / 1.4426950408889634,
                   float("-inf"))
    q_pre = tl.load(q_pre_ptr + batch * stride_qpb + head * stride_qph
                    + query[:, None] * stride_qpn + dims[None, :] * stride_qpd,
                    mask=rows_ok, other=0.0)

    slot = (end + m) % ring_size  # = pos mod M, without a negative pos
    in_ring = m < ring_size
    store_ok = in_ring[:, None] & dim_ok[None, :]
    ring_q = ring_q_ptr + batch * stride_rb + head * stride_rh
    ring_o = ring_o_ptr + batch * stride_rob + head * stride_roh
    meta = batch * stride_lb + head * stride_lh + slot * stride_lm
    tl.store(ring_q + slot[:, None] * stride_rm + dims[None, :] * stride_rd,
             q_pre.to(ring_q_ptr.dtype.element_ty), mask=store_ok)
    tl.store(ring_o + slot[:, None] * stride_rom + dims[None, :] * stride_rod, o, mask=store_ok)
    tl.store(ring_lse_ptr + meta, lse, mask=in_ring)
    tl.store(ring_pos_ptr + meta, tl.where(valid, pos, -1).to(tl.int32), mask=in_ring)
    tl.store(ring_depth_ptr + meta, tl.zeros([BLOCK_Q], tl.int32), mask=in_ring)


def prefill_entries_(
    ring: MACRing, q_post: Tensor, q_pre: Tensor, k: Tensor, v: Tensor, scale: float,
    key_starts: Tensor, ends: Tensor, offset: int, sinks: int = 0,
    block_q: int | None = None, block_n: int | None = None,
) -> MACRing:
    """Rewrite every slot of ``ring`` (rows ``[B]``, e.g. a view of the first ``B``) in place
    with the exact entries of the chunk ``q_post, q_pre[B, Hq, N, D]`` at positions
    ``[ends - N, ends)`` over the cache ``k, v[B, Hkv, Nk, D]``. GPU or the Triton interpreter;
    ``block_*`` override the tiling."""
    batch, q_heads, n_queries, head_dim = q_post.shape
    if q_pre.shape != q_post.shape:
        raise ValueError(f"q_pre: expected the shape of q_post {tuple(q_post.shape)}, got "
                         f"{tuple(q_pre.shape)}")
    kv_heads, n_keys = k.shape[1], k.shape[2]
    ring_size = ring.size
    upcast = interpreting()
    block_q = block_q or min(64, triton.next_power_of_2(ring_size))
    block_n = block_n or (32 if head_dim > 128 or q_post.dtype == torch.float32 else 64)
    if upcast:
        block_q, block_n = max(block_q, 16), max(block_n, 16)  # tl.dot needs 16
    if ring.pos.shape[0] != batch or ring.q.shape[1] != q_heads or ring.q.shape[3] != head_dim:
        raise ValueError(f"ring: expected [{batch}, {q_heads}, M, {head_dim}] (the batch's rows), "
                         f"got {tuple(ring.q.shape)}")
    rows = ring
    _prefill_entries_kernel[(batch * q_heads, triton.cdiv(ring_size, block_q))](
        q_post, q_pre, k, v, key_starts.contiguous(), ends.contiguous(),
        rows.q, rows.o, rows.lse, rows.pos, rows.depth,
        scale * _LOG2_E, q_heads, q_heads // kv_heads, n_queries, n_keys, head_dim,
        ring_size, offset, sinks,
        *q_post.stride(), *q_pre.stride(), *k.stride(), *v.stride(),
        *rows.q.stride(), *rows.o.stride(), *rows.lse.stride(),
        UPCAST=upcast, DOT_PRECISION="ieee" if q_post.dtype == torch.float32 else "tf32",
        BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4, num_stages=2,
    )
    return ring
