"""MAC-Attention decode step in Triton: match, attend (amend + complete), finalize; three launches.

The math and the exact semantics (sinks, left padding, chain depth) are those of
:mod:`macopt.kernels.mac_reference`:

1. ``_match_kernel`` (grid ``(B * Hq, R)``): each program scans ``M / R`` ring slots of one
   query head and keeps its nearest valid entry, with whether that entry may be reused;
   ``R`` spreads the ring read over the SMs when ``B * Hq`` is small.
2. ``_attention_kernel`` (grid ``(P + B * Hkv,)``): every program first decides every head of
   the step from the candidates (a few hundred loads from L2, in parallel), which gives each
   (row, KV head) group its union range ``[U, t]`` of keys, and cuts the step's keys into work
   items of equal size (``_find_item``): ``P`` items on an all-miss step, cut as the exact
   decode kernel cuts it; when few groups miss, their long ranges are spread over all the
   programs instead of waiting on one program per group. A program streams its item once,
   the group's query heads as the rows of one tile, each masking its own prefix start, into
   two partial states: prefix ``[start_h, E(t))`` and tail ``[E(t), t]`` (plus the sinks, in
   the group's first item).
3. ``_finalize_kernel`` (grid ``(B * Hq,)``): merges each head's item states into ``A`` and
   ``T``, forms ``C = merge(entry j*, A)`` on a hit (``A`` on a miss), writes
   ``(q_pre, C, t, depth)`` to ring slot ``t mod M`` and ``o = merge(C, T)`` in ``q.dtype``, and
   adds the step to the site's statistics counters.

Before the work plan, the attention grid was ``(B * Hkv, splits)`` with the split count of the
exact kernel: at batch 16 that is one program per group, so on an H100 at 128K with hit rate
0.95 per head the ~19% of groups with a missing head each streamed 128K keys on one SM while
the rest of the GPU idled (2.1x faster than exact where the bytes allow ~5x).

An earlier version finalized inside the attention kernel (the last split of a group to arrive,
by an atomic counter, merged the group's heads one after another): on the H100 that serial tail
cost ~10 us a step at batch 1, more than the third launch costs (CUDA-graph replay of the
all-hit step at batch 1: 0.030 ms before, 0.023 ms after).

The match cannot join the attention kernel: every program needs the decisions before it knows
its keys (measured on the H100: a match fused into the attention launch with a spin-wait was
slower, BENCHMARKS.md 2c).

Per-step values (positions, key starts) are device tensors and every launch size comes from
static shapes, so a step never syncs with the host and can be captured in a CUDA graph. On an
all-miss step the attention kernel streams ``[s0, t]`` with the same blocks, warps and splits
as the exact decode kernel; on an all-hit step it reads ``S + (t - j*) <= S + M`` keys.

MAC + Top-K + phi needs the decisions before its Top-K + phi launches (a group whose heads all
hit needs no Top-K + phi state): :func:`match_candidates` runs the match launch on its own,
:func:`all_hit_groups` flags those groups from the candidates (the same ``_decide``), and
``mac_decode_step(..., candidates=...)`` then skips its own match.

>>> o, hit, keys_read = mac_decode_step(q, q_pre, k, v, ring, t, s0, 0.125, offset=256,
...                                     tau=0.45, t_min=2048, max_depth=4)
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from macopt.kernels.attention_tile import load_kv_tile, online_softmax_update
from macopt.kernels.launch import decode_launch_config, interpreting, multiprocessor_count
from macopt.kernels.mac_reference import MACRing, MatchCandidates, threshold
from macopt.kernels.merge import merge_finish, merge_step

Tensor = torch.Tensor

# Every output and workspace buffer comes from here; tests swap in a poisoning allocator to
# prove that the kernels write every element.
_new_empty = torch.empty

_LOG2_E = 1.4426950408889634
_INT32_MAX = tl.constexpr(2**31 - 1)  # a jit function may read a global only as a constexpr
_MATCH_BLOCK_M = 64  # ring slots per tile: 16 KB of bf16 queries at D = 128


@dataclasses.dataclass
class StepTuning:
    """Launch choices that change only the step's speed (examples/research/mac_variants.py
    sweeps them; BENCHMARKS.md section 2h)."""

    # Item states the finalize merges a pass. On the H200, 32 at 4 warps against 8: hit rate
    # 0.95 -3.2 us a layer at batch 1, 8K (-4.8 at 128K), all-miss -1.3, all-hit +0.7.
    finalize_block_s: int = 32


TUNING = StepTuning()


@triton.jit
def _match_kernel(
    q_pre_ptr, ring_q_ptr, ring_pos_ptr, ring_lse_ptr, ring_depth_ptr, t_ptr, s0_ptr,
    cand_d_ptr, cand_pos_ptr, cand_ok_ptr,
    q_heads, ring_size, head_dim, slots_per_program, t_min, max_depth,
    stride_qb, stride_qh, stride_qd,
    stride_rb, stride_rh, stride_rm, stride_rd,
    stride_pb, stride_ph, stride_pm,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # A program owns one (row, query head) and a run of ring slots, read as [BLOCK_M, D] tiles;
    # it keeps the nearest valid entry (fp32 squared L2, ties: the older) as its candidate, and
    # whether that entry may be reused (finite lse, depth below the bound), so that deciding a
    # head later needs only the candidates: every attention program decides every head.
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
    ring_meta = batch * stride_pb + head * stride_ph  # pos, lse, depth share one layout

    # One round trip a tile: every slot's position, query, lse and depth are loaded together
    # (an invalid slot's values are read and ignored), so no load waits on another's result.
    best_d = tl.min(tl.full([BLOCK_M], float("inf"), tl.float32), axis=0)
    best_pos = tl.min(tl.full([BLOCK_M], -1, tl.int32), axis=0)
    best_usable = best_pos >= 0  # False: no candidate yet
    first = part * slots_per_program
    last = tl.minimum(first + slots_per_program, ring_size)
    last = tl.where(t - s0 >= t_min, last, first)  # a row below t_min cannot hit: read nothing
    for tile_start in range(first, last, BLOCK_M):
        slots = tile_start + tl.arange(0, BLOCK_M)
        in_run = slots < last
        pos = tl.load(ring_pos_ptr + ring_meta + slots * stride_pm, mask=in_run, other=-1)
        x = tl.load(ring_q + slots[:, None] * stride_rm + dims[None, :] * stride_rd,
                    mask=in_run[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        lse = tl.load(ring_lse_ptr + ring_meta + slots * stride_pm, mask=in_run,
                      other=float("-inf"))
        depth = tl.load(ring_depth_ptr + ring_meta + slots * stride_pm, mask=in_run, other=0)
        valid = (pos >= lowest) & (pos < t) & in_run
        diff = x - q[None, :]
        dist = tl.where(valid, tl.sum(diff * diff, axis=1), float("inf"))
        tile_d = tl.min(dist, axis=0)
        tile_pos = tl.min(tl.where(valid & (dist == tile_d), pos, _INT32_MAX), axis=0)
        # Valid positions are distinct, so the tile's choice is one slot: its reusability.
        usable = (lse > float("-inf")) & (lse < float("inf")) & (depth < max_depth)
        tile_usable = tl.max(tl.where(valid & (pos == tile_pos), usable, False).to(tl.int32),
                             axis=0) != 0
        better = (tile_d < best_d) | ((tile_d == best_d) & (tile_pos < best_pos))
        better = better & (tile_pos != _INT32_MAX)
        best_pos = tl.where(better, tile_pos, best_pos)
        best_d = tl.where(better, tile_d, best_d)
        best_usable = tl.where(better, tile_usable, best_usable)

    usable = (best_pos >= 0) & best_usable

    out = bh * tl.num_programs(1) + part  # candidates are contiguous [B * Hq, R]
    tl.store(cand_d_ptr + out, best_d)
    tl.store(cand_pos_ptr + out, best_pos)
    tl.store(cand_ok_ptr + out, usable.to(tl.uint8))


@triton.jit
def _decide(
    cand_d_ptr, cand_pos_ptr, cand_ok_ptr, flat_heads, head_ok, t, s0, may_hit, n_candidates,
    ring_size, offset, sinks, radius2, t_min, STREAM_MISSES: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Per head (``flat_heads = row * Hq + head``, any 1-D set): (hit, slot of j*, first
    prefix key) from the match candidates; ``t, s0`` are the heads' rows' values, ``may_hit``
    False for a row whose key mask has holes (it misses: exact attention over its mask)."""
    cands = tl.arange(0, BLOCK_R)
    cand_ok = head_ok[:, None] & (cands < n_candidates)[None, :]
    offsets = flat_heads[:, None].to(tl.int64) * n_candidates + cands[None, :]
    dist = tl.load(cand_d_ptr + offsets, mask=cand_ok, other=float("inf"))
    pos = tl.load(cand_pos_ptr + offsets, mask=cand_ok, other=-1)
    usable = tl.load(cand_ok_ptr + offsets, mask=cand_ok, other=0)
    best = tl.min(dist, axis=1)
    nearest = (dist == best[:, None]) & (pos >= 0)
    j_star = tl.min(tl.where(nearest, pos, _INT32_MAX), axis=1)
    found = j_star != _INT32_MAX
    reusable = tl.max(tl.where(nearest & (pos == j_star[:, None]), usable, 0), axis=1) != 0
    j_star = tl.where(found, j_star, 0)
    hit = found & reusable & (best < radius2) & (t - s0 >= t_min) & may_hit
    first_prefix = s0 + sinks
    e_t = tl.maximum(t + 1 - offset, s0)
    miss_start = first_prefix if STREAM_MISSES else e_t
    start = tl.where(hit, tl.maximum(tl.maximum(j_star + 1 - offset, s0), first_prefix),
                     miss_start)
    return hit, j_star % ring_size, start


@triton.jit
def _find_item(
    cand_d_ptr, cand_pos_ptr, cand_ok_ptr, t_ptr, s0_ptr, holes_ptr, item, n_groups, n_kv_heads,
    group, n_candidates, ring_size, offset, sinks, radius2, t_min, target_items,
    STREAM_MISSES: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr, BLOCK_GP: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The work plan of this step, computed alike by every program: (group, first item of the
    group, items of the group, keys per item) for work item ``item``; group -1 if none.

    Every group's range ``[U_g, t_g]`` comes from every head's decision. The step's keys
    ``W = sum_g (t_g + 1 - U_g)`` are cut into items of ``C = ceil(W / target_items)`` keys
    (whole blocks); group ``g`` gets ``max(1, ceil(L_g / C))`` consecutive items. An all-miss
    step is cut exactly as the exact decode kernel cuts it; when few groups miss, their ranges
    are spread over all programs instead of one program per group and split.
    """
    groups = tl.arange(0, BLOCK_GROUPS)
    members = tl.arange(0, BLOCK_GP)
    group_ok = groups < n_groups
    row = (groups // n_kv_heads).to(tl.int64)
    t = tl.load(t_ptr + row, mask=group_ok, other=0)
    s0 = tl.load(s0_ptr + row, mask=group_ok, other=0)
    may_hit = _row_may_hit(holes_ptr, row, group_ok, HAS_MASK)
    e_t = tl.maximum(t + 1 - offset, s0)
    head_ok = group_ok[:, None] & (members < group)[None, :]
    flat = tl.reshape(groups[:, None] * group + members[None, :], (BLOCK_GROUPS * BLOCK_GP,))
    flat_ok = tl.reshape(head_ok, (BLOCK_GROUPS * BLOCK_GP,))
    flat_t = tl.reshape(t[:, None] + members[None, :] * 0, (BLOCK_GROUPS * BLOCK_GP,))
    flat_s0 = tl.reshape(s0[:, None] + members[None, :] * 0, (BLOCK_GROUPS * BLOCK_GP,))
    flat_may = tl.reshape(may_hit[:, None] & (members >= 0)[None, :], (BLOCK_GROUPS * BLOCK_GP,))
    _, _, start = _decide(cand_d_ptr, cand_pos_ptr, cand_ok_ptr, flat, flat_ok, flat_t, flat_s0,
                          flat_may, n_candidates, ring_size, offset, sinks, radius2, t_min,
                          STREAM_MISSES, BLOCK_R)
    start = tl.reshape(start, (BLOCK_GROUPS, BLOCK_GP))
    union = tl.minimum(tl.min(tl.where(head_ok, start, e_t[:, None]), axis=1), e_t)
    length = tl.where(group_ok, t + 1 - union, 0)
    total = tl.sum(length, axis=0)
    keys_per_item = tl.cdiv(tl.maximum(tl.cdiv(total, target_items), 1), BLOCK_N) * BLOCK_N
    items = tl.where(group_ok, tl.maximum(tl.cdiv(length, keys_per_item), 1), 0)
    after = tl.cumsum(items, axis=0)
    mine = group_ok & (after - items <= item) & (item < after)
    owner = tl.max(tl.where(mine, groups, -1), axis=0)
    first = tl.sum(tl.where(mine, after - items, 0), axis=0)
    count = tl.sum(tl.where(mine, items, 0), axis=0)
    return owner, first, count, keys_per_item


@triton.jit
def _row_may_hit(holes_ptr, row, row_ok, HAS_MASK: tl.constexpr):
    """False where row ``row``'s key mask has holes (``holes_ptr``, uint8 per row)."""
    if HAS_MASK:
        return tl.load(holes_ptr + row, mask=row_ok, other=0) == 0
    return row >= 0


@triton.jit
def _attend_blocks(
    q, k_base, v_base, mask_base, holes, lo, hi, row_start, running_max, running_sum, acc,
    qk_scale_log2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, dims, dim_ok,
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Online softmax (log2 units) of the query tile over keys ``[lo, hi)``, row r from
    ``row_start[r]`` on: the loop body of the exact decode kernel. Where the batch row's key
    mask has holes (``holes``), only the keys it keeps (read only then)."""
    for block_start in range(lo, hi, BLOCK_N):
        keys = block_start + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        keys64 = keys.to(tl.int64)
        tile_ok = key_ok[:, None] & dim_ok[None, :]
        k, v = load_kv_tile(k_base, v_base, keys64, tile_ok, dims, stride_kn, stride_kd,
                            stride_vn, stride_vd, UPCAST)
        attend = key_ok[None, :] & (keys[None, :] >= row_start[:, None])
        if HAS_MASK:
            # (holes broadcast by arithmetic: a scalar bool in a mask trips the interpreter)
            read = key_ok & (keys * 0 + holes != 0)
            keep = tl.load(mask_base + keys64 * stride_mask_n, mask=read, other=1)
            attend = attend & (keep != 0)[None, :]
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
    q_ptr, k_ptr, v_ptr, t_ptr, s0_ptr, cand_d_ptr, cand_pos_ptr, cand_ok_ptr, mask_ptr, holes_ptr,
    hit_ptr, slot_ptr, keys_ptr, group_first_ptr, group_items_ptr, part_o_ptr, part_lse_ptr,
    qk_scale_log2, radius2, n_groups, n_kv_heads, group, head_dim, target_items, n_candidates,
    ring_size, offset, sinks, t_min,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pw, stride_pi, stride_pg, stride_pd,
    stride_plw, stride_pli, stride_plg,
    stride_db, stride_dh, stride_mask_b, stride_mask_n,
    STREAM_MISSES: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_GROUPS: tl.constexpr,
    BLOCK_GP: tl.constexpr,
):
    # A program owns one work item of the plan (_find_item): a run of at most C keys of one
    # (row, KV head) group's range [U, t], read once in [BLOCK_N, D] blocks; the group's query
    # heads are the rows of one [BLOCK_G, D] tile, each masking its own prefix start.
    item = tl.program_id(0)
    kv_pid, first_item, n_items, keys_per_item = _find_item(
        cand_d_ptr, cand_pos_ptr, cand_ok_ptr, t_ptr, s0_ptr, holes_ptr, item, n_groups,
        n_kv_heads, group, n_candidates, ring_size, offset, sinks, radius2, t_min, target_items,
        STREAM_MISSES, HAS_MASK, BLOCK_N, BLOCK_GROUPS, BLOCK_GP, BLOCK_R)
    has_item = kv_pid >= 0  # the plan has fewer items than the grid has programs
    rows = tl.arange(0, BLOCK_G)
    # (A scalar bool from a reduction broadcast into a mask trips Triton's interpreter.)
    row_ok = (rows < group) & (rows * 0 + kv_pid >= 0)
    kv_pid = tl.maximum(kv_pid, 0)
    part = item - first_item
    batch = (kv_pid // n_kv_heads).to(tl.int64)
    kv_head = (kv_pid % n_kv_heads).to(tl.int64)
    heads = kv_head * group + rows
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    t = tl.load(t_ptr + batch)
    s0 = tl.load(s0_ptr + batch)
    e_t = tl.maximum(t + 1 - offset, s0)
    q_heads = n_kv_heads * group
    may_hit = _row_may_hit(holes_ptr, batch, batch >= 0, HAS_MASK)
    hit, slot, start = _decide(
        cand_d_ptr, cand_pos_ptr, cand_ok_ptr, batch * q_heads + heads, row_ok, t, s0, may_hit,
        n_candidates, ring_size, offset, sinks, radius2, t_min, STREAM_MISSES, BLOCK_R)

    # The group's first item publishes its heads' decisions and where its items lie.
    decision = batch * stride_db + heads * stride_dh
    first_part = row_ok & (rows * 0 + part == 0)
    keys_read = (tl.maximum(e_t - start, 0) + (t + 1 - e_t) + (tl.minimum(s0 + sinks, e_t) - s0))
    tl.store(hit_ptr + decision, hit.to(tl.uint8), mask=first_part)
    tl.store(slot_ptr + decision, slot, mask=first_part)
    tl.store(keys_ptr + decision, keys_read.to(tl.int32), mask=first_part)
    lead = first_part & (rows == 0)
    tl.store(group_first_ptr + kv_pid + rows * 0, first_item + rows * 0, mask=lead)
    tl.store(group_items_ptr + kv_pid + rows * 0, n_items + rows * 0, mask=lead)

    # The union [U, t]: every head's prefix start, and E(t) so the tail is always covered.
    union_start = tl.minimum(tl.min(tl.where(row_ok, start, e_t), axis=0), e_t)
    lo = union_start + part * keys_per_item
    hi = tl.where(has_item, tl.minimum(lo + keys_per_item, t + 1), lo)

    q = tl.load(q_ptr + batch * stride_qb + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    mask_base = mask_ptr + batch * stride_mask_b
    holes = (may_hit == 0).to(tl.int32)  # 1 where the row's mask has holes
    no_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    no_sum = tl.zeros([BLOCK_G], tl.float32)
    no_acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)

    p_max, p_sum, p_acc = _attend_blocks(
        q, k_base, v_base, mask_base, holes, lo, tl.minimum(hi, e_t), start, no_max, no_sum,
        no_acc, qk_scale_log2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, dims,
        dim_ok, HAS_MASK, UPCAST, DOT_PRECISION, BLOCK_N)
    everyone = tl.zeros([BLOCK_G], tl.int32)
    t_max, t_sum, t_acc = _attend_blocks(
        q, k_base, v_base, mask_base, holes, tl.maximum(lo, e_t), hi, everyone, no_max, no_sum,
        no_acc, qk_scale_log2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, dims,
        dim_ok, HAS_MASK, UPCAST, DOT_PRECISION, BLOCK_N)
    sinks_end = tl.where(has_item & (part == 0), tl.minimum(s0 + sinks, e_t), s0)
    t_max, t_sum, t_acc = _attend_blocks(
        q, k_base, v_base, mask_base, holes, s0, sinks_end, everyone, t_max, t_sum, t_acc,
        qk_scale_log2, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, dims, dim_ok,
        HAS_MASK, UPCAST, DOT_PRECISION, BLOCK_N)

    # Both states of the item, empty ones as (0, -inf): the finalize merges the group's items.
    item_o = part_o_ptr + item * stride_pi
    item_lse = part_lse_ptr + item * stride_pli
    _store_state(item_o, item_lse, rows * stride_pg, rows * stride_plg, p_max, p_sum, p_acc,
                 dims, dim_ok, row_ok, stride_pd)
    _store_state(item_o + stride_pw, item_lse + stride_plw, rows * stride_pg, rows * stride_plg,
                 t_max, t_sum, t_acc, dims, dim_ok, row_ok, stride_pd)


@triton.jit
def _finalize_kernel(
    q_pre_ptr, t_ptr, s0_ptr, ring_q_ptr, ring_o_ptr, ring_lse_ptr, ring_pos_ptr, ring_depth_ptr,
    hit_ptr, slot_ptr, keys_ptr, group_first_ptr, group_items_ptr, part_o_ptr, part_lse_ptr,
    miss_o_ptr, miss_lse_ptr, out_ptr, counters_ptr,
    q_heads, group, head_dim, ring_size,
    stride_qpb, stride_qph, stride_qpd,
    stride_rb, stride_rh, stride_rm, stride_rd,
    stride_rob, stride_roh, stride_rom, stride_rod,
    stride_lb, stride_lh, stride_lm,
    stride_pw, stride_pi, stride_pg, stride_pd,
    stride_plw, stride_pli, stride_plg,
    stride_mob, stride_moh, stride_mod, stride_mlb, stride_mlh,
    stride_outb, stride_outh, stride_outd,
    stride_db, stride_dh, stride_cr, stride_ch,
    STREAM_MISSES: tl.constexpr, COUNT: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # A program owns one (row, query head): it merges its group's items' prefix and tail states,
    # amends with entry j* on a hit (on a miss with a given prefix state, with that state),
    # writes o and ring slot t mod M, and adds the step to the counters.
    bh = tl.program_id(0)
    batch = (bh // q_heads).to(tl.int64)
    head = (bh % q_heads).to(tl.int64)
    kv_pid = bh // group
    member = bh % group
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    # Latency-bound: issue every independent load first, the entry's (which needs the slot)
    # last, so their round trips overlap.
    decision = batch * stride_db + head * stride_dh
    hit = tl.load(hit_ptr + decision) != 0
    slot = tl.load(slot_ptr + decision)
    first_item = tl.load(group_first_ptr + kv_pid)
    n_items = tl.load(group_items_ptr + kv_pid)
    t = tl.load(t_ptr + batch)
    q = tl.load(q_pre_ptr + batch * stride_qpb + head * stride_qph + dims * stride_qpd,
                mask=dim_ok)
    part_o = part_o_ptr + first_item * stride_pi + member * stride_pg
    part_lse = part_lse_ptr + first_item * stride_pli + member * stride_plg
    a_max = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), axis=0)
    a_total = tl.sum(tl.zeros([BLOCK_S], tl.float32), axis=0)
    a_acc = tl.zeros([BLOCK_D], tl.float32)
    t_max, t_total, t_acc = a_max, a_total, a_acc
    for first in range(0, n_items, BLOCK_S):
        parts = first + tl.arange(0, BLOCK_S)
        part_ok = parts < n_items
        o_offsets = parts[:, None] * stride_pi + dims[None, :] * stride_pd
        o_ok = part_ok[:, None] & dim_ok[None, :]
        a_max, a_total, a_acc = merge_step(
            a_max, a_total, a_acc,
            tl.load(part_lse + parts * stride_pli, mask=part_ok, other=float("-inf")),
            tl.load(part_o + o_offsets, mask=o_ok, other=0.0))
        t_max, t_total, t_acc = merge_step(
            t_max, t_total, t_acc,
            tl.load(part_lse + stride_plw + parts * stride_pli, mask=part_ok,
                    other=float("-inf")),
            tl.load(part_o + stride_pw + o_offsets, mask=o_ok, other=0.0))
    # A missed entry may hold anything: its slot is read (in bounds) but never used.
    ring = batch * stride_lb + head * stride_lh
    ring_o = ring_o_ptr + batch * stride_rob + head * stride_roh
    o_j = tl.load(ring_o + slot * stride_rom + dims * stride_rod, mask=dim_ok)
    lse_j = tl.load(ring_lse_ptr + ring + slot * stride_lm)
    depth = tl.where(hit, tl.load(ring_depth_ptr + ring + slot * stride_lm) + 1, 0)
    if STREAM_MISSES:  # a miss reuses nothing
        o_j = tl.where(hit, o_j, 0.0)
        lse_j = tl.where(hit, lse_j, float("-inf"))
    else:  # a miss takes the given prefix state as its entry
        o_j = tl.where(hit, o_j, tl.load(miss_o_ptr + batch * stride_mob + head * stride_moh
                                         + dims * stride_mod, mask=dim_ok))
        lse_j = tl.where(hit, lse_j, tl.load(miss_lse_ptr + batch * stride_mlb
                                             + head * stride_mlh))
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
    wanted = triton.cdiv(2 * multiprocessor_count(device), max(batch * q_heads, 1))
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


def _check_miss_prefix(miss_prefix: tuple[Tensor, Tensor], q: Tensor) -> tuple[Tensor, Tensor]:
    o, lse = miss_prefix
    batch, q_heads, head_dim = q.shape
    for name, x, shape in (("o", o, (batch, q_heads, head_dim)), ("lse", lse, (batch, q_heads))):
        if x.shape != shape or x.dtype != torch.float32 or x.device != q.device:
            raise ValueError(f"miss_prefix {name}: expected a float32 {list(shape)} state on "
                             f"{q.device}, got {x.dtype} {tuple(x.shape)} on {x.device}")
    return o, lse


def mac_decode_step(
    q: Tensor, q_pre: Tensor, k: Tensor, v: Tensor, ring: MACRing, positions: Tensor,
    key_starts: Tensor, scale: float, *, offset: int, sinks: int = 0, tau: float,
    t_min: int, max_depth: int, counters: Tensor | None = None,
    miss_prefix: tuple[Tensor, Tensor] | None = None, num_splits: int | None = None,
    match_programs: int | None = None, block_n: int | None = None,
    candidates: MatchCandidates | None = None, key_mask: Tensor | None = None,
    holes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One MAC decode step on the GPU (or the Triton interpreter); updates ``ring`` in place.

    Same arguments and results as :func:`macopt.kernels.mac_reference.mac_decode_step`:
    ``o[B, Hq, D]`` in ``q.dtype``, ``hit[B, Hq]`` bool, ``keys_read[B, Hq]`` int32.
    ``positions`` and ``key_starts`` (int32 or int64 ``[B]``) stay on the device. ``counters``
    (int64 ``[COUNTER_ROWS, Hq]`` of :mod:`macopt.kernels.mac_counters`), when given, gets the
    step added by the finalize launch. ``miss_prefix`` (fp32 ``o[B, Hq, D]``, ``lse[B, Hq]``):
    the prefix state a missing head takes instead of attending its prefix (the reference's).
    The last three arguments override the launch shape (tests, benchmarks): ``num_splits`` is
    the work items per (row, KV head) of an all-miss step (default: the exact decode kernel's
    split count for this cache size, with its blocks and warps). ``candidates``: this step's
    :func:`match_candidates`, when the caller ran the match already (MAC + Top-K + phi decides
    which groups need a Top-K + phi state from them). ``key_mask`` (bool ``[B, N]``) with
    ``holes`` (bool ``[B]``: the rows whose mask drops keys inside ``[s0, t]``): such a row
    misses and attends only the keys its mask keeps (exact attention over the mask); other
    rows never read the mask. Three launches: match, attention, finalize.
    """
    _check_ring(q, q_pre, ring)
    batch, q_heads, head_dim = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    n_groups = batch * kv_heads
    config = decode_launch_config(batch, kv_heads, n_keys, head_dim, group, q.device,
                                  k.element_size())
    target_items = n_groups * (num_splits or config.num_splits)
    n_programs = target_items + n_groups  # each group rounds its item count up at most once
    block_n = block_n or config.block_n
    ring_size = ring.size
    positions, key_starts = positions.contiguous(), key_starts.contiguous()
    if candidates is None:
        candidates = match_candidates(q_pre, ring, positions, key_starts, t_min=t_min,
                                      max_depth=max_depth, match_programs=match_programs)
    cand_d, cand_pos, cand_ok = candidates
    n_match = cand_d.shape[2]
    stream_misses = miss_prefix is None
    miss_o, miss_lse = (q, positions) if stream_misses else _check_miss_prefix(miss_prefix, q)

    def new(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return _new_empty(*shape, dtype=dtype, device=q.device)

    hit, slot = new(batch, q_heads, dtype=torch.uint8), new(batch, q_heads, dtype=torch.int32)
    keys_read = new(batch, q_heads, dtype=torch.int32)
    group_first = new(n_groups, dtype=torch.int32)
    group_items = new(n_groups, dtype=torch.int32)
    part_o, part_lse = new(2, n_programs, group, head_dim), new(2, n_programs, group)
    out = new(batch, q_heads, head_dim, dtype=q.dtype)
    block_d = triton.next_power_of_2(head_dim)
    block_r = triton.next_power_of_2(n_match)
    radius2 = threshold(head_dim, tau)
    has_mask = key_mask is not None
    if has_mask != (holes is not None):
        raise ValueError("key_mask and holes: give both or neither")
    if has_mask and not stream_misses:
        raise ValueError("key_mask: not with miss_prefix (a given prefix ignores the mask)")
    # Without a mask the kernel never reads these pointers; positions stands in.
    mask = key_mask.view(torch.uint8) if has_mask else positions
    holes = holes.contiguous().view(torch.uint8) if has_mask else positions
    mask_strides = (mask.stride(0), mask.stride(1)) if has_mask else (0, 0)

    _attention_kernel[(n_programs,)](
        q, k, v, positions, key_starts, cand_d, cand_pos, cand_ok, mask, holes,
        hit, slot, keys_read, group_first, group_items, part_o, part_lse,
        scale * _LOG2_E, radius2, n_groups, kv_heads, group, head_dim, target_items, n_match,
        ring_size, offset, sinks, t_min,
        *q.stride(), *k.stride(), *v.stride(), *part_o.stride(), *part_lse.stride(),
        *hit.stride(), *mask_strides,
        STREAM_MISSES=stream_misses, HAS_MASK=has_mask, UPCAST=interpreting(),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        BLOCK_R=block_r, BLOCK_GROUPS=triton.next_power_of_2(n_groups),
        BLOCK_GP=triton.next_power_of_2(group),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    count = counters is not None
    if count and (counters.dtype != torch.int64 or counters.shape[1] != q_heads):
        raise ValueError(f"counters: expected int64 [rows, {q_heads}], got {counters.dtype} "
                         f"{tuple(counters.shape)}")
    counter_strides = counters.stride() if count else (0, 0)
    miss_strides = (0,) * 5 if stream_misses else (*miss_o.stride(), *miss_lse.stride())
    _finalize_kernel[(batch * q_heads,)](
        q_pre, positions, key_starts, ring.q, ring.o, ring.lse, ring.pos, ring.depth,
        hit, slot, keys_read, group_first, group_items, part_o, part_lse, miss_o, miss_lse,
        out, counters if count else hit,
        q_heads, group, head_dim, ring_size,
        *q_pre.stride(), *ring.q.stride(), *ring.o.stride(), *ring.lse.stride(),
        *part_o.stride(), *part_lse.stride(), *miss_strides, *out.stride(), *hit.stride(),
        *counter_strides,
        STREAM_MISSES=stream_misses, COUNT=count, BLOCK_D=block_d,
        # Two [BLOCK_S, D] fp32 tiles in flight (BENCHMARKS.md 2f, 2h).
        BLOCK_S=min(TUNING.finalize_block_s, max(1, 4096 // block_d)),
        num_warps=4,
    )
    return out, hit.view(torch.bool), keys_read


def match_candidates(
    q_pre: Tensor, ring: MACRing, positions: Tensor, key_starts: Tensor, *, t_min: int,
    max_depth: int, match_programs: int | None = None, out: MatchCandidates | None = None,
) -> MatchCandidates:
    """The match launch of :func:`mac_decode_step` on its own: each head's nearest entry per
    ring part. ``mac_decode_step(..., candidates=...)`` then skips its own match. ``out``:
    buffers from :func:`empty_candidates` to write into (nothing is allocated then: the launch
    may go to another stream than the one that owns the memory)."""
    n_match, slots_per_program, block_m = _match_layout(q_pre, ring.size, match_programs)
    found = out if out is not None else empty_candidates(q_pre, ring.size, match_programs)
    batch, q_heads, head_dim = q_pre.shape
    if found.d.shape != (batch, q_heads, n_match):
        raise ValueError(f"out: expected [{batch}, {q_heads}, {n_match}] buffers "
                         f"(empty_candidates), got {tuple(found.d.shape)}")
    # (contiguous() copies only what is not: callers on a side stream pass contiguous ones.)
    _match_kernel[(batch * q_heads, n_match)](
        q_pre, ring.q, ring.pos, ring.lse, ring.depth, positions.contiguous(),
        key_starts.contiguous(), *found,
        q_heads, ring.size, head_dim, slots_per_program, t_min, max_depth,
        *q_pre.stride(), *ring.q.stride(), *ring.pos.stride(),
        BLOCK_M=block_m, BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=8,  # 8 warps: half the registers a thread
    )
    return found


def empty_candidates(q_pre: Tensor, ring_size: int,
                     match_programs: int | None = None) -> MatchCandidates:
    """Unwritten buffers for :func:`match_candidates` of ``q_pre[B, Hq, D]``."""
    n_match = _match_layout(q_pre, ring_size, match_programs)[0]
    batch, q_heads, _ = q_pre.shape
    return MatchCandidates(*(_new_empty(batch, q_heads, n_match, dtype=dtype, device=q_pre.device)
                             for dtype in (torch.float32, torch.int32, torch.uint8)))


def _match_layout(q_pre: Tensor, ring_size: int,
                  match_programs: int | None) -> tuple[int, int, int]:
    """(ring parts R, slots a part, slots a tile) of the match launch."""
    batch, q_heads, _ = q_pre.shape
    n_match = match_programs or _match_programs(batch, q_heads, ring_size, q_pre.device)
    block_m = min(_MATCH_BLOCK_M, triton.next_power_of_2(triton.cdiv(ring_size, n_match)))
    slots_per_program = triton.cdiv(triton.cdiv(ring_size, n_match), block_m) * block_m
    return triton.cdiv(ring_size, slots_per_program), slots_per_program, block_m  # no empty part


@triton.jit
def _all_hit_kernel(
    cand_d_ptr, cand_pos_ptr, cand_ok_ptr, t_ptr, s0_ptr, out_ptr,
    n_kv_heads, group, n_candidates, ring_size, offset, radius2, t_min,
    BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One program per (row, KV head): its heads' decisions, exactly as the attention kernel
    # makes them (_decide), and whether every one of them hits.
    kv_pid = tl.program_id(0)
    batch = (kv_pid // n_kv_heads).to(tl.int64)
    members = tl.arange(0, BLOCK_G)
    member_ok = members < group
    t = tl.load(t_ptr + batch)
    s0 = tl.load(s0_ptr + batch)
    hit, _, _ = _decide(cand_d_ptr, cand_pos_ptr, cand_ok_ptr, kv_pid * group + members,
                        member_ok, t, s0, True, n_candidates, ring_size, offset, 0, radius2,
                        t_min, False, BLOCK_R)
    misses = tl.sum((member_ok & ~hit).to(tl.int32), axis=0)
    tl.store(out_ptr + kv_pid, (misses == 0).to(tl.uint8))


def all_hit_groups(
    candidates: MatchCandidates, positions: Tensor, key_starts: Tensor, n_kv_heads: int, *,
    ring_size: int, offset: int, tau: float, t_min: int, head_dim: int,
) -> Tensor:
    """``[B, Hkv]`` uint8: 1 where every query head of the (row, KV head) group hits this step
    (the decisions :func:`mac_decode_step` makes from the same candidates). One launch."""
    batch, q_heads, n_match = candidates.d.shape
    out = _new_empty(batch, n_kv_heads, dtype=torch.uint8, device=candidates.d.device)
    group = q_heads // n_kv_heads
    _all_hit_kernel[(batch * n_kv_heads,)](
        *candidates, positions.contiguous(), key_starts.contiguous(), out, n_kv_heads, group,
        n_match, ring_size, offset, threshold(head_dim, tau), t_min,
        BLOCK_G=triton.next_power_of_2(group), BLOCK_R=triton.next_power_of_2(n_match),
    )
    return out
