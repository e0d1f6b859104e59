"""The state-merge kernels equal the reference merges, including empty (0, -inf) states."""

import math

import pytest
import torch

import macopt  # noqa: F401  (registers torch.ops.macopt)
from macopt.kernels import merge, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(atol=1e-5, rtol=1e-5)


def random_states(shape, head_dim, seed=0, lse_spread=5.0):
    gen = torch.Generator().manual_seed(seed)
    o = torch.randn(*shape, head_dim, generator=gen)
    lse = torch.randn(*shape, generator=gen) * lse_spread
    return o.to(DEVICE), lse.to(DEVICE)


def make_empty(o, lse, where):
    """Turn the states selected by the bool tensor ``where`` into the empty state."""
    return o.masked_fill(where[..., None], 0.0), lse.masked_fill(where, -math.inf)


def reference_merge_state(o_a, lse_a, o_b, lse_b):
    o, lse = reference.merge_state(o_a.double(), lse_a.double(), o_b.double(), lse_b.double())
    return o.float(), lse.float()


def reference_merge_states(o, lse):
    o_ref, lse_ref = reference.merge_states(o.double(), lse.double(), dim=-1)
    return o_ref.float(), lse_ref.float()


def assert_states_close(actual, expected):
    assert not actual[0].isnan().any() and not actual[1].isnan().any()
    torch.testing.assert_close(actual[0], expected[0], **TOL)
    torch.testing.assert_close(actual[1], expected[1], **TOL)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_merge_state_equals_the_reference(head_dim):
    o_a, lse_a = random_states((2, 3), head_dim, seed=0)
    o_b, lse_b = random_states((2, 3), head_dim, seed=1)
    assert_states_close(merge.merge_state(o_a, lse_a, o_b, lse_b),
                        reference_merge_state(o_a, lse_a, o_b, lse_b))


@pytest.mark.parametrize("empty_side", ["a", "b", "both"])
def test_merge_state_with_empty_states(empty_side):
    o_a, lse_a = random_states((4, 5), 64, seed=0)
    o_b, lse_b = random_states((4, 5), 64, seed=1)
    rows = torch.zeros(4, 5, dtype=torch.bool, device=DEVICE)
    rows[1:3] = True
    if empty_side in ("a", "both"):
        o_a, lse_a = make_empty(o_a, lse_a, rows)
    if empty_side in ("b", "both"):
        o_b, lse_b = make_empty(o_b, lse_b, rows)
    o, lse = merge.merge_state(o_a, lse_a, o_b, lse_b)
    assert_states_close((o, lse), reference_merge_state(o_a, lse_a, o_b, lse_b))
    if empty_side == "both":
        assert torch.equal(o[1:3], torch.zeros_like(o[1:3]))
        assert torch.equal(lse[1:3], torch.full_like(lse[1:3], -math.inf))


def test_merge_state_with_far_apart_lse_neither_overflows_nor_underflows_to_nan():
    o_a, lse_a = random_states((8,), 64, seed=0)
    o_b, lse_b = random_states((8,), 64, seed=1)
    lse_a, lse_b = lse_a + 1000.0, lse_b - 1000.0
    o, lse = merge.merge_state(o_a, lse_a, o_b, lse_b)
    assert_states_close((o, lse), (o_a, lse_a))


def test_merge_state_keeps_any_leading_shape_and_accepts_views():
    o_a, lse_a = random_states((3, 2, 4), 80, seed=0)
    o_b, lse_b = random_states((2, 3, 4), 80, seed=1)
    o_b, lse_b = o_b.transpose(0, 1), lse_b.transpose(0, 1)  # non-contiguous
    o, lse = merge.merge_state(o_a, lse_a, o_b, lse_b)
    assert o.shape == (3, 2, 4, 80) and lse.shape == (3, 2, 4)
    assert_states_close((o, lse), reference_merge_state(o_a, lse_a, o_b, lse_b))


@pytest.mark.parametrize("head_dim", [64, 96, 256])
@pytest.mark.parametrize("n_states", [1, 2, 5, 40, 70])
def test_merge_states_equals_the_reference(n_states, head_dim):
    # 40 states at D = 256 and 70 at D = 128 or less take several tiles of states.
    o, lse = random_states((2, 3, n_states), head_dim)
    assert_states_close(merge.merge_states(o, lse), reference_merge_states(o, lse))


def test_merge_states_skips_empty_states_and_keeps_all_empty_rows_empty():
    o, lse = random_states((3, 6), 64)
    empty = torch.zeros(3, 6, dtype=torch.bool, device=DEVICE)
    empty[0, ::2] = True  # some parts empty
    empty[1] = True  # every part empty
    o, lse = make_empty(o, lse, empty)
    merged_o, merged_lse = merge.merge_states(o, lse)
    assert_states_close((merged_o, merged_lse), reference_merge_states(o, lse))
    assert torch.equal(merged_o[1], torch.zeros_like(merged_o[1]))
    assert merged_lse[1] == -math.inf


def test_merge_states_of_no_states_is_the_empty_state():
    o, lse = merge.merge_states(torch.zeros(2, 3, 0, 64, device=DEVICE),
                                torch.zeros(2, 3, 0, device=DEVICE))
    assert torch.equal(o, torch.zeros(2, 3, 64, device=DEVICE))
    assert torch.equal(lse, torch.full((2, 3), -math.inf, device=DEVICE))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_merge_states_writes_the_requested_output_dtype(out_dtype):
    o, lse = random_states((2, 4), 128)
    merged_o, merged_lse = merge.merge_states(o, lse, out_dtype=out_dtype)
    expected_o, expected_lse = reference_merge_states(o, lse)
    assert merged_o.dtype == out_dtype and merged_lse.dtype == torch.float32
    eps = torch.finfo(out_dtype).eps  # one unit of rounding (the interpreter truncates)
    torch.testing.assert_close(merged_o, expected_o.to(out_dtype), atol=eps, rtol=eps)
    torch.testing.assert_close(merged_lse, expected_lse, **TOL)


def test_merge_states_accepts_non_contiguous_stacks():
    o, lse = random_states((5, 2, 3), 64)  # stacked on dim 0, then moved to the split dim
    o, lse = o.permute(1, 2, 0, 3), lse.permute(1, 2, 0)
    assert_states_close(merge.merge_states(o, lse), reference_merge_states(o, lse))


def test_every_output_element_is_written(monkeypatch):
    handed_out = []

    def nan_empty(shape, dtype, device):
        handed_out.append(torch.full(tuple(shape), math.nan, dtype=dtype, device=device))
        return handed_out[-1]

    monkeypatch.setattr(merge, "_new_empty", nan_empty)
    o, lse = random_states((3, 33), 80)
    merge.merge_state(o, lse, o.flip(0), lse.flip(0))
    merge.merge_states(o.view(3, 3, 11, 80), lse.view(3, 3, 11))
    assert len(handed_out) == 4
    for buffer in handed_out:
        assert not buffer.isnan().any()


def test_the_macopt_op_runs_this_kernel_when_asked(monkeypatch):
    monkeypatch.setenv("MACOPT_CPU_KERNELS", "triton")
    o_a, lse_a = random_states((2, 4), 64, seed=0)
    o_b, lse_b = random_states((2, 4), 64, seed=1)
    assert_states_close(torch.ops.macopt.merge_states(o_a, lse_a, o_b, lse_b),
                        reference_merge_state(o_a, lse_a, o_b, lse_b))
