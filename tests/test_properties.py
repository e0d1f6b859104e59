"""Property tests of the ops and the Triton kernels, through macopt.testing's public checks.

The CPU reference path of the ops runs at full example counts; the Triton kernels run through
Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest), so they get fewer, tinier
examples. Kernel outputs come from a NaN-filling allocator, so any element a kernel forgets to
write shows up.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import macopt  # noqa: F401  (registers torch.ops.macopt.*)
from macopt.testing import (
    assert_fully_written,
    assert_matches_reference,
    assert_merge_matches_union,
    assert_state_matches_reference,
    assert_states_close,
    attention_problems,
    exact_state,
    key_partitions,
    poisoned,
)

ops = torch.ops.macopt
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL_GROUPS = (1, 2, 3, 4, 7, 8, 16)  # odd groups exercise the padding of the query tile

# --- (a) the ops' CPU path (the reference math in fp32) against fp64 --------------------------

# A monkeypatched environment is the same for every example, so function-scoped fixtures are
# safe in these tests.
fixture_safe = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
cpu_problems = attention_problems(groups=ALL_GROUPS, max_batch=3, max_kv_heads=2, max_keys=48)


@pytest.fixture
def reference_on_cpu(monkeypatch):
    """Route the ops' CPU calls to the reference math, whatever the caller's environment says."""
    monkeypatch.delenv("MACOPT_CPU_KERNELS", raising=False)


@settings(max_examples=100, suppress_health_check=fixture_safe)
@given(problem=cpu_problems)
def test_decode_attention_op_matches_the_fp64_reference(reference_on_cpu, problem):
    assert_matches_reference(ops.decode_attention, problem)


@settings(max_examples=100, suppress_health_check=fixture_safe)
@given(problem=cpu_problems)
def test_decode_attention_state_op_matches_the_fp64_reference(reference_on_cpu, problem):
    assert_state_matches_reference(ops.decode_attention_state, problem)


@settings(max_examples=100, suppress_health_check=fixture_safe)
@given(data=st.data())
def test_merge_states_op_over_any_partition_equals_attention_over_the_union(
    reference_on_cpu, data
):
    problem = data.draw(cpu_problems)
    partition = data.draw(key_partitions(problem.n_keys))
    assert_merge_matches_union(
        ops.decode_attention_state, problem, partition, merge_fn=ops.merge_states
    )


# --- (b) the Triton kernels, through the interpreter -------------------------------------------

TRITON_EXAMPLES = 40
triton_settings = settings(max_examples=TRITON_EXAMPLES, suppress_health_check=fixture_safe)


def on_device(problem):
    """The kernels run on the test device (natively on a GPU): so must their inputs."""
    return problem.to(DEVICE)


triton_problems = attention_problems(
    groups=ALL_GROUPS, max_batch=2, max_kv_heads=2, max_keys=40
).map(on_device)
# The merge kernel runs one interpreted program per (row, head): keep the heads few.
few_head_problems = attention_problems(
    groups=(1, 2, 3), max_batch=2, max_kv_heads=1, max_keys=40
).map(on_device)


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Route the ops to the Triton kernels and make the kernels allocate NaN-poisoned buffers."""
    from macopt.kernels import decode, merge

    monkeypatch.setenv("MACOPT_CPU_KERNELS", "triton")
    monkeypatch.setattr(decode, "_new_empty", poisoned)
    monkeypatch.setattr(merge, "_new_empty", poisoned)
    return decode, merge


def fully_written(kernel):
    """``kernel`` that also fails if any output element kept the poison."""

    def checked(*args, **kwargs):
        out = kernel(*args, **kwargs)
        for index, tensor in enumerate(out if isinstance(out, tuple) else (out,)):
            assert_fully_written(tensor, name=f"{getattr(kernel, '__name__', 'kernel')}[{index}]")
        return out

    return checked


@triton_settings
@given(problem=triton_problems)
def test_triton_decode_attention_matches_the_fp64_reference(triton_on_cpu, problem):
    assert_matches_reference(fully_written(ops.decode_attention), problem)


@triton_settings
@given(problem=triton_problems)
def test_triton_decode_attention_state_matches_the_fp64_reference(triton_on_cpu, problem):
    assert_state_matches_reference(fully_written(ops.decode_attention_state), problem)


@triton_settings
@given(
    problem=triton_problems,
    num_splits=st.integers(1, 6),
    block_n=st.sampled_from((16, 32)),  # small blocks: several per split even at 40 keys
)
def test_triton_split_kv_with_any_number_of_splits_equals_the_reference(
    triton_on_cpu, problem, num_splits, block_n
):
    decode, _ = triton_on_cpu

    def split_kv_state(*args):
        return decode.decode_attention_state(*args, num_splits=num_splits, block_n=block_n)

    assert_state_matches_reference(fully_written(split_kv_state), problem)


@triton_settings
@given(data=st.data())
def test_triton_merged_states_over_a_partition_equal_attention_over_the_union(
    triton_on_cpu, data
):
    decode, merge = triton_on_cpu
    problem = data.draw(triton_problems)
    partition = data.draw(key_partitions(problem.n_keys, max_parts=4))
    assert_merge_matches_union(
        fully_written(decode.decode_attention_state),
        problem,
        partition,
        merge_fn=fully_written(merge.merge_state),
    )


@triton_settings
@given(data=st.data())
def test_triton_merge_states_of_stacked_parts_equals_attention_over_the_union(
    triton_on_cpu, data
):
    _, merge = triton_on_cpu
    problem = data.draw(few_head_problems)
    partition = data.draw(key_partitions(problem.n_keys))
    parts = [exact_state(*problem.with_key_range(lo, hi).args) for lo, hi in partition]
    stacked_o = torch.stack([o.float() for o, _ in parts], dim=-2)
    stacked_lse = torch.stack([lse.float() for _, lse in parts], dim=-1)
    merged = fully_written(merge.merge_states)(stacked_o, stacked_lse)
    assert_states_close(merged, problem.reference_state(), torch.float32, name="merge_states")
