"""MAC-Attention decode step in Triton: match, attend (amend + complete), finalize; three launches.

The math and the exact semantics (sinks, left padding, chain depth) are those of
:mod:`macopt.kernels.mac_reference`:

1. ``_match_kernel`` (grid ``(B * Hq, R)``): each program scans ``M / R`` ring slots of one
   query head and keeps its nearest valid entry; ``R`` spreads the ring read over the SMs when
   ``B * Hq`` is small.
2. ``_attention_kernel`` (grid ``(B * Hkv, splits)``, the blocking of
   :mod:`macopt.kernels.decode`): reduces the ``R`` candidates to the decision of every head of
   the group, then streams the union of the group's key ranges once, each head masking its own
   prefix start, into two partial states per split: prefix ``[start_h, E(t))`` and tail
   ``[E(t), t]`` (plus the sinks, in split 0).
3. ``_finalize_kernel`` (grid ``(B * Hq,)``): merges each head's split states into ``A`` and
   ``T``, forms ``C = merge(entry j*, A)`` on a hit (``A`` on a miss), writes
   ``(q_pre, C, t, depth)`` to ring slot ``t mod M`` and ``o = merge(C, T)`` in ``q.dtype``, and
   adds the step to the site's statistics counters.

An earlier version finalized inside the attention kernel (the last split of a group to arrive,
by an atomic counter, merged the group's heads one after another): on the H100 that serial tail
cost ~10 us a step at batch 1, more than the third launch costs (CUDA-graph replay of the
all-hit step at batch 1: 0.030 ms before, 0.023 ms after).

The match cannot join the attention kernel: every split needs the group's decision before it
knows its keys, and re-matching in each split would re-read the ring ``splits`` times.

Per-step values (positions, key starts) are device tensors and every launch size comes from
static shapes, so a step never syncs with the host and can be captured in a CUDA graph. On an
all-miss step the attention kernel streams ``[s0, t]`` with the same blocks, warps and splits
as the exact decode kernel; on an all-hit step it reads ``S + (t - j*) <= S + M`` keys.

>>> o, hit, keys_read = mac_decode_step(q, q_pre, k, v, ring, t, s0, 0.125, offset=256,
...                                     tau=0.45, t_min=2048, max_depth=4)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from macopt.kernels.attention_tile import load_kv_tile, online_softmax_update
from macopt.kernels.decode import _interpreting, _launch_config, _multiprocessor_count
from macopt.kernels.mac_reference import MACRing, threshold
from macopt.kernels.merge import merge_finish, merge_step

Tensor = torch.Tensor

# Every output and workspace buffer comes from here; tests swap in a poisoning allocator to
# prove that the kernels write every element.
_new_empty = torch.empty

_LOG2_E = 1.4426950408889634
_INT32_MAX = tl.constexpr(2**31 - 1)  # a jit function may read a global only as a constexpr
_MATCH_BLOCK_M = 64  # ring slots per tile: 16 KB of bf16 queries at D = 128


@triton.jit
def _match_kernel(
    q_pre_ptr, ring_q_ptr, ring_pos_ptr, t_ptr, s0_ptr, cand_d_ptr, cand_pos_ptr,
    q_heads, ring_size, head_dim, slots_per_program, t_min,
    stride_qb, stride_qh, stride_qd,
    stride_rb, stride_rh, stride_rm, stride_rd,
    stride_pb, stride_ph, stride_pm,
    stride_cb, stride_ch, stride_cr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # A program owns one (row, query head) and a run of ring slots, read as [BLOCK_M, D] tiles;
    # it keeps the nearest valid entry (fp32 squared L2, ties: the older) as its candidate.
    bh = tl.program_id(0)
    part = tl.program_id(1)
    batch = (bh // q_heads).to(tl.int64)
    head = (bh % q_heads).to(tl.int64)
    t = tl.load(t_ptr + batch)
    s0 = tl.load(s0_ptr + batch)
    lowest = tl.maximum(t - ring_size, s0)  # valid entries: [max(t - M, s0), t)

    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = tl.load(q_pre_ptr + batch * stride_qb + head * stride_qh + dims * stride_qd,
                mask=dim_ok, other=0.0).to(tl.float32)
    ring_q = ring_q_ptr + batch * stride_rb + head * stride_rh
    ring_pos = ring_pos_ptr + batch * stride_pb + head * stride_ph

    best_d = tl.min(tl.full([BLOCK_M], float("inf"), tl.float32), axis=0)
    best_pos = tl.min(tl.full([BLOCK_M], -1, tl.int32), axis=0)
    first = part * slots_per_program
    last = tl.minimum(first + slots_per_program, ring_size)
    last = tl.where(t - s0 >= t_min, last, first)  # a row below t_min cannot hit: read nothing
    for tile_start in range(first, last, BLOCK_M):
        slots = tile_start + tl.arange(0, BLOCK_M)
        pos = tl.load(ring_pos + slots * stride_pm, mask=slots < last, other=-1)
        valid = (pos >= lowest) & (pos < t) & (slots < last)
        x = tl.load(ring_q + slots[:, None] * stride_rm + dims[None, :] * stride_rd,
                    mask=valid[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        diff = x - q[None, :]
        dist = tl.where(valid, tl.sum(diff * diff, axis=1), float("inf"))
        tile_d = tl.min(dist, axis=0)
        tile_pos = tl.min(tl.where(valid & (dist == tile_d), pos, _INT32_MAX), axis=0)
        better = (tile_d < best_d) | ((tile_d == best_d) & (tile_pos < best_pos))
        better = better & (tile_pos != _INT32_MAX)
        best_pos = tl.where(better, tile_pos, best_pos)
        best_d = tl.where(better, tile_d, best_d)

    out = batch * stride_cb + head * stride_ch + part * stride_cr
    tl.store(cand_d_ptr + out, best_d)
    tl.store(cand_pos_ptr + out, best_pos)


@triton.jit
def _decide(
    cand_d_ptr, cand_pos_ptr, ring_lse_ptr, ring_depth_ptr, batch, heads, row_ok, t, s0,
    n_candidates, ring_size, offset, sinks, radius2, t_min, max_depth,
    stride_cb, stride_ch, stride_cr, stride_lb, stride_lh, stride_lm,
    BLOCK_R: tl.constexpr,
):
    """Per head of ``heads``: (hit, slot of j*, first prefix key) from the match candidates."""
    cands = tl.arange(0, BLOCK_R)
    cand_ok = row_ok[:, None] & (cands < n_candidates)[None, :]
    offsets = batch * stride_cb + heads[:, None] * stride_ch + cands[None, :] * stride_cr
    dist = tl.load(cand_d_ptr + offsets, mask=cand_ok, other=float("inf"))
    pos = tl.load(cand_pos_ptr + offsets, mask=cand_ok, other=-1)
    best = tl.min(dist, axis=1)
    j_star = tl.min(tl.where((dist == best[:, None]) & (pos >= 0), pos, _INT32_MAX), axis=1)
    found = j_star != _INT32_MAX
    j_star = tl.where(found, j_star, 0)
    slot = j_star % ring_size

    entry = batch * stride_lb + heads * stride_lh + slot * stride_lm
    lse_j = tl.load(ring_lse_ptr + entry, mask=row_ok & found, other=float("-inf"))
    depth_j = tl.load(ring_depth_ptr + entry, mask=row_ok & found, other=0)
    finite = (lse_j > float("-inf")) & (lse_j < float("inf"))  # NaN fails both
    hit = found & (best < radius2) & (t - s0 >= t_min) & finite & (depth_j < max_depth)
    first_prefix = s0 + sinks
    start = tl.where(hit, tl.maximum(tl.maximum(j_star + 1 - offset, s0), first_prefix),
                     first_prefix)
    return hit, slot, start


@triton.jit
def _split_chunk(union_start, end, num_splits, BLOCK_N: tl.constexpr):
    """Keys per split of ``[union_start, end)``: a whole number of blocks (as decode.py)."""
    length = tl.maximum(end - union_start, 0)
    return tl.maximum(tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N, BLOCK_N)


@triton.jit
def _attend_blocks(
    q, k_base, v_base, lo, hi, row_start, running_max, running_sum, acc, qk_scale_log2,
    stride_kn, stride_kd, stride_vn, stride_vd, dims, dim_ok,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online softmax (log2 units) of the query tile over keys ``[lo, hi)``, row r from
    ``row_start[r]`` on: the loop body of the exact decode kernel."""
    for block_start in range(lo, hi, BLOCK_N):
        keys = block_start + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        keys64 = keys.to(tl.int64)
        tile_ok = key_ok[:, None] & dim_ok[None, :]
        k, v = load_kv_tile(k_base, v_base, keys64, tile_ok, dims, stride_kn, stride_kd,
                            stride_vn, stride_vd, UPCAST)
        attend = key_ok[None, :] & (keys[None, :] >= row_start[:, None])
        running_max, running_sum, acc = online_softmax_update(
            q, k, v, attend, running_max, running_sum, acc, qk_scale_log2, DOT_PRECISION)
    return running_max, running_sum, acc


@triton.jit
def _store_state(
    o_ptr, lse_ptr, offsets_o, offsets_lse, running_max, running_sum, acc, dims, dim_ok,
    row_ok, stride_od,
):
    """Normalise an online-softmax state and store it as (o, natural-log lse)."""
    has_keys = running_sum > 0
    safe_sum = tl.where(has_keys, running_sum, 1.0)
    o = acc / safe_sum[:, None]
    lse = tl.where(has_keys, (running_max + tl.log2(safe_sum)) / 1.4426950408889634,
                   float("-inf"))
    tl.store(o_ptr + offsets_o[:, None] + dims[None, :] * stride_od, o,
             mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(lse_ptr + offsets_lse, lse, mask=row_ok)


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, t_ptr, s0_ptr,
    cand_d_ptr, cand_pos_ptr, ring_lse_ptr, ring_depth_ptr,
    hit_ptr, slot_ptr, keys_ptr, part_o_ptr, part_lse_ptr,
    qk_scale_log2, radius2, n_kv_heads, group, head_dim, num_splits, n_candidates,
    ring_size, offset, sinks, t_min, max_depth,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_cb, stride_ch, stride_cr,
    stride_lb, stride_lh, stride_lm,
    stride_pw, stride_pb, stride_ph, stride_ps, stride_pd,
    stride_plw, stride_plb, stride_plh, stride_pls,
    stride_db, stride_dh,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # A program owns one (row, KV head, split): the group's query heads are the rows of one
    # [BLOCK_G, D] tile; its chunk of the group's union range is read once, in [BLOCK_N, D] blocks.
    kv_pid = tl.program_id(0)
    split = tl.program_id(1)
    batch = (kv_pid // n_kv_heads).to(tl.int64)
    kv_head = (kv_pid % n_kv_heads).to(tl.int64)
    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < group
    heads = kv_head * group + rows
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    t = tl.load(t_ptr + batch)
    s0 = tl.load(s0_ptr + batch)
    e_t = tl.maximum(t + 1 - offset, s0)

    hit, slot, start = _decide(
        cand_d_ptr, cand_pos_ptr, ring_lse_ptr, ring_depth_ptr, batch, heads, row_ok, t, s0,
        n_candidates, ring_size, offset, sinks, radius2, t_min, max_depth,
        stride_cb, stride_ch, stride_cr, stride_lb, stride_lh, stride_lm, BLOCK_R)
    # Split 0 publishes each head's decision for the finalize launch.
    decision = batch * stride_db + heads * stride_dh
    first_split = row_ok & (rows * 0 + split == 0)
    keys_read = (tl.maximum(e_t - start, 0) + (t + 1 - e_t) + (tl.minimum(s0 + sinks, e_t) - s0))
    tl.store(hit_ptr + decision, hit.to(tl.uint8), mask=first_split)
    tl.store(slot_ptr + decision, slot, mask=first_split)
    tl.store(keys_ptr + decision, keys_read.to(tl.int32), mask=first_split)

    # The union [U, t]: every head's prefix start, and E(t) so the tail is always covered.
    union_start = tl.minimum(tl.min(tl.where(row_ok, start, e_t), axis=0), e_t)
    chunk = _split_chunk(union_start, t + 1, num_splits, BLOCK_N)
    lo = union_start + split * chunk
    hi = tl.minimum(lo + chunk, t + 1)

    q = tl.load(q_ptr + batch * stride_qb + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    no_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    no_sum = tl.zeros([BLOCK_G], tl.float32)
    no_acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)

    p_max, p_sum, p_acc = _attend_blocks(
        q, k_base, v_base, lo, tl.minimum(hi, e_t), start, no_max, no_sum, no_acc,
        qk_scale_log2, stride_kn, stride_kd, stride_vn, stride_vd, dims, dim_ok,
        UPCAST, DOT_PRECISION, BLOCK_N)
    everyone = tl.zeros([BLOCK_G], tl.int32)
    t_max, t_sum, t_acc = _attend_blocks(
        q, k_base, v_base, tl.maximum(lo, e_t), hi, everyone, no_max, no_sum, no_acc,
        qk_scale_log2, stride_kn, stride_kd, stride_vn, stride_vd, dims, dim_ok,
        UPCAST, DOT_PRECISION, BLOCK_N)
    sinks_end = tl.where(split == 0, tl.minimum(s0 + sinks, e_t), s0)  # split 0 adds the sinks
    t_max, t_sum, t_acc = _attend_blocks(
        q, k_base, v_base, s0, sinks_end, everyone, t_max, t_sum, t_acc,
        qk_scale_log2, stride_kn, stride_kd, stride_vn, stride_vd, dims, dim_ok,
        UPCAST, DOT_PRECISION, BLOCK_N)

    # Every split stores both states, empty ones as (0, -inf): the finalize merges them all.
    group_o = part_o_ptr + batch * stride_pb + kv_head * group * stride_ph
    group_lse = part_lse_ptr + batch * stride_plb + kv_head * group * stride_plh
    _store_state(group_o, group_lse, rows * stride_ph + split * stride_ps,
                 rows * stride_plh + split * stride_pls, p_max, p_sum, p_acc, dims, dim_ok,
                 row_ok, stride_pd)
    _store_state(group_o + stride_pw, group_lse + stride_plw, rows * stride_ph + split * stride_ps,
                 rows * stride_plh + split * stride_pls, t_max, t_sum, t_acc, dims, dim_ok,
                 row_ok, stride_pd)


@triton.jit
def _finalize_kernel(
    q_pre_ptr, t_ptr, s0_ptr, ring_q_ptr, ring_o_ptr, ring_lse_ptr, ring_pos_ptr, ring_depth_ptr,
    hit_ptr, slot_ptr, keys_ptr, part_o_ptr, part_lse_ptr, out_ptr, counters_ptr,
    q_heads, head_dim, num_splits, ring_size,
    stride_qpb, stride_qph, stride_qpd,
    stride_rb, stride_rh, stride_rm, stride_rd,
    stride_rob, stride_roh, stride_rom, stride_rod,
    stride_lb, stride_lh, stride_lm,
    stride_pw, stride_pb, stride_ph, stride_ps, stride_pd,
    stride_plw, stride_plb, stride_plh, stride_pls,
    stride_outb, stride_outh, stride_outd,
    stride_db, stride_dh, stride_cr, stride_ch,
    COUNT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # A program owns one (row, query head): it merges the splits' prefix and tail states, amends
    # with entry j* on a hit, writes o and ring slot t mod M, and adds the step to the counters.
    bh = tl.program_id(0)
    batch = (bh // q_heads).to(tl.int64)
    head = (bh % q_heads).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    # Latency-bound: issue every independent load first, the entry's (which needs the slot)
    # last, so their round trips overlap.
    decision = batch * stride_db + head * stride_dh
    hit = tl.load(hit_ptr + decision) != 0
    slot = tl.load(slot_ptr + decision)
    t = tl.load(t_ptr + batch)
    q = tl.load(q_pre_ptr + batch * stride_qpb + head * stride_qph + dims * stride_qpd,
                mask=dim_ok)
    part_o = part_o_ptr + batch * stride_pb + head * stride_ph
    part_lse = part_lse_ptr + batch * stride_plb + head * stride_plh
    a_max = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), axis=0)
    a_total = tl.sum(tl.zeros([BLOCK_S], tl.float32), axis=0)
    a_acc = tl.zeros([BLOCK_D], tl.float32)
    t_max, t_total, t_acc = a_max, a_total, a_acc
    for first in range(0, num_splits, BLOCK_S):
        parts = first + tl.arange(0, BLOCK_S)
        part_ok = parts < num_splits
        o_offsets = parts[:, None] * stride_ps + dims[None, :] * stride_pd
        o_ok = part_ok[:, None] & dim_ok[None, :]
        a_max, a_total, a_acc = merge_step(
            a_max, a_total, a_acc,
            tl.load(part_lse + parts * stride_pls, mask=part_ok, other=float("-inf")),
            tl.load(part_o + o_offsets, mask=o_ok, other=0.0))
        t_max, t_total, t_acc = merge_step(
            t_max, t_total, t_acc,
            tl.load(part_lse + stride_plw + parts * stride_pls, mask=part_ok,
                    other=float("-inf")),
            tl.load(part_o + stride_pw + o_offsets, mask=o_ok, other=0.0))
    # A missed entry may hold anything: its slot is read (in bounds) but never used.
    ring = batch * stride_lb + head * stride_lh
    ring_o = ring_o_ptr + batch * stride_rob + head * stride_roh
    o_j = tl.where(hit, tl.load(ring_o + slot * stride_rom + dims * stride_rod, mask=dim_ok), 0.0)
    lse_j = tl.where(hit, tl.load(ring_lse_ptr + ring + slot * stride_lm), float("-inf"))
    depth = tl.where(hit, tl.load(ring_depth_ptr + ring + slot * stride_lm) + 1, 0)
    o_a, lse_a = merge_finish(a_max, a_total, a_acc)
    o_t, lse_t = merge_finish(t_max, t_total, t_acc)
    o_c, lse_c = _merge_two(o_a, lse_a, o_j, lse_j)
    o, _ = _merge_two(o_c, lse_c, o_t, lse_t)
    tl.store(out_ptr + batch * stride_outb + head * stride_outh + dims * stride_outd,
             o.to(out_ptr.dtype.element_ty), mask=dim_ok)

    # j* may be the slot written below (j* = t - M): finish every read of it first.
    tl.debug_barrier()
    new_slot = t % ring_size
    ring_q = ring_q_ptr + batch * stride_rb + head * stride_rh
    tl.store(ring_q + new_slot * stride_rm + dims * stride_rd, q.to(ring_q.dtype.element_ty),
             mask=dim_ok)
    tl.store(ring_o + new_slot * stride_rom + dims * stride_rod, o_c, mask=dim_ok)
    tl.store(ring_lse_ptr + ring + new_slot * stride_lm, lse_c)
    tl.store(ring_pos_ptr + ring + new_slot * stride_lm, t.to(tl.int32))
    tl.store(ring_depth_ptr + ring + new_slot * stride_lm, depth.to(tl.int32))

    if COUNT:  # rows of one head add to the same counters: atomics (integer, so exact)
        counter = counters_ptr + head * stride_ch
        s0 = tl.load(s0_ptr + batch)
        tl.atomic_add(counter, hit.to(tl.int64), sem="relaxed")
        tl.atomic_add(counter + stride_cr, tl.load(keys_ptr + decision).to(tl.int64),
                      sem="relaxed")
        tl.atomic_add(counter + 2 * stride_cr, (t - s0 + 1).to(tl.int64), sem="relaxed")
        tl.atomic_add(counter + 3 * stride_cr, 1, sem="relaxed")
        tl.atomic_add(counter + 4 * stride_cr, (batch == 0).to(tl.int64), sem="relaxed")


@triton.jit
def _merge_two(o_a, lse_a, o_b, lse_b):
    """merge_state of two single states (``o[D]``, scalar ``lse``); empty + empty = empty."""
    lse_max = tl.maximum(lse_a, lse_b)
    shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w_a = tl.exp(lse_a - shift)
    w_b = tl.exp(lse_b - shift)
    total = w_a + w_b
    safe_total = tl.where(total > 0, total, 1.0)
    lse = tl.where(total > 0, shift + tl.log(safe_total), float("-inf"))
    return (w_a * o_a + w_b * o_b) / safe_total, lse


def _match_programs(batch: int, q_heads: int, ring_size: int, device: torch.device) -> int:
    """Programs per (row, query head) for the match: enough to put ~2 programs on every SM
    (batch 1 has only Hq heads), each scanning whole tiles."""
    tiles = triton.cdiv(ring_size, _MATCH_BLOCK_M)
    wanted = triton.cdiv(2 * _multiprocessor_count(device), max(batch * q_heads, 1))
    return max(1, min(tiles, wanted))


def _check_ring(q: Tensor, q_pre: Tensor, ring: MACRing) -> None:
    batch, q_heads, head_dim = q.shape
    if q_pre.shape != q.shape:
        raise ValueError(f"q_pre: expected the shape of q {tuple(q.shape)}, got "
                         f"{tuple(q_pre.shape)}")
    if ring.q.shape[:2] != (batch, q_heads) or ring.q.shape[3] != head_dim:
        raise ValueError(f"ring.q: expected [{batch}, {q_heads}, M, {head_dim}], got "
                         f"{tuple(ring.q.shape)}")
    meta = (ring.lse, ring.pos, ring.depth)
    if any(t.shape != ring.q.shape[:3] or t.stride() != ring.lse.stride() for t in meta):
        raise ValueError("ring.lse, ring.pos, ring.depth: expected one [B, Hq, M] layout "
                         "(same shape and strides)")
    if ring.o.dtype != torch.float32 or ring.lse.dtype != torch.float32:
        raise ValueError("ring.o, ring.lse: states are float32")
    if ring.pos.dtype != torch.int32 or ring.depth.dtype != torch.int32:
        raise ValueError("ring.pos, ring.depth: expected int32")


def mac_decode_step(
    q: Tensor, q_pre: Tensor, k: Tensor, v: Tensor, ring: MACRing, positions: Tensor,
    key_starts: Tensor, scale: float, *, offset: int, sinks: int = 0, tau: float,
    t_min: int, max_depth: int, counters: Tensor | None = None, num_splits: int | None = None,
    match_programs: int | None = None, block_n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One MAC decode step on the GPU (or the Triton interpreter); updates ``ring`` in place.

    Same arguments and results as :func:`macopt.kernels.mac_reference.mac_decode_step`:
    ``o[B, Hq, D]`` in ``q.dtype``, ``hit[B, Hq]`` bool, ``keys_read[B, Hq]`` int32.
    ``positions`` and ``key_starts`` (int32 or int64 ``[B]``) stay on the device. ``counters``
    (int64 ``[COUNTER_ROWS, Hq]`` of :mod:`macopt.kernels.mac_counters`), when given, gets the
    step added by the finalize launch. The last three arguments override the launch shape
    (tests, benchmarks); by default the attention kernel uses the exact decode kernel's blocks,
    warps and split count for this cache size. Three launches: match, attention, finalize.
    """
    _check_ring(q, q_pre, ring)
    batch, q_heads, head_dim = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    config = _launch_config(batch, kv_heads, n_keys, head_dim, group, q.device, k.element_size())
    splits = num_splits or config.num_splits
    block_n = block_n or config.block_n
    ring_size = ring.size
    n_match = match_programs or _match_programs(batch, q_heads, ring_size, q.device)
    block_m = min(_MATCH_BLOCK_M, triton.next_power_of_2(triton.cdiv(ring_size, n_match)))
    slots_per_program = triton.cdiv(triton.cdiv(ring_size, n_match), block_m) * block_m
    n_match = triton.cdiv(ring_size, slots_per_program)  # no program without a slot
    positions, key_starts = positions.contiguous(), key_starts.contiguous()

    def new(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return _new_empty(*shape, dtype=dtype, device=q.device)

    cand_d, cand_pos = new(batch, q_heads, n_match), new(batch, q_heads, n_match, dtype=torch.int32)
    hit, slot = new(batch, q_heads, dtype=torch.uint8), new(batch, q_heads, dtype=torch.int32)
    keys_read = new(batch, q_heads, dtype=torch.int32)
    part_o, part_lse = new(2, batch, q_heads, splits, head_dim), new(2, batch, q_heads, splits)
    out = new(batch, q_heads, head_dim, dtype=q.dtype)
    block_d = triton.next_power_of_2(head_dim)

    _match_kernel[(batch * q_heads, n_match)](
        q_pre, ring.q, ring.pos, positions, key_starts, cand_d, cand_pos,
        q_heads, ring_size, head_dim, slots_per_program, t_min,
        *q_pre.stride(), *ring.q.stride(), *ring.pos.stride(), *cand_d.stride(),
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=8,  # 8 warps: half the registers a thread
    )
    _attention_kernel[(batch * kv_heads, splits)](
        q, k, v, positions, key_starts, cand_d, cand_pos, ring.lse, ring.depth,
        hit, slot, keys_read, part_o, part_lse,
        scale * _LOG2_E, threshold(head_dim, tau), kv_heads, group, head_dim, splits, n_match,
        ring_size, offset, sinks, t_min, max_depth,
        *q.stride(), *k.stride(), *v.stride(), *cand_d.stride(), *ring.lse.stride(),
        *part_o.stride(), *part_lse.stride(), *hit.stride(),
        UPCAST=_interpreting(), DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        BLOCK_R=triton.next_power_of_2(n_match),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    count = counters is not None
    if count and (counters.dtype != torch.int64 or counters.shape[1] != q_heads):
        raise ValueError(f"counters: expected int64 [rows, {q_heads}], got {counters.dtype} "
                         f"{tuple(counters.shape)}")
    counter_strides = counters.stride() if count else (0, 0)
    _finalize_kernel[(batch * q_heads,)](
        q_pre, positions, key_starts, ring.q, ring.o, ring.lse, ring.pos, ring.depth,
        hit, slot, keys_read, part_o, part_lse, out, counters if count else hit,
        q_heads, head_dim, splits, ring_size,
        *q_pre.stride(), *ring.q.stride(), *ring.o.stride(), *ring.lse.stride(),
        *part_o.stride(), *part_lse.stride(), *out.stride(), *hit.stride(), *counter_strides,
        COUNT=count, BLOCK_D=block_d,
        # Two [BLOCK_S, D] fp32 tiles in flight: 64 registers a thread at 4 warps.
        BLOCK_S=min(triton.next_power_of_2(splits), max(1, 4096 // block_d)), num_warps=4,
    )
    return out, hit.view(torch.bool), keys_read
