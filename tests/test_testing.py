"""macopt.testing itself: its strategies reach the edge cases and its checks catch wrong kernels.

A check that cannot fail proves nothing, so each one is fed deliberately broken kernels here.
"""

import dataclasses
import doctest

import pytest
import torch
from hypothesis import assume, find, given, settings
from hypothesis import strategies as st

import macopt.testing
from macopt.kernels import reference
from macopt.testing import (
    AttentionProblem,
    Tolerance,
    assert_fully_written,
    assert_matches_reference,
    assert_merge_matches_union,
    assert_no_nan,
    assert_state_matches_reference,
    assert_states_close,
    attention_problems,
    exact_state,
    key_partitions,
    poisoned,
    states,
    tolerances,
)

FP64 = torch.float64
small_problems = attention_problems(head_dims=(4, 8), max_keys=16, dtypes=(FP64,))
problems_without_empty_rows = attention_problems(
    head_dims=(4, 8), max_keys=16, dtypes=(FP64,), key_mask=False, allow_empty_rows=False
)


def fixed_problem(key_mask: bool = True) -> AttentionProblem:
    """Two rows (one attending keys 1..5, one empty), GQA group 2, fp64, mask with holes."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, generator=gen, dtype=FP64)
    k = torch.randn(2, 2, 6, 8, generator=gen, dtype=FP64)
    v = torch.randn(2, 2, 6, 8, generator=gen, dtype=FP64)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    starts, ends = torch.tensor([1, 3]), torch.tensor([6, 3])
    return AttentionProblem(q, k, v, starts, ends, mask if key_mask else None, 0.7)


def has_mask_hole_in_range(problem: AttentionProblem) -> bool:
    if problem.key_mask is None:
        return False
    in_range = dataclasses.replace(problem, key_mask=None).key_validity()
    return bool((in_range & ~problem.key_mask).any())


def exact_output(*args):
    return exact_state(*args)[0]


def test_module_docstring_examples_run():
    results = doctest.testmod(macopt.testing, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 10 and results.failed == 0, results


# --- strategies reach the cases kernels get wrong --------------------------------------------


@pytest.mark.parametrize(
    "description, condition",
    [
        ("an empty row", lambda p: bool(p.empty_rows().any())),
        ("a row with a single key", lambda p: bool((p.key_validity().sum(1) == 1).any())),
        ("a mask hole inside a row's range", lambda p: has_mask_hole_in_range(p)),
        ("no mask", lambda p: p.key_mask is None),
        ("GQA group 8", lambda p: p.group == 8),
        ("bfloat16 inputs", lambda p: p.dtype == torch.bfloat16),
        ("int32 starts with int64 ends", lambda p: p.starts.dtype == torch.int32
         and p.ends.dtype == torch.int64),
        ("a nonzero start", lambda p: bool((p.starts > 0).any())),
        ("a sharp softmax (scale above 2/sqrt(D))", lambda p: p.scale > 2 / p.head_dim**0.5),
    ],
)
def test_attention_problems_reach(description, condition):
    assert find(attention_problems(max_keys=16), condition) is not None


@settings(max_examples=100)
@given(attention_problems(allow_empty_rows=False, key_mask=True, max_keys=16))
def test_attention_problems_without_empty_rows_never_have_one(problem):
    assert not problem.empty_rows().any()


@settings(max_examples=100)
@given(attention_problems(max_keys=16))
def test_attention_problems_have_valid_ranges(problem):
    assert ((0 <= problem.starts) & (problem.starts <= problem.ends)).all()
    assert (problem.ends <= problem.n_keys).all()


@settings(max_examples=100)
@given(st.integers(0, 20).flatmap(lambda n: st.tuples(st.just(n), key_partitions(n))))
def test_key_partitions_cover_every_key_once(n_and_parts):
    n_keys, parts = n_and_parts
    assert all(lo <= hi for lo, hi in parts)
    assert sorted(i for lo, hi in parts for i in range(lo, hi)) == list(range(n_keys))


def test_key_partitions_reach_empty_parts_and_any_order():
    assert find(key_partitions(8), lambda parts: any(lo == hi for lo, hi in parts))
    assert find(key_partitions(8), lambda parts: parts != sorted(parts))


def test_states_reach_mixed_empty_and_full_entries():
    def mixed(state):
        empty = torch.isneginf(state[1])
        return bool(empty.any() and not empty.all())

    assert find(states((2, 3), 4), mixed)


@settings(max_examples=100)
@given(small_problems, st.integers(0, 16), st.integers(0, 16))
def test_with_key_range_intersects_every_row_with_the_range(problem, lo, hi):
    lo, hi = min(lo, hi, problem.n_keys), min(max(lo, hi), problem.n_keys)
    restricted = problem.with_key_range(lo, hi)
    positions = torch.arange(problem.n_keys)
    in_range = (positions >= lo) & (positions < hi)
    assert torch.equal(restricted.key_validity(), problem.key_validity() & in_range)
    assert (restricted.starts <= restricted.ends).all()


def test_problem_moves_every_tensor_with_to():
    moved = fixed_problem().to("meta")
    tensors = [moved.q, moved.k, moved.v, moved.starts, moved.ends, moved.key_mask]
    assert all(t.device.type == "meta" for t in tensors)


def test_problem_repr_is_short_and_shows_the_ranges():
    text = repr(fixed_problem())
    assert "tensor(" not in text and "starts=[1, 3]" in text and len(text) < 400


# --- checks accept correct answers and catch wrong ones --------------------------------------


def test_tolerances_tighten_with_precision():
    order = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    atols = [tolerances(dtype).atol for dtype in order]
    assert atols == sorted(atols, reverse=True)
    with pytest.raises(ValueError, match="dtype"):
        tolerances(torch.int32)


def test_assert_states_close_accepts_errors_within_tolerance_and_rejects_larger_ones():
    o, lse = torch.linspace(-1, 1, 24, dtype=FP64).reshape(3, 8), torch.linspace(-1, 1, 3)
    tol = tolerances(torch.bfloat16)
    beyond = 2 * (tol.atol + tol.rtol)  # more than allowed anywhere, as |o|, |lse| <= 1
    assert_states_close((o + tol.atol / 2, lse - tol.atol / 2), (o, lse), torch.bfloat16)
    with pytest.raises(AssertionError, match="state o: 3 of 24"):
        assert_states_close((o + torch.eye(3, 8) * beyond, lse), (o, lse), torch.bfloat16)
    with pytest.raises(AssertionError, match="state lse: 3 of 3"):
        assert_states_close((o, lse + beyond), (o, lse), torch.bfloat16)


def test_assert_states_close_honours_a_custom_tolerance():
    o, lse = torch.zeros(2, 4), torch.zeros(2)
    assert_states_close((o + 0.5, lse), (o, lse), torch.float32, tolerance=Tolerance(1.0, 0.0))


def test_assert_states_close_requires_the_empty_state_exactly():
    o, lse = torch.zeros(2, 4), torch.tensor([1.0, float("-inf")])
    with pytest.raises(AssertionError, match="lse"):  # finite where it must be -inf
        assert_states_close((o, torch.tensor([1.0, -80.0])), (o, lse), torch.float32)
    with pytest.raises(AssertionError, match="empty state has o = 0"):
        assert_states_close((o + torch.tensor([[0.0], [1e-7]]), lse), (o, lse), torch.float32)
    with pytest.raises(AssertionError, match="NaN"):
        assert_states_close((o, torch.tensor([1.0, float("nan")])), (o, lse), torch.float32)


def test_assert_states_close_rejects_low_precision_states_and_wrong_shapes():
    o, lse = torch.zeros(2, 4), torch.zeros(2)
    with pytest.raises(AssertionError, match="float32"):
        assert_states_close((o.bfloat16(), lse), (o, lse), torch.bfloat16)
    with pytest.raises(AssertionError, match="shape"):
        assert_states_close((o[:, :3], lse), (o, lse), torch.float32)


def test_assert_no_nan_and_assert_fully_written_catch_what_they_name():
    assert_no_nan(torch.tensor([float("-inf"), 0.0]))
    with pytest.raises(AssertionError, match="1 of 2 elements are NaN"):
        assert_no_nan(torch.tensor([float("nan"), 0.0]))
    out = poisoned((2, 3))
    out[:, :2] = 0.0  # a kernel that forgets the last column
    with pytest.raises(AssertionError, match="2 of 6 elements still hold the poison"):
        assert_fully_written(out)
    out[:, 2] = 1.0
    assert_fully_written(out)
    with pytest.raises(AssertionError, match="poison -7"):
        assert_fully_written(torch.full((2,), -7.0), poison=-7.0)


def test_assert_matches_reference_accepts_the_reference():
    assert_matches_reference(exact_output, fixed_problem())


@pytest.mark.parametrize(
    "broken_attention",
    [
        pytest.param(lambda q, k, v, s, e, m, scale: exact_output(q, k, v, s * 0, e, m, scale),
                     id="reads keys before starts"),
        pytest.param(lambda q, k, v, s, e, m, scale: exact_output(q, k, v, s, e, None, scale),
                     id="ignores key_mask"),
        pytest.param(lambda q, k, v, s, e, m, scale: exact_output(q, k, v, s, e, m, 1.0),
                     id="ignores scale"),
        pytest.param(lambda q, k, v, s, e, m, scale: exact_output(
            q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), s, e, m, scale),
            id="pairs query head h with KV head h % Hkv"),
        pytest.param(lambda q, k, v, s, e, m, scale: exact_output(q, k, v, s, e, m, scale)
                     + (e == s)[:, None, None] * 1e-3, id="nonzero output on an empty row"),
        pytest.param(lambda q, k, v, s, e, m, scale: exact_output(q, k, v, s, e, m, scale).float(),
                     id="returns float32 for float64 q"),
    ],
)
def test_assert_matches_reference_catches(broken_attention):
    with pytest.raises(AssertionError, match="output"):
        assert_matches_reference(broken_attention, fixed_problem())


def test_assert_state_matches_reference_catches_an_lse_in_base_2():
    def base_2_lse(*args):
        o, lse = exact_state(*args)
        return o, lse / torch.log(torch.tensor(2.0, dtype=FP64))

    assert_state_matches_reference(exact_state, fixed_problem())
    with pytest.raises(AssertionError, match="lse"):
        assert_state_matches_reference(base_2_lse, fixed_problem())


def weightless_merge(o_a, lse_a, o_b, lse_b):
    """Broken: averages o instead of weighting it by each part's mass."""
    return (o_a + o_b) / 2, torch.logaddexp(lse_a, lse_b)


def max_lse_merge(o_a, lse_a, o_b, lse_b):
    """Broken: keeps the larger part's lse instead of adding the masses."""
    o, _ = reference.merge_state(o_a, lse_a, o_b, lse_b)
    return o, torch.maximum(lse_a, lse_b)


def unguarded_merge(o_a, lse_a, o_b, lse_b):
    """Broken: the textbook formula, NaN when both parts are empty."""
    m = torch.maximum(lse_a, lse_b)
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    o = (w_a[..., None] * o_a + w_b[..., None] * o_b) / (w_a + w_b)[..., None]
    return o, m + torch.log(w_a + w_b)


def part_lses(problem, partition) -> torch.Tensor:
    """``lse[B, Hq, parts]``: each part's log attention mass (-inf where it holds no key)."""
    return torch.stack([exact_state(*problem.with_key_range(lo, hi).args)[1]
                        for lo, hi in partition], dim=-1)


def weightless_fold_misweighs_a_part(problem, partition) -> bool:
    """Whether folding ``weightless_merge`` gives some (row, head) a part weight other than
    its share of the attention mass.

    The fold weighs part 0 by 1/2^(n-1) and part i >= 1 by 1/2^(n-i), whatever their masses.
    Where those weights are every part's share, the average *is* the merge and no check can
    tell them apart: at scale 0 every key weighs the same, so parts holding equal key counts
    (two halves of a row) have equal masses. Elsewhere the outputs differ, as the parts' o
    (means of random values) are independent of the masses (from q and k).
    """
    n = len(partition)
    fold = torch.tensor([2.0 ** -(n - 1)] + [2.0 ** -(n - i) for i in range(1, n)], dtype=FP64)
    shares = torch.softmax(part_lses(problem, partition), dim=-1)  # no empty rows: no NaN
    return bool(((fold - shares).abs() > 1e-6).any())


def two_parts_of_comparable_mass(problem, partition) -> bool:
    """Whether some (row, head) has two parts whose masses are within e^10 of each other.

    ``max_lse_merge`` drops log(1 + m_2 / m_1) from the lse (m_1 >= m_2 the two largest
    masses): at least 4.5e-5 here, far beyond fp64's tolerance, while a part e^21 lighter
    than another would change the lse by less than the tolerance (1e-9) and go unseen.
    """
    lse = part_lses(problem, partition)
    if lse.shape[-1] < 2:
        return False
    top2 = lse.topk(2, dim=-1).values
    gap = top2[..., 0] - top2[..., 1]  # inf where fewer than two parts hold keys
    return bool((gap < 10).any())


@pytest.mark.parametrize(
    ("broken_merge", "gets_it_wrong"),
    [(weightless_merge, weightless_fold_misweighs_a_part),
     (max_lse_merge, two_parts_of_comparable_mass)],
    ids=["weightless_merge", "max_lse_merge"],
)
@settings(max_examples=50)
@given(data=st.data())
def test_assert_merge_matches_union_catches_a_broken_merge_on_inputs_it_gets_wrong(
    broken_merge, gets_it_wrong, data
):
    # Only inputs where the broken merge's result must differ from the union's: each premise
    # says why its merge is right (within tolerance) on the rest.
    problem = data.draw(problems_without_empty_rows)
    partition = data.draw(key_partitions(problem.n_keys))
    assume(gets_it_wrong(problem, partition))
    with pytest.raises(AssertionError, match="merge of the states over parts"):
        assert_merge_matches_union(exact_state, problem, partition, merge_fn=broken_merge)


def test_a_weightless_merge_of_equal_masses_is_the_merge():
    # Why the premise above excludes it: at scale 0 two halves of a row weigh the same, and
    # averaging them is exact; the check rightly passes. One key more on one side: caught.
    problem = dataclasses.replace(fixed_problem(key_mask=False), scale=0.0,
                                  starts=torch.tensor([0, 0]), ends=torch.tensor([6, 6]))
    halves, unequal = [(0, 3), (3, 6)], [(0, 2), (2, 6)]
    assert not weightless_fold_misweighs_a_part(problem, halves)
    assert_merge_matches_union(exact_state, problem, halves, merge_fn=weightless_merge)
    assert weightless_fold_misweighs_a_part(problem, unequal)
    with pytest.raises(AssertionError, match="merge of the states over parts"):
        assert_merge_matches_union(exact_state, problem, unequal, merge_fn=weightless_merge)


def test_assert_merge_matches_union_catches_nan_from_merging_empty_parts():
    problem, partition = fixed_problem(), [(0, 3), (3, 3), (3, 6)]
    assert_merge_matches_union(exact_state, problem, partition, merge_fn=reference.merge_state)
    with pytest.raises(AssertionError, match="NaN"):
        assert_merge_matches_union(exact_state, problem, partition, merge_fn=unguarded_merge)


def test_assert_merge_matches_union_catches_a_state_fn_that_ignores_the_range():
    def whole_cache_state(q, k, v, starts, ends, key_mask, scale):
        every_key = torch.zeros_like(starts), torch.full_like(ends, k.shape[2])
        return exact_state(q, k, v, *every_key, key_mask, scale)

    with pytest.raises(AssertionError, match="merge"):
        assert_merge_matches_union(whole_cache_state, fixed_problem(), [(0, 2), (2, 6)])


def test_assert_merge_matches_union_rejects_a_non_partition():
    problem = fixed_problem()
    for not_a_partition in ([(0, 3)], [(0, 4), (3, 6)], [(0, 2), (3, 6)], [(2, 0), (0, 6)]):
        with pytest.raises(ValueError, match="partition"):
            assert_merge_matches_union(exact_state, problem, not_a_partition)


def test_the_problem_dtype_picks_the_tolerance():
    fp64 = fixed_problem()
    bf16 = dataclasses.replace(fp64, q=fp64.q.bfloat16(), k=fp64.k.bfloat16(), v=fp64.v.bfloat16())

    def off_by_1e_3(q, *args):
        out = exact_output(q, *args) + 1e-3
        return out.masked_fill(fp64.empty_rows()[:, None, None], 0.0).to(q.dtype)

    assert_matches_reference(off_by_1e_3, bf16)
    with pytest.raises(AssertionError, match="differ beyond atol=1e-09"):
        assert_matches_reference(off_by_1e_3, fp64)
