"""The split-KV decode kernel equals the fp64 reference state, for every supported shape.

On CPU the kernels run through Triton's interpreter (tests/conftest.py), so sizes stay tiny.
"""

import math

import pytest
import torch

import macopt  # noqa: F401  (registers torch.ops.macopt)
from macopt.kernels import decode, launch, merge, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (o: absolute and relative, on values of order 1; lse: absolute)
TOLERANCES = {
    torch.float32: (1e-4, 1e-3),
    torch.bfloat16: (2e-2, 1e-3),
    torch.float16: (5e-3, 1e-3),
}


def make_problem(batch=4, kv_heads=2, group=2, n_keys=150, head_dim=64, dtype=torch.float32,
                 seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, n_keys, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, n_keys, head_dim, generator=gen)
    return tuple(t.to(device=DEVICE, dtype=dtype) for t in (q, k, v))


def mixed_ranges(batch, n_keys):
    """Rows: the whole cache, one key, no key, a middle range, then whole caches again."""
    starts = [0, 7, 5, n_keys // 3] + [0] * max(batch - 4, 0)
    ends = [n_keys, 8, 5, n_keys - 10] + [n_keys] * max(batch - 4, 0)
    as_tensor = lambda xs: torch.tensor(xs[:batch], dtype=torch.int64, device=DEVICE)  # noqa: E731
    return as_tensor(starts), as_tensor(ends)


def holey_mask(batch, n_keys, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, n_keys, generator=gen) > 0.4).to(DEVICE)


def assert_matches_reference(q, k, v, starts, ends, key_mask=None, **kernel_args):
    scale = q.shape[-1] ** -0.5
    o, lse = decode.decode_attention_state(q, k, v, starts, ends, key_mask, scale, **kernel_args)
    o_ref, lse_ref = reference.attention_state(q, k, v, scale, starts, ends, key_mask,
                                               compute_dtype=torch.float64)
    o_tol, lse_tol = TOLERANCES[q.dtype]
    assert o.dtype == lse.dtype == torch.float32
    assert not o.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(o, o_ref.float(), atol=o_tol, rtol=o_tol)
    torch.testing.assert_close(lse, lse_ref.float(), atol=lse_tol, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_matches_reference_for_every_head_dim_and_dtype(head_dim, dtype):
    q, k, v = make_problem(head_dim=head_dim, dtype=dtype)
    assert_matches_reference(q, k, v, *mixed_ranges(4, 150), num_splits=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 2, 4, 8, 16])
def test_matches_reference_for_every_gqa_group(group, dtype):
    q, k, v = make_problem(batch=4, kv_heads=1 if group == 16 else 2, group=group, dtype=dtype)
    assert_matches_reference(q, k, v, *mixed_ranges(4, 150), num_splits=3)


@pytest.mark.parametrize("fuse_merge", [False, True], ids=["merge-kernel", "fused-merge"])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_any_number_of_splits_gives_the_reference_state(num_splits, fuse_merge):
    q, k, v = make_problem(n_keys=200)
    assert_matches_reference(q, k, v, *mixed_ranges(4, 200), holey_mask(4, 200),
                             num_splits=num_splits, fuse_merge=fuse_merge)


@pytest.mark.parametrize("block_n", [16, 32, 64])
def test_any_block_size_gives_the_reference_state(block_n):
    q, k, v = make_problem(n_keys=130)
    assert_matches_reference(q, k, v, *mixed_ranges(4, 130), num_splits=2, block_n=block_n)


def test_default_launch_config_gives_the_reference_state():
    q, k, v = make_problem(dtype=torch.bfloat16)
    assert_matches_reference(q, k, v, *mixed_ranges(4, 150), holey_mask(4, 150))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_mask_with_holes_is_respected(dtype):
    q, k, v = make_problem(dtype=dtype)
    key_mask = holey_mask(4, 150)
    key_mask[0, 10:90] = False  # a hole wider than a whole block
    assert_matches_reference(q, k, v, *mixed_ranges(4, 150), key_mask, num_splits=3, block_n=16)


def test_ranges_outside_the_cache_are_clipped_to_it():
    q, k, v = make_problem(batch=3, n_keys=100)
    starts = torch.tensor([-5, 90, 50], device=DEVICE)
    ends = torch.tensor([30, 400, 10], device=DEVICE)  # the last row is empty: end < start
    assert_matches_reference(q, k, v, starts, ends, num_splits=3)


def test_int32_ranges_work_like_int64_ones():
    q, k, v = make_problem()
    starts, ends = mixed_ranges(4, 150)
    assert_matches_reference(q, k, v, starts.int(), ends.int(), num_splits=2)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_rows_without_keys_get_the_empty_state(num_splits):
    q, k, v = make_problem(batch=3)
    starts = torch.tensor([0, 4, 0], device=DEVICE)
    ends = torch.tensor([150, 4, 150], device=DEVICE)
    key_mask = torch.ones(3, 150, dtype=torch.bool, device=DEVICE)
    key_mask[2] = False  # a full range, every key masked
    o, lse = decode.decode_attention_state(q, k, v, starts, ends, key_mask, 0.125,
                                           num_splits=num_splits)
    assert torch.equal(o[1:], torch.zeros_like(o[1:]))
    assert torch.equal(lse[1:], torch.full_like(lse[1:], -math.inf))
    assert lse[0].isfinite().all()


def test_non_contiguous_views_of_q_k_v():
    batch, kv_heads, group, n_keys, head_dim = 3, 2, 2, 120, 80
    q, k, v = make_problem(batch, kv_heads, group, n_keys, head_dim)
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)  # head-dim stride != 1
    k_view = k.transpose(1, 2).contiguous().transpose(1, 2)  # a [B, N, Hkv, D] cache
    v_big = torch.zeros(batch, kv_heads, n_keys + 40, head_dim + 16, device=DEVICE)
    v_big[:, :, :n_keys, :head_dim] = v
    v_view = v_big[:, :, :n_keys, :head_dim]  # a slice of a larger, padded cache
    assert not (q_view.is_contiguous() or k_view.is_contiguous() or v_view.is_contiguous())
    assert_matches_reference(q_view, k_view, v_view, *mixed_ranges(batch, n_keys), num_splits=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_attention_returns_the_state_output_in_q_dtype(dtype):
    q, k, v = make_problem(dtype=dtype)
    starts, ends = mixed_ranges(4, 150)
    o = decode.decode_attention(q, k, v, starts, ends, None, 0.125, num_splits=3)
    o_state, _ = decode.decode_attention_state(q, k, v, starts, ends, None, 0.125, num_splits=3)
    assert o.dtype == dtype and o.shape == q.shape
    one_ulp = torch.finfo(dtype).eps  # Triton's interpreter truncates where a GPU rounds
    torch.testing.assert_close(o, o_state.to(dtype), atol=1e-6, rtol=one_ulp)


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Make every kernel buffer start as NaN; yields the list of buffers handed out."""
    handed_out = []

    def nan_empty(shape, dtype, device):
        buffer = torch.full(tuple(shape), math.nan, dtype=dtype, device=device)
        handed_out.append(buffer)
        return buffer

    monkeypatch.setattr(decode, "_new_empty", nan_empty)
    monkeypatch.setattr(merge, "_new_empty", nan_empty)
    return handed_out


@pytest.mark.parametrize("fuse_merge", [False, True], ids=["merge-kernel", "fused-merge"])
@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_every_output_and_workspace_element_is_written(poisoned_allocations, num_splits,
                                                       fuse_merge):
    q, k, v = make_problem(dtype=torch.bfloat16)
    decode.decode_attention_state(q, k, v, *mixed_ranges(4, 150), holey_mask(4, 150), 0.125,
                                  num_splits=num_splits, fuse_merge=fuse_merge)
    decode.decode_attention(q, k, v, *mixed_ranges(4, 150), None, 0.125, num_splits=num_splits,
                            fuse_merge=fuse_merge)
    expected_buffers = 2 * (2 if num_splits == 1 else 4)  # o, lse (+ split workspace) per call
    assert len(poisoned_allocations) == expected_buffers
    for buffer in poisoned_allocations:
        assert not buffer.isnan().any()


def test_the_macopt_op_runs_this_kernel_when_asked(monkeypatch):
    monkeypatch.setenv("MACOPT_CPU_KERNELS", "triton")
    q, k, v = make_problem(dtype=torch.bfloat16)
    starts, ends = mixed_ranges(4, 150)
    o, lse = torch.ops.macopt.decode_attention_state(q, k, v, starts, ends, None, 0.125)
    o_ref, lse_ref = reference.attention_state(q, k, v, 0.125, starts, ends)
    torch.testing.assert_close(o, o_ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, lse_ref, atol=1e-3, rtol=0)


def test_launch_config_spreads_batch_one_over_the_chip(monkeypatch):
    monkeypatch.setattr(launch, "multiprocessor_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    long_context = launch.decode_launch_config(1, 8, 131072, 128, 4, cuda)
    short_cache = launch.decode_launch_config(1, 8, 512, 128, 4, cuda)
    big_batch = launch.decode_launch_config(64, 8, 131072, 128, 4, cuda)
    assert long_context.num_splits * 8 >= 132  # about one program per SM
    assert short_cache.num_splits == 512 // (2 * short_cache.block_n)  # >= 2 blocks a split
    assert big_batch.num_splits == 1  # 512 groups already cover 132 SMs
    assert launch.decode_launch_config(17, 8, 131072, 128, 4, cuda).num_splits == 1  # 136 >= 132
    assert launch.decode_launch_config(8, 8, 131072, 128, 4, cuda).num_splits > 1
    assert launch.decode_launch_config(1, 8, 131072, 256, 4, cuda).block_n < long_context.block_n


def test_launch_config_overrides_are_checked():
    q, k, v = make_problem()
    starts, ends = mixed_ranges(4, 150)
    with pytest.raises(ValueError, match="num_splits"):
        decode.decode_attention_state(q, k, v, starts, ends, None, 0.125, num_splits=0)


def test_per_query_head_ranges_match_each_heads_reference():
    batch, kv_heads, group, n_keys = 2, 2, 4, 140
    q, k, v = make_problem(batch, kv_heads, group, n_keys, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    starts = torch.randint(0, n_keys, (batch, kv_heads * group), generator=gen)
    ends = (starts + torch.randint(0, 60, starts.shape, generator=gen)).clamp(max=n_keys)
    starts[0, :group] = torch.tensor([0, 100, 30, 5])  # disjoint and empty ranges in one group
    ends[0, :group] = torch.tensor([20, 140, 30, 6])
    starts, ends = starts.to(DEVICE), ends.to(DEVICE)
    o, lse = decode.decode_attention_state(q, k, v, starts, ends, None, 0.125, num_splits=3)
    for head in range(kv_heads * group):
        kv = slice(head // group, head // group + 1)
        o_ref, lse_ref = reference.attention_state(
            q[:, head : head + 1], k[:, kv], v[:, kv], 0.125, starts[:, head], ends[:, head],
            compute_dtype=torch.float64,
        )
        torch.testing.assert_close(o[:, head], o_ref[:, 0].float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse[:, head], lse_ref[:, 0].float(), atol=1e-3, rtol=0)


def test_repeated_fused_calls_give_the_same_state():
    q, k, v = make_problem(dtype=torch.bfloat16)
    starts, ends = mixed_ranges(4, 150)
    first = decode.decode_attention_state(q, k, v, starts, ends, None, 0.125, num_splits=5,
                                          fuse_merge=True)
    for _ in range(2):
        again = decode.decode_attention_state(q, k, v, starts, ends, None, 0.125, num_splits=5,
                                              fuse_merge=True)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_the_fused_merge_keeps_no_buffer_between_calls(monkeypatch):
    # A buffer cached across calls and first allocated inside torch.compile's CUDA-graph warm-up
    # would live in the graphs' pool untracked, which CUDA-graph trees refuse.
    q, k, v = make_problem(dtype=torch.bfloat16)
    starts, ends = mixed_ranges(4, 150)
    seen = []
    real = decode._group_counters
    monkeypatch.setattr(decode, "_group_counters", lambda *a: seen.append(real(*a)) or seen[-1])
    for _ in range(2):
        decode.decode_attention_state(q, k, v, starts, ends, None, 0.125, num_splits=5,
                                      fuse_merge=True)
    assert len(seen) == 2 and seen[0] is not seen[1]
    assert all(torch.equal(c, torch.zeros_like(c)) for c in seen)  # re-armed by the kernel


def test_alternating_shapes_and_split_counts_each_match_the_reference():
    # (2 rows x 2 KV heads) and (4 rows x 1 KV head) share the 4 counters of 4 groups with
    # different split counts; 3 rows x 2 KV heads use their own 6.
    shapes = [(2, 2, 3), (4, 1, 5), (3, 2, 4), (2, 2, 3), (4, 1, 2)]
    for batch, kv_heads, splits in shapes:
        q, k, v = make_problem(batch=batch, kv_heads=kv_heads, n_keys=120, seed=batch + splits)
        starts, ends = mixed_ranges(batch, 120)
        assert_matches_reference(q, k, v, starts, ends, num_splits=splits, block_n=16,
                                 fuse_merge=True)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_query_with_no_key_takes_its_row_of_otherwise(num_splits, dtype):
    # The fallback mask_holes.py inserts: rows with an empty range pass `otherwise` through.
    q, k, v = make_problem(batch=5, dtype=dtype, seed=3)
    starts, ends = mixed_ranges(5, k.shape[2])  # row 2 has no key
    starts, ends = starts.clone(), ends.clone()
    ends[4] = starts[4]  # and row 4
    mask = torch.rand(5, k.shape[2], generator=torch.Generator().manual_seed(1)) > 0.3
    mask = mask.to(DEVICE)
    otherwise = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(q)
    got = decode.decode_attention(q, k, v, starts, ends, mask, 0.125, num_splits,
                                  otherwise=otherwise)
    plain = decode.decode_attention(q, k, v, starts, ends, mask, 0.125, num_splits)
    pos = torch.arange(k.shape[2], device=DEVICE)
    attended = mask & (pos >= starts[:, None]) & (pos < ends[:, None])
    empty = ~attended.any(-1)
    assert empty.tolist()[2] and empty.tolist()[4] and not empty.all()
    assert torch.equal(got[empty], otherwise[empty])
    torch.testing.assert_close(got[~empty], plain[~empty], atol=0, rtol=0)
    # the op's reference path (CPU) gives the same rows
    via_op = torch.ops.macopt.decode_attention_or(q, k, v, starts, ends, mask, 0.125, otherwise)
    assert torch.equal(via_op[empty], otherwise[empty])
    torch.testing.assert_close(via_op[~empty], plain[~empty], **_tolerance(dtype))


def _tolerance(dtype):
    atol, _ = TOLERANCES[dtype]
    return {"atol": atol, "rtol": atol}


def test_the_fallback_op_refuses_an_otherwise_unlike_q():
    q, k, v = make_problem(batch=2)
    starts, ends = mixed_ranges(2, k.shape[2])
    with pytest.raises(ValueError, match="otherwise"):
        torch.ops.macopt.decode_attention_or(q, k, v, starts, ends, None, 0.125, q[:, :1])
