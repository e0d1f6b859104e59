"""Split-KV decode attention (FlashDecoding) with GQA, returning attention states.

One decode query per row: ``q[B, Hq, D]`` attends keys ``[starts[b], ends[b])`` of
``k, v[B, Hkv, N, D]`` (intersected with ``key_mask[b]`` when given); query head ``h`` reads KV
head ``h // g``. The keys of each row are cut into ``num_splits`` runtime-sized chunks; each
(batch row, KV head, split) program streams its chunk once for the whole query group and writes
a partial state; a small second kernel (:func:`macopt.kernels.merge.merge_states_into`) merges
them.

Lengths stay on the device and the split count comes from static shapes only, so a launch never
syncs with the host and can be captured in a CUDA graph.

``fuse_merge`` folds the merge into the split kernel instead: the last program of each
(row, KV head) to finish, found with an int32 arrival counter that it resets to zero, merges the
group's states. The counters are zeroed fresh for each launch (a workspace like the split
states, so a CUDA graph records their memset; see :func:`_group_counters`), so no two launches
share them. Measured slower for exact decode on the H100 (see :class:`DecodeConfig`); the
mask-holes fallback (``otherwise=``) uses it.

>>> o, lse = decode_attention_state(q, k, v, starts, ends, None, scale=q.shape[-1] ** -0.5)
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from macopt.kernels.attention_tile import load_kv_tile, online_softmax_update
from macopt.kernels.launch import DecodeConfig, decode_launch_config, interpreting
from macopt.kernels.merge import merge_row_states, merge_states_into

Tensor = torch.Tensor

# Every output and workspace buffer comes from here; tests swap in a NaN-filling allocator to
# prove that the kernels write every element.
_new_empty = torch.empty

_LOG2_E = 1.4426950408889634
_LN_2 = tl.constexpr(0.6931471805599453)  # a constexpr: jitted code may read it
_MERGE_TILE = 8192  # fp32 elements of the last program's [states, D] merge tile



@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, starts_ptr, ends_ptr, mask_ptr, part_o_ptr, part_lse_ptr,
    o_ptr, lse_ptr, counter_ptr, otherwise_ptr,
    qk_scale_log2, n_kv_heads, n_keys, group, num_splits,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_start_b, stride_start_h, stride_end_b, stride_end_h,
    stride_mask_b, stride_mask_n,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_plb, stride_plh, stride_pls,
    stride_ob, stride_oh, stride_od, stride_lb, stride_lh,
    stride_xb, stride_xh, stride_xd,
    HAS_MASK: tl.constexpr, HAS_OTHERWISE: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, FUSE_MERGE: tl.constexpr, MERGE_S: tl.constexpr,
):
    # A program owns one (batch row, KV head, split): the g query heads of the group are the rows
    # of one [BLOCK_G, D] tile, so each [BLOCK_N, D] K/V block is read once for all of them.
    kv_pid = tl.program_id(0)
    split = tl.program_id(1)
    batch = (kv_pid // n_kv_heads).to(tl.int64)  # int64: batch * stride can pass 2**31
    kv_head = (kv_pid % n_kv_heads).to(tl.int64)

    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < group
    q_heads = kv_head * group + rows
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM  # BLOCK_D pads 80 and 96 to a power of two

    # Ranges are addressed per query head: head stride 0 shares a row's range with all its heads,
    # 1 gives each query head its own (MAC); the group streams the union of its heads' ranges.
    start_ptrs = starts_ptr + batch * stride_start_b + q_heads * stride_start_h
    end_ptrs = ends_ptr + batch * stride_end_b + q_heads * stride_end_h
    row_start = tl.maximum(tl.load(start_ptrs, mask=row_ok, other=0).to(tl.int32), 0)
    row_end = tl.minimum(tl.load(end_ptrs, mask=row_ok, other=0).to(tl.int32), n_keys)
    group_start = tl.min(tl.where(row_ok, row_start, n_keys), axis=0)
    group_end = tl.max(tl.where(row_ok, row_end, 0), axis=0)

    # This split's chunk of the group's key range, a whole number of blocks long.
    group_len = tl.maximum(group_end - group_start, 0)
    chunk = tl.cdiv(tl.cdiv(group_len, num_splits), BLOCK_N) * BLOCK_N
    split_start = group_start + split * chunk
    split_end = tl.minimum(split_start + chunk, group_end)

    q = tl.load(
        q_ptr + batch * stride_qb + q_heads[:, None] * stride_qh + dims[None, :] * stride_qd,
        mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh

    running_max = tl.full([BLOCK_G], float("-inf"), tl.float32)  # log2 units
    running_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for block_start in range(split_start, split_end, BLOCK_N):
        keys = block_start + tl.arange(0, BLOCK_N)
        key_ok = keys < split_end
        if HAS_MASK:
            attend = tl.load(mask_ptr + batch * stride_mask_b + keys * stride_mask_n,
                             mask=key_ok, other=0)
            key_ok = key_ok & (attend != 0)
        keys64 = keys.to(tl.int64)
        kv_tile_ok = key_ok[:, None] & dim_ok[None, :]
        k, v = load_kv_tile(k_base, v_base, keys64, kv_tile_ok, dims, stride_kn, stride_kd,
                            stride_vn, stride_vd, UPCAST)
        in_row_range = (keys[None, :] >= row_start[:, None]) & (keys[None, :] < row_end[:, None])
        running_max, running_sum, acc = online_softmax_update(
            q, k, v, key_ok[None, :] & in_row_range, running_max, running_sum, acc,
            qk_scale_log2, DOT_PRECISION)

    has_keys = running_sum > 0
    o = acc / tl.where(has_keys, running_sum, 1.0)[:, None]
    log2_sum = tl.log2(tl.where(has_keys, running_sum, 1.0))
    lse = tl.where(has_keys, (running_max + log2_sum) * _LN_2, float("-inf"))
    tile_ok = row_ok[:, None] & dim_ok[None, :]
    if SPLIT:
        group_o = part_o_ptr + batch * stride_pb + kv_head * group * stride_ph
        group_lse = part_lse_ptr + batch * stride_plb + kv_head * group * stride_plh
        tl.store(group_o + rows[:, None] * stride_ph + split * stride_ps
                 + dims[None, :] * stride_pd, o, mask=tile_ok)
        tl.store(group_lse + rows * stride_plh + split * stride_pls, lse, mask=row_ok)
    if SPLIT and FUSE_MERGE:
        # The barrier puts every thread's stores before this program's release; the program
        # that arrives last acquires all the group's stores, merges them, re-arms the counter.
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + kv_pid, 1, sem="acq_rel")
        if arrived == num_splits - 1:
            out_o = o_ptr + batch * stride_ob + kv_head * group * stride_oh
            out_lse = lse_ptr + batch * stride_lb + kv_head * group * stride_lh
            alt_o = otherwise_ptr + batch * stride_xb + kv_head * group * stride_xh
            _merge_group(group_o, group_lse, out_o, out_lse, alt_o, group, num_splits, stride_ph,
                         stride_ps, stride_pd, stride_plh, stride_pls, stride_oh, stride_od,
                         stride_lh, stride_xh, stride_xd, dims, dim_ok, MERGE_S, HAS_OTHERWISE)
            tl.store(counter_ptr + kv_pid, 0)
    if not SPLIT:  # the only split's state is the answer
        if HAS_OTHERWISE:  # a query that attended no key takes its row of `otherwise`
            alt = tl.load(otherwise_ptr + batch * stride_xb + q_heads[:, None] * stride_xh
                          + dims[None, :] * stride_xd, mask=tile_ok, other=0.0)
            o = tl.where(has_keys[:, None], o, alt.to(tl.float32))
        tl.store(o_ptr + batch * stride_ob + q_heads[:, None] * stride_oh
                 + dims[None, :] * stride_od, o.to(o_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(lse_ptr + batch * stride_lb + q_heads * stride_lh, lse, mask=row_ok)


@triton.jit
def _merge_group(
    part_o, part_lse, o_ptr, lse_ptr, alt_ptr, group, num_splits, stride_ph, stride_ps,
    stride_pd, stride_plh, stride_pls, stride_oh, stride_od, stride_lh, stride_xh, stride_xd,
    dims, dim_ok, MERGE_S: tl.constexpr, HAS_OTHERWISE: tl.constexpr,
):
    """Merge the group's split states into its outputs, one head at a time, MERGE_S splits per
    step: a [MERGE_S, D] fp32 tile of at most _MERGE_TILE elements. ``HAS_OTHERWISE``: a head
    that attended no key takes its row of ``alt_ptr`` instead."""
    for head in range(0, group):
        o, lse = merge_row_states(part_o + head * stride_ph, part_lse + head * stride_plh,
                                  num_splits, stride_ps, stride_pd, stride_pls, dims, dim_ok,
                                  MERGE_S)
        if HAS_OTHERWISE:
            alt = tl.load(alt_ptr + head * stride_xh + dims * stride_xd, mask=dim_ok, other=0.0)
            o = tl.where(lse == float("-inf"), alt.to(tl.float32), o)
        tl.store(o_ptr + head * stride_oh + dims * stride_od, o.to(o_ptr.dtype.element_ty),
                 mask=dim_ok)
        tl.store(lse_ptr + head * stride_lh, lse)


def _resolve_config(q: Tensor, k: Tensor, overrides: dict[str, int | None]) -> DecodeConfig:
    batch, kv_heads, n_keys, head_dim = k.shape
    config = decode_launch_config(batch, kv_heads, n_keys, head_dim, q.shape[1] // kv_heads,
                            q.device, k.element_size())
    chosen = {name: value for name, value in overrides.items() if value is not None}
    config = dataclasses.replace(config, **chosen)
    if config.num_splits < 1 or config.block_n < 16:
        raise ValueError(f"expected num_splits >= 1 and block_n >= 16, got {config}")
    return config


def _range_strides(bounds: Tensor) -> tuple[int, int]:
    """(batch, query-head) strides of ``starts``/``ends`` given as ``[B]`` or ``[B, Hq]``."""
    return (bounds.stride(0), bounds.stride(1) if bounds.dim() == 2 else 0)


def _group_counters(device: torch.device, n_groups: int) -> Tensor:
    """Zeroed int32 arrival counters of ``n_groups`` split groups, fresh for each launch (a
    memset, a graph node under CUDA graphs). Not a cached buffer: one first allocated while
    torch.compile's CUDA-graph trees warm up lives in their memory pool, and they refuse a
    live allocation they do not own ("tensor(s) in the cudagraph pool not tracked as
    outputs"), which is how MAC's generate() failed on the GPU."""
    return torch.zeros(n_groups, dtype=torch.int32, device=device)


def _launch_split_kernel(
    q: Tensor, k: Tensor, v: Tensor, starts: Tensor, ends: Tensor, key_mask: Tensor | None,
    scale: float, o: Tensor, lse: Tensor, config: DecodeConfig,
    otherwise: Tensor | None = None,
) -> None:
    """Run the split kernel (and its fused merge) writing ``o[B, Hq, D]``, ``lse[B, Hq]``;
    with ``otherwise[B, Hq, D]`` a query that attends no key takes its row of it (the merge
    is then always fused: the rows are chosen where the group's states meet)."""
    if otherwise is not None and config.num_splits > 1 and not config.fuse_merge:
        config = dataclasses.replace(config, fuse_merge=True)
    batch, kv_heads, n_keys, head_dim = k.shape
    q_heads, splits = q.shape[1], config.num_splits
    group, block_d = q_heads // kv_heads, triton.next_power_of_2(head_dim)
    # Without a mask the kernel never reads its pointer; starts stands in for it. One split
    # writes o and lse directly and needs no workspace or counters: o and lse stand in.
    mask = key_mask.view(torch.uint8) if key_mask is not None else starts
    mask_strides = (mask.stride(0), mask.stride(1)) if key_mask is not None else (0, 0)
    fused = splits > 1 and config.fuse_merge
    if splits > 1:
        part_o = _new_empty((batch, q_heads, splits, head_dim), dtype=torch.float32,
                            device=q.device)
        part_lse = _new_empty((batch, q_heads, splits), dtype=torch.float32, device=q.device)
        counters = _group_counters(q.device, batch * kv_heads) if fused else lse
    else:
        part_o, part_lse, counters = o.unsqueeze(2), lse.unsqueeze(2), lse
    grid = (batch * kv_heads, splits)  # splits on axis 1: its 65535 limit is ample
    _decode_split_kernel[grid](
        q, k, v, starts, ends, mask, part_o, part_lse, o, lse, counters,
        o if otherwise is None else otherwise,  # never read without it
        scale * _LOG2_E, kv_heads, n_keys, group, splits,
        *q.stride(), *k.stride(), *v.stride(),
        *_range_strides(starts), *_range_strides(ends),
        *mask_strides,
        *part_o.stride(), *part_lse.stride(), *o.stride(), *lse.stride(),
        *(o if otherwise is None else otherwise).stride(),
        HAS_MASK=key_mask is not None,
        HAS_OTHERWISE=otherwise is not None,
        UPCAST=interpreting(),
        # fp32 inputs: 3xTF32 keeps fp32 accuracy on tensor cores (plain ieee spills registers)
        DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
        HEAD_DIM=head_dim,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=config.block_n,
        BLOCK_D=block_d,
        SPLIT=splits > 1,
        FUSE_MERGE=fused,
        MERGE_S=min(triton.next_power_of_2(splits), _MERGE_TILE // block_d),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if splits > 1 and not fused:
        merge_states_into(part_o, part_lse, o, lse)


def _decode(
    q: Tensor, k: Tensor, v: Tensor, starts: Tensor, ends: Tensor, key_mask: Tensor | None,
    scale: float, out_dtype: torch.dtype, config: DecodeConfig,
    otherwise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    batch, q_heads, head_dim = q.shape
    o = _new_empty((batch, q_heads, head_dim), dtype=out_dtype, device=q.device)
    lse = _new_empty((batch, q_heads), dtype=torch.float32, device=q.device)
    if o.numel() != 0:
        _launch_split_kernel(q, k, v, starts, ends, key_mask, scale, o, lse, config, otherwise)
    return o, lse


def decode_attention_state(
    q: Tensor, k: Tensor, v: Tensor, starts: Tensor, ends: Tensor, key_mask: Tensor | None,
    scale: float, num_splits: int | None = None, *, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
    fuse_merge: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """State ``(o fp32 [B, Hq, D], lse fp32 [B, Hq])`` of one decode query per row.

    Keys of row ``b`` are ``[starts[b], ends[b])`` of ``k, v[B, Hkv, N, D]`` (any strides),
    intersected with ``key_mask[b]`` (bool ``[B, N]``, True = attend) when given; ``starts`` or
    ``ends`` of shape ``[B, Hq]`` give each query head its own range. A query with no key gets
    the empty state ``(0, -inf)``. ``num_splits``, ``block_n``, ``num_warps``, ``num_stages``
    and ``fuse_merge`` override :func:`~macopt.kernels.launch.decode_launch_config` (for
    benchmarks and tests).

    >>> o, lse = decode_attention_state(q, k, v, starts, ends, None, scale=0.125)
    """
    overrides = {"num_splits": num_splits, "block_n": block_n, "num_warps": num_warps,
                 "num_stages": num_stages, "fuse_merge": fuse_merge}
    config = _resolve_config(q, k, overrides)
    return _decode(q, k, v, starts, ends, key_mask, scale, torch.float32, config)


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, starts: Tensor, ends: Tensor, key_mask: Tensor | None,
    scale: float, num_splits: int | None = None, *, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
    fuse_merge: bool | None = None, otherwise: Tensor | None = None,
) -> Tensor:
    """Decode attention output ``o[B, Hq, D]`` in ``q.dtype``; a row with no key gives zeros,
    or its row of ``otherwise[B, Hq, D]`` when given (one launch either way: what a method's
    output falls back to for the rows it must not answer, :mod:`macopt.passes.mask_holes`).

    Same arguments as :func:`decode_attention_state`.

    >>> o = decode_attention(q, k, v, starts, ends, key_mask, scale=0.125, num_splits=8)
    """
    overrides = {"num_splits": num_splits, "block_n": block_n, "num_warps": num_warps,
                 "num_stages": num_stages, "fuse_merge": fuse_merge}
    config = _resolve_config(q, k, overrides)
    return _decode(q, k, v, starts, ends, key_mask, scale, q.dtype, config, otherwise)[0]
