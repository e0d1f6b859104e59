"""The identities of partial attention states (docs/ALGORITHMS.md, section 0), on the fp64
reference.

Every test states one identity; the reference accepts any head dim, so these use tiny ones.
"""

import dataclasses

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from macopt.kernels import reference
from macopt.testing import (
    assert_merge_matches_union,
    assert_no_nan,
    assert_states_close,
    attention_problems,
    exact_state,
    key_partitions,
    states,
)

FP64 = torch.float64
EXAMPLES = 100
fp64_problems = attention_problems(
    head_dims=(1, 4, 8, 16),
    groups=(1, 2, 3, 4),
    max_batch=3,
    max_kv_heads=2,
    max_keys=24,
    dtypes=(FP64,),
)
# Downdating loses ~1/share of precision; with fp64 a 1e-4 share still leaves ~1e-12 accuracy.
MIN_KEPT_SHARE = 1e-4


@settings(max_examples=EXAMPLES)
@given(st.data())
def test_merging_the_states_of_any_partition_equals_attention_over_all_keys(data):
    problem = data.draw(fp64_problems)
    partition = data.draw(key_partitions(problem.n_keys))
    assert_merge_matches_union(exact_state, problem, partition)


@settings(max_examples=EXAMPLES)
@given(st.data())
def test_folding_merge_state_over_any_partition_in_any_order_equals_attention_over_all_keys(data):
    problem = data.draw(fp64_problems)
    partition = data.draw(key_partitions(problem.n_keys))
    assert_merge_matches_union(exact_state, problem, partition, merge_fn=reference.merge_state)


fp64_state_triples = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 16)).flatmap(
    lambda dims: st.tuples(*(states(dims[:2], dims[2], dtype=FP64) for _ in range(3)))
)


@settings(max_examples=EXAMPLES)
@given(fp64_state_triples)
def test_merge_is_commutative(abc):
    a, b, _ = abc
    assert_states_close(reference.merge_state(*a, *b), reference.merge_state(*b, *a), FP64)


@settings(max_examples=EXAMPLES)
@given(fp64_state_triples)
def test_merge_is_associative(abc):
    a, b, c = abc
    left_first = reference.merge_state(*reference.merge_state(*a, *b), *c)
    right_first = reference.merge_state(*a, *reference.merge_state(*b, *c))
    assert_states_close(left_first, right_first, FP64)


@settings(max_examples=EXAMPLES)
@given(st.data())
def test_downdate_undoes_merge_when_the_kept_part_holds_some_mass(data):
    problem = data.draw(fp64_problems)
    cut = data.draw(st.integers(0, problem.n_keys))
    kept_range, removed_range = (0, cut), (cut, problem.n_keys)
    if data.draw(st.booleans()):
        kept_range, removed_range = removed_range, kept_range
    kept = exact_state(*problem.with_key_range(*kept_range).args)
    removed = exact_state(*problem.with_key_range(*removed_range).args)
    full = reference.merge_state(*kept, *removed)

    kept_share = torch.exp(kept[1] - full[1]).nan_to_num(nan=0.0)  # nan: both parts empty
    kept_is_empty = torch.isneginf(kept[1])
    assume(bool((kept_is_empty | (kept_share >= MIN_KEPT_SHARE)).all()))

    assert_states_close(reference.downdate_state(*full, *removed), kept, FP64)


@settings(max_examples=EXAMPLES)
@given(states((3, 4), 8, dtype=FP64) | states((2,), 1, dtype=FP64))
def test_merging_with_the_empty_state_is_the_identity_exactly(state):
    o, lse = state
    empty = reference.empty_state(tuple(lse.shape), o.shape[-1], dtype=FP64)
    stacked = torch.stack([o, empty[0]], dim=-2), torch.stack([lse, empty[1]], dim=-1)
    for merged in (
        reference.merge_state(o, lse, *empty),
        reference.merge_state(*empty, o, lse),
        reference.merge_states(*stacked),
    ):
        assert torch.equal(merged[0], o) and torch.equal(merged[1], lse), (merged, state)


@settings(max_examples=EXAMPLES)
@given(
    n_states=st.integers(0, 6),
    shape=st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple),
    head_dim=st.integers(1, 16),
)
def test_merging_only_empty_states_gives_the_empty_state_without_nan(n_states, shape, head_dim):
    empty_o, empty_lse = reference.empty_state(shape, head_dim, dtype=FP64)
    stacked_o = empty_o.unsqueeze(-2).expand(*shape, n_states, head_dim)
    stacked_lse = empty_lse.unsqueeze(-1).expand(*shape, n_states)
    results = [reference.merge_states(stacked_o, stacked_lse)]
    if n_states >= 1:
        folded = (empty_o, empty_lse)
        for _ in range(n_states - 1):
            folded = reference.merge_state(*folded, empty_o, empty_lse)
        results.append(folded)
    for o, lse in results:
        assert_no_nan(o, "o")
        assert_no_nan(lse, "lse")
        assert torch.equal(o, empty_o) and torch.equal(lse, empty_lse), (o, lse)


@settings(max_examples=EXAMPLES)
@given(st.data())
def test_splitting_rows_by_starts_and_ends_equals_the_key_mask_formulation(data):
    problem = data.draw(fp64_problems)
    splits = [
        data.draw(st.integers(int(start), int(end)), label=f"split of row {row}")
        for row, (start, end) in enumerate(zip(problem.starts, problem.ends, strict=True))
    ]
    split_at = torch.tensor(splits)
    before = exact_state(*dataclasses.replace(problem, ends=split_at).args)
    after = exact_state(*dataclasses.replace(problem, starts=split_at).args)

    everything = (torch.zeros_like(problem.starts), torch.full_like(problem.ends, problem.n_keys))
    as_mask = dataclasses.replace(
        problem, starts=everything[0], ends=everything[1], key_mask=problem.key_validity()
    )
    assert_states_close(reference.merge_state(*before, *after), exact_state(*as_mask.args), FP64)


@settings(max_examples=EXAMPLES)
@given(fp64_problems)
def test_gqa_equals_attention_over_kv_heads_repeated_in_hugging_face_order(problem):
    # transformers' repeat_kv: query head h reads KV head h // group
    k = problem.k.repeat_interleave(problem.group, dim=1)
    v = problem.v.repeat_interleave(problem.group, dim=1)
    one_kv_head_per_query_head = dataclasses.replace(problem, k=k, v=v)
    repeated = exact_state(*one_kv_head_per_query_head.args)
    assert_states_close(repeated, problem.reference_state(), FP64)
