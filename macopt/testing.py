"""Property-test your own attention kernels against macopt's reference math.

Two halves, usable separately:

- **Strategies** (need ``hypothesis``): :func:`attention_problems` draws whole decode problems
  (batch, heads, GQA group, head dim, per-row key ranges including empty and length-1 rows, an
  optional ``key_mask`` with holes, dtype, scale); :func:`key_partitions` draws a partition of
  the keys into contiguous ranges in any order; :func:`states` draws ``(o, lse)`` states.
- **Checks** (plain functions, raising ``AssertionError`` with what differed and where):
  :func:`assert_matches_reference`, :func:`assert_state_matches_reference`,
  :func:`assert_merge_matches_union`, :func:`assert_states_close`, :func:`assert_no_nan`,
  :func:`assert_fully_written`. Every check compares with :mod:`macopt.kernels.reference`
  computed in float64, with tolerances for the input dtype (:func:`tolerances`).

A kernel under test takes the arguments of ``torch.ops.macopt.decode_attention``:
``fn(q, k, v, starts, ends, key_mask, scale)``, with ``q[B, Hq, D]``, ``k/v[B, Hkv, N, D]``
(query head ``h`` reads KV head ``h // (Hq // Hkv)``), row ``b`` attending keys
``[starts[b], ends[b])`` that ``key_mask[b]`` allows. States are ``(o, lse)`` in float32, lse in
natural log; a row with no key has the empty state ``(0, -inf)`` and never NaN.

Usage: copy this into a test file and replace the op by your kernel (and ``problem`` by
``problem.to("cuda")`` for a GPU kernel):

>>> import torch
>>> from hypothesis import given, settings, strategies as st
>>> from macopt import testing
>>> @settings(max_examples=20, deadline=None)
... @given(testing.attention_problems(max_keys=16))
... def test_attention_matches_reference(problem):
...     testing.assert_matches_reference(torch.ops.macopt.decode_attention, problem)
>>> @settings(max_examples=20, deadline=None)
... @given(st.data())
... def test_split_kv_equals_attention_over_all_keys(data):
...     problem = data.draw(testing.attention_problems(max_keys=16))
...     parts = data.draw(testing.key_partitions(problem.n_keys))
...     testing.assert_merge_matches_union(
...         torch.ops.macopt.decode_attention_state, problem, parts,
...         merge_fn=torch.ops.macopt.merge_states)
>>> test_attention_matches_reference()
>>> test_split_kv_equals_attention_over_all_keys()
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from macopt.kernels import reference
from macopt.validation import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

try:
    from hypothesis import strategies as _st
except ImportError:  # the checks work without hypothesis; only the strategies need it
    _st = None

Tensor = torch.Tensor
State = tuple[Tensor, Tensor]
KeyPartition = list[tuple[int, int]]
StateFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, "Tensor | None", float], State]
AttentionFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, "Tensor | None", float], Tensor]
MergeFn = Callable[[Tensor, Tensor, Tensor, Tensor], State]

__all__ = [
    "AttentionFn",
    "AttentionProblem",
    "KeyPartition",
    "MergeFn",
    "StateFn",
    "Tolerance",
    "assert_fully_written",
    "assert_matches_reference",
    "assert_merge_matches_union",
    "assert_no_nan",
    "assert_state_matches_reference",
    "assert_states_close",
    "attention_problems",
    "exact_state",
    "key_partitions",
    "poisoned",
    "states",
    "tolerances",
]


# ---------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class AttentionProblem:
    """One decode-attention problem: the arguments of ``torch.ops.macopt.decode_attention``.

    >>> q, k = torch.randn(1, 2, 4), torch.randn(1, 1, 3, 4)
    >>> problem = AttentionProblem(q, k, k, torch.tensor([0]), torch.tensor([2]), None, 0.5)
    >>> problem.group, problem.n_keys, problem.empty_rows().tolist()
    (2, 3, [False])
    >>> problem.with_key_range(2, 3).empty_rows().tolist()  # keys [0, 2) and [2, 3) are disjoint
    [True]
    """

    q: Tensor  # [B, Hq, D]
    k: Tensor  # [B, Hkv, N, D]
    v: Tensor  # [B, Hkv, N, D]
    starts: Tensor  # [B] int32/int64
    ends: Tensor  # [B] int32/int64
    key_mask: Tensor | None  # [B, N] bool, True = attend
    scale: float

    @property
    def args(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, float]:
        """``(q, k, v, starts, ends, key_mask, scale)``: call a kernel as ``fn(*problem.args)``."""
        return self.q, self.k, self.v, self.starts, self.ends, self.key_mask, self.scale

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def n_q_heads(self) -> int:
        return self.q.shape[1]

    @property
    def n_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def group(self) -> int:
        return self.n_q_heads // self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.q.shape[2]

    @property
    def n_keys(self) -> int:
        return self.k.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    def to(self, device: torch.device | str) -> AttentionProblem:
        """The same problem with every tensor on ``device``."""
        mask = None if self.key_mask is None else self.key_mask.to(device)
        return dataclasses.replace(
            self,
            q=self.q.to(device),
            k=self.k.to(device),
            v=self.v.to(device),
            starts=self.starts.to(device),
            ends=self.ends.to(device),
            key_mask=mask,
        )

    def with_key_range(self, lo: int, hi: int) -> AttentionProblem:
        """The same problem with every row's range intersected with keys ``[lo, hi)``.

        Rows whose intersection is empty get an empty range (``starts == ends``) inside
        ``[lo, hi]``, so kernels never see ``starts > ends``.
        """
        starts = self.starts.clamp(min=lo, max=hi)
        ends = torch.maximum(self.ends.clamp(max=hi), starts.to(self.ends.dtype))
        return dataclasses.replace(self, starts=starts, ends=ends)

    def key_validity(self) -> Tensor:
        """Boolean ``[B, N]``: which keys each row attends."""
        positions = torch.arange(self.n_keys, device=self.device)
        valid = (positions >= self.starts[:, None]) & (positions < self.ends[:, None])
        return valid if self.key_mask is None else valid & self.key_mask

    def empty_rows(self) -> Tensor:
        """Boolean ``[B]``: rows that attend no key (their state must be ``(0, -inf)``)."""
        return ~self.key_validity().any(dim=1)

    def reference_state(self, compute_dtype: torch.dtype = torch.float64) -> State:
        """The exact state ``(o[B, Hq, D], lse[B, Hq])``, computed in ``compute_dtype``."""
        return reference.attention_state(
            self.q, self.k, self.v, self.scale, self.starts, self.ends, self.key_mask,
            compute_dtype=compute_dtype,
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # hypothesis prints falsifying examples this way

    def __repr__(self) -> str:
        mask = "None"
        if self.key_mask is not None:
            mask = str(["".join("1" if x else "0" for x in row) for row in self.key_mask.tolist()])
        return (
            f"AttentionProblem(batch={self.batch}, q_heads={self.n_q_heads}, "
            f"kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, n_keys={self.n_keys}, "
            f"dtype={self.dtype}, scale={self.scale!r}, starts={self.starts.tolist()} "
            f"({self.starts.dtype}), ends={self.ends.tolist()} ({self.ends.dtype}), "
            f"key_mask={mask})"
        )


def exact_state(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    starts: Tensor,
    ends: Tensor,
    key_mask: Tensor | None,
    scale: float,
) -> State:
    """The reference state in float64, called like a kernel (any head dim): a ``StateFn``.

    >>> o, lse = exact_state(torch.ones(1, 1, 2), torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2),
    ...                      torch.tensor([0]), torch.tensor([3]), None, 1.0)
    >>> round(lse.item(), 4), o.dtype  # log(3 * e^2)
    (3.0986, torch.float64)
    """
    return reference.attention_state(
        q, k, v, scale, starts, ends, key_mask, compute_dtype=torch.float64
    )


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


def _strategies():
    if _st is None:
        raise ImportError("macopt.testing strategies need hypothesis: pip install hypothesis")
    return _st


def attention_problems(
    *,
    head_dims: Sequence[int] = SUPPORTED_HEAD_DIMS,
    groups: Sequence[int] = (1, 2, 4, 8),
    max_batch: int = 3,
    max_kv_heads: int = 2,
    min_keys: int = 1,
    max_keys: int = 48,
    dtypes: Sequence[torch.dtype] = SUPPORTED_DTYPES,
    key_mask: bool | None = None,
    allow_empty_rows: bool = True,
    max_scale_factor: float = 4.0,
) -> SearchStrategy[AttentionProblem]:
    """Strategy for :class:`AttentionProblem` on the CPU (move it with ``problem.to(device)``).

    Each row's key range is drawn as the full cache, a random non-empty range, a single key, or
    (with ``allow_empty_rows``) an empty range; ``key_mask`` is ``None`` when ``key_mask=False``,
    always present when ``True``, and either when ``None``; a mask has holes of random density.
    ``allow_empty_rows=False`` also keeps the mask from emptying a row. The scale is
    ``f / sqrt(D)`` with ``f`` in ``[0, max_scale_factor]`` (0: uniform weights; large: sharp).
    Tensor values come from a drawn seed (standard normal), so examples replay exactly.

    >>> from hypothesis import given
    >>> @given(attention_problems(head_dims=(64,), groups=(4,), dtypes=(torch.bfloat16,)))
    ... def test_shapes(problem):
    ...     assert problem.head_dim == 64 and problem.group == 4
    ...     assert problem.dtype == torch.bfloat16
    >>> test_shapes()
    """
    bounds = _ProblemBounds(
        tuple(head_dims), tuple(groups), max_batch, max_kv_heads, min_keys, max_keys,
        tuple(dtypes), key_mask, allow_empty_rows, max_scale_factor,
    )
    bounds.validate()
    return _strategies().composite(_draw_attention_problem)(bounds)


@dataclass(frozen=True)
class _ProblemBounds:
    head_dims: tuple[int, ...]
    groups: tuple[int, ...]
    max_batch: int
    max_kv_heads: int
    min_keys: int
    max_keys: int
    dtypes: tuple[torch.dtype, ...]
    key_mask: bool | None
    allow_empty_rows: bool
    max_scale_factor: float

    def validate(self) -> None:
        if not 1 <= self.min_keys <= self.max_keys:
            raise ValueError(f"min_keys/max_keys: expected 1 <= min_keys <= max_keys, got "
                             f"{self.min_keys}, {self.max_keys}")
        if self.max_batch < 1 or self.max_kv_heads < 1:
            raise ValueError(f"max_batch/max_kv_heads: expected >= 1, got {self.max_batch}, "
                             f"{self.max_kv_heads}")
        if not (self.head_dims and self.groups and self.dtypes):
            raise ValueError("head_dims/groups/dtypes: expected at least one choice each")


def _row_ranges(n_keys: int, allow_empty: bool) -> SearchStrategy[tuple[int, int]]:
    """Strategy for one row's ``(start, end)``, favouring the edge cases kernels get wrong."""
    st = _strategies()
    full = st.just((0, n_keys))
    random_nonempty = st.integers(0, n_keys - 1).flatmap(
        lambda start: st.tuples(st.just(start), st.integers(start + 1, n_keys))
    )
    single_key = st.integers(0, n_keys - 1).map(lambda i: (i, i + 1))
    choices = [full, random_nonempty, single_key]
    if allow_empty:
        choices.append(st.integers(0, n_keys).map(lambda i: (i, i)))
    return st.one_of(choices)


def _draw_attention_problem(draw: Callable[..., Any], bounds: _ProblemBounds) -> AttentionProblem:
    st = _strategies()
    index_dtypes = st.sampled_from((torch.int32, torch.int64))
    batch = draw(st.integers(1, bounds.max_batch))
    n_kv_heads = draw(st.integers(1, bounds.max_kv_heads))
    n_q_heads = n_kv_heads * draw(st.sampled_from(bounds.groups))
    head_dim = draw(st.sampled_from(bounds.head_dims))
    n_keys = draw(st.integers(bounds.min_keys, bounds.max_keys))
    dtype = draw(st.sampled_from(bounds.dtypes))
    ranges = [draw(_row_ranges(n_keys, bounds.allow_empty_rows)) for _ in range(batch)]
    starts = torch.tensor([start for start, _ in ranges], dtype=draw(index_dtypes))
    ends = torch.tensor([end for _, end in ranges], dtype=draw(index_dtypes))
    use_mask = draw(st.booleans()) if bounds.key_mask is None else bounds.key_mask
    mask_density = draw(st.sampled_from((0.9, 0.5, 0.15))) if use_mask else None
    scale = draw(st.floats(0.0, bounds.max_scale_factor)) / math.sqrt(head_dim)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))

    def normal(*shape: int) -> Tensor:
        value_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return torch.randn(*shape, generator=gen, dtype=value_dtype).to(dtype)

    mask = None
    if mask_density is not None:
        mask = torch.rand(batch, n_keys, generator=gen) < mask_density
        if not bounds.allow_empty_rows:  # every range is non-empty: keep its first key
            mask[torch.arange(batch), starts.long()] = True
    return AttentionProblem(
        q=normal(batch, n_q_heads, head_dim),
        k=normal(batch, n_kv_heads, n_keys, head_dim),
        v=normal(batch, n_kv_heads, n_keys, head_dim),
        starts=starts,
        ends=ends,
        key_mask=mask,
        scale=scale,
    )


def key_partitions(n_keys: int, *, max_parts: int = 6) -> SearchStrategy[KeyPartition]:
    """Strategy for a partition of keys ``[0, n_keys)`` into contiguous ranges, in any order.

    Parts may be empty (``(i, i)``, also at either end); together they cover every key once.

    >>> from hypothesis import given
    >>> @given(key_partitions(10))
    ... def test_covers(parts):
    ...     assert sorted(i for lo, hi in parts for i in range(lo, hi)) == list(range(10))
    >>> test_covers()
    """
    st = _strategies()
    if n_keys < 0 or max_parts < 1:
        raise ValueError(f"n_keys/max_parts: expected >= 0 and >= 1, got {n_keys}, {max_parts}")
    cuts = st.lists(st.integers(0, n_keys), max_size=max_parts - 1).map(sorted)

    def parts_between(points: list[int]) -> KeyPartition:
        bounds = [0, *points, n_keys]
        return list(zip(bounds[:-1], bounds[1:], strict=True))

    return cuts.map(parts_between).flatmap(lambda parts: st.permutations(parts).map(list))


def states(
    shape: tuple[int, ...] = (2, 4),
    head_dim: int = 8,
    *,
    dtype: torch.dtype = torch.float32,
    allow_empty: bool = True,
    max_abs_lse: float = 30.0,
) -> SearchStrategy[State]:
    """Strategy for a state ``(o[*shape, head_dim], lse[*shape])``, some entries empty.

    ``lse`` is uniform in ``[-max_abs_lse, max_abs_lse]`` and ``o`` standard normal; with
    ``allow_empty``, none, some, or all entries are the empty state ``(0, -inf)``.

    >>> from hypothesis import given
    >>> @given(states((3,), 4))
    ... def test_empty_entries_have_zero_o(state):
    ...     o, lse = state
    ...     assert (o[lse == float("-inf")] == 0).all()
    >>> test_empty_entries_have_zero_o()
    """
    st = _strategies()
    empty_fractions = st.sampled_from((0.0, 0.5, 1.0)) if allow_empty else st.just(0.0)

    def build(seed: int, empty_fraction: float) -> State:
        gen = torch.Generator().manual_seed(seed)
        o = torch.randn(*shape, head_dim, generator=gen, dtype=torch.float64)
        lse = (torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * max_abs_lse
        empty = torch.rand(*shape, generator=gen) < empty_fraction
        o = o.masked_fill(empty[..., None], 0.0)
        lse = lse.masked_fill(empty, float("-inf"))
        return o.to(dtype), lse.to(dtype)

    return st.builds(build, st.integers(0, 2**32 - 1), empty_fractions)


# ---------------------------------------------------------------------------------------------
# Tolerances and checks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """``|actual - expected| <= atol + rtol * |expected|``, for both ``o`` and ``lse``."""

    atol: float
    rtol: float


# Against an fp64 reference on the same (rounded) inputs, the error is the kernel's own
# arithmetic: fp32 accumulation over long rows (and exp2 approximations) for fp32; for half
# types also probabilities rounded to the input dtype before P @ V and the rounded output.
_TOLERANCES = {
    torch.float64: Tolerance(atol=1e-9, rtol=1e-9),
    torch.float32: Tolerance(atol=1e-4, rtol=1e-4),
    torch.float16: Tolerance(atol=2e-3, rtol=2e-3),
    torch.bfloat16: Tolerance(atol=1.6e-2, rtol=1.6e-2),
}


def tolerances(dtype: torch.dtype) -> Tolerance:
    """Tolerance for a kernel whose inputs are ``dtype``, compared with the fp64 reference.

    float32 assumes IEEE fp32 dot products: a kernel using TF32 needs a looser ``tolerance=``.

    >>> tolerances(torch.bfloat16)
    Tolerance(atol=0.016, rtol=0.016)
    """
    if dtype not in _TOLERANCES:
        raise ValueError(f"dtype: no tolerance for {dtype}; expected one of {list(_TOLERANCES)}")
    return _TOLERANCES[dtype]


def _index_of(flat_index: int, shape: torch.Size) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), shape))


def assert_no_nan(tensor: Tensor, name: str = "tensor") -> None:
    """Fail if ``tensor`` holds a NaN, naming how many and where the first one is.

    >>> assert_no_nan(torch.tensor([0.0, float("-inf")]), "lse")
    >>> assert_no_nan(torch.tensor([0.0, float("nan")]), "lse")
    Traceback (most recent call last):
    ...
    AssertionError: lse: 1 of 2 elements are NaN; the first at (1,)
    """
    nan = torch.isnan(tensor.detach())
    if nan.any():
        first = _index_of(int(nan.flatten().nonzero()[0]), nan.shape)
        count = int(nan.sum())
        raise AssertionError(f"{name}: {count} of {nan.numel()} elements are NaN; the first at "
                             f"{first}")


def poisoned(shape: Sequence[int], dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """An output buffer filled with NaN: after the kernel, :func:`assert_fully_written` it."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)


def assert_fully_written(
    out: Tensor, *, poison: float = float("nan"), name: str = "output"
) -> None:
    """Fail if a kernel left any element of a poisoned buffer ``out`` untouched.

    >>> out = poisoned((2, 3))
    >>> out[0] = 1.0
    >>> assert_fully_written(out)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    AssertionError: output: 3 of 6 elements still hold the poison nan: never written ... (1, 0)
    """
    out = out.detach()
    unwritten = torch.isnan(out) if math.isnan(poison) else out == poison
    if unwritten.any():
        first = _index_of(int(unwritten.flatten().nonzero()[0]), unwritten.shape)
        raise AssertionError(
            f"{name}: {int(unwritten.sum())} of {unwritten.numel()} elements still hold the "
            f"poison {poison}: never written (or written as that value); the first at {first}"
        )


def _assert_close(name: str, actual: Tensor, expected: Tensor, tol: Tolerance) -> None:
    """Elementwise closeness in float64; equal infinities match, NaN never does."""
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{name}: expected shape {tuple(expected.shape)}, got {tuple(actual.shape)}"
        )
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    diff = (a - e).abs()
    finite_close = torch.isfinite(a) & torch.isfinite(e) & (diff <= tol.atol + tol.rtol * e.abs())
    bad = ~(finite_close | (a == e))
    if bad.any():
        badness = torch.where(bad, diff.nan_to_num(nan=math.inf), torch.zeros_like(diff))
        worst = _index_of(int(badness.flatten().argmax()), bad.shape)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ beyond atol={tol.atol}, "
            f"rtol={tol.rtol}; worst at index {worst}: actual {a[worst].item()!r}, "
            f"expected {e[worst].item()!r}"
        )


def _assert_state_dtypes(name: str, o: Tensor, lse: Tensor) -> None:
    for part, t in (("o", o), ("lse", lse)):
        if t.dtype not in (torch.float32, torch.float64):
            raise AssertionError(f"{name} {part}: states are float32 (or float64), got {t.dtype}")


def assert_states_close(
    actual: State,
    expected: State,
    dtype: torch.dtype,
    *,
    tolerance: Tolerance | None = None,
    name: str = "state",
) -> None:
    """Fail unless state ``actual = (o, lse)`` matches ``expected`` within the tolerance for
    inputs of ``dtype``. Where ``expected`` is empty, ``actual`` must be exactly ``(0, -inf)``.

    >>> o, lse = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([0.5, float("-inf")])
    >>> assert_states_close((o + torch.tensor([[1e-6], [0.0]]), lse), (o, lse), torch.float32)
    >>> assert_states_close((o, lse + 0.1), (o, lse), torch.float32, name="merged")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    AssertionError: merged lse: 1 of 2 elements differ beyond atol=0.0001, rtol=0.0001; worst ...
    """
    tol = tolerances(dtype) if tolerance is None else tolerance
    (o, lse), (o_ref, lse_ref) = actual, expected
    for part, got, want in (("o", o, o_ref), ("lse", lse, lse_ref)):
        if got.shape != want.shape:
            raise AssertionError(
                f"{name} {part}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}"
            )
    _assert_state_dtypes(name, o, lse)
    assert_no_nan(o, f"{name} o")
    assert_no_nan(lse, f"{name} lse")
    _assert_close(f"{name} lse", lse, lse_ref, tol)
    empty_with_nonzero_o = torch.isneginf(lse_ref.cpu()) & (o.detach().cpu() != 0).any(dim=-1)
    if empty_with_nonzero_o.any():
        where = _index_of(int(empty_with_nonzero_o.flatten().nonzero()[0]), lse_ref.shape)
        raise AssertionError(f"{name} o: the empty state has o = 0, got a non-zero o at {where}")
    _assert_close(f"{name} o", o, o_ref, tol)


def _expect_output_layout(out: Tensor, problem: AttentionProblem) -> None:
    if out.shape != problem.q.shape or out.dtype != problem.dtype:
        raise AssertionError(
            f"output: expected shape {tuple(problem.q.shape)} and dtype {problem.dtype} (those of "
            f"q), got {tuple(out.shape)} {out.dtype}"
        )


def assert_matches_reference(
    attention_fn: AttentionFn, problem: AttentionProblem, *, tolerance: Tolerance | None = None
) -> None:
    """Fail unless ``attention_fn(*problem.args)`` equals the fp64 reference attention output.

    The output must have ``q``'s shape and dtype, hold no NaN, and be exactly 0 on rows that
    attend no key.

    >>> gen = torch.Generator().manual_seed(0)
    >>> q, k = torch.randn(1, 2, 4, generator=gen), torch.randn(1, 1, 3, 4, generator=gen)
    >>> problem = AttentionProblem(q, k, k, torch.tensor([0]), torch.tensor([3]), None, 0.5)
    >>> def uniform_average(q, k, v, starts, ends, key_mask, scale):  # ignores the scores
    ...     return v.mean(dim=2).expand_as(q)
    >>> assert_matches_reference(uniform_average, problem)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    AssertionError: output: ...
    """
    tol = tolerances(problem.dtype) if tolerance is None else tolerance
    out = attention_fn(*problem.args)
    _expect_output_layout(out, problem)
    assert_no_nan(out, "output")
    empty_rows = problem.empty_rows().to(out.device)
    if (out.detach()[empty_rows] != 0).any():
        rows = empty_rows.nonzero().flatten().tolist()
        raise AssertionError(f"output: rows {rows} attend no key and must be all zeros")
    expected, _ = problem.reference_state()
    _assert_close("output", out, expected, tol)


def assert_state_matches_reference(
    state_fn: StateFn, problem: AttentionProblem, *, tolerance: Tolerance | None = None
) -> None:
    """Fail unless ``state_fn(*problem.args)`` equals the fp64 reference state ``(o, lse)``.

    >>> q, k = torch.randn(1, 2, 64), torch.randn(1, 1, 3, 64)
    >>> problem = AttentionProblem(q, k, k, torch.tensor([1]), torch.tensor([1]), None, 0.5)
    >>> assert_state_matches_reference(torch.ops.macopt.decode_attention_state, problem)
    """
    o, lse = state_fn(*problem.args)
    expected = problem.reference_state()
    assert_states_close((o, lse), expected, problem.dtype, tolerance=tolerance)


def _check_partition(partition: KeyPartition, n_keys: int) -> None:
    ordered = sorted(partition)
    covered = 0
    for lo, hi in ordered:
        if lo != covered or hi < lo:
            raise ValueError(
                f"partition: expected contiguous ranges covering [0, {n_keys}), got {partition}"
            )
        covered = hi
    if covered != n_keys:
        raise ValueError(f"partition: expected ranges covering [0, {n_keys}), got {partition}")


def _merge_all(part_states: list[State], merge_fn: MergeFn | None) -> State:
    """Fold ``merge_fn`` over the states in order, or merge them exactly in fp64 when ``None``."""
    if merge_fn is None:
        o = torch.stack([o.to(torch.float64) for o, _ in part_states], dim=-2)
        lse = torch.stack([lse.to(torch.float64) for _, lse in part_states], dim=-1)
        return reference.merge_states(o, lse, dim=-1)
    merged = part_states[0]
    for o, lse in part_states[1:]:
        merged = merge_fn(*merged, o, lse)
    return merged


def assert_merge_matches_union(
    state_fn: StateFn,
    problem: AttentionProblem,
    partition: KeyPartition,
    *,
    merge_fn: MergeFn | None = None,
    tolerance: Tolerance | None = None,
) -> None:
    """Fail unless merging ``state_fn``'s states over the parts of ``partition`` equals the
    reference attention state over all of ``problem``'s keys (the split-KV identity).

    Each part ``(lo, hi)`` runs ``state_fn`` on ``problem.with_key_range(lo, hi)``. The states
    are merged by ``merge_fn(o_a, lse_a, o_b, lse_b)`` folded in the partition's order (to test a
    merge kernel too), or exactly in fp64 when ``merge_fn`` is ``None``.

    >>> gen = torch.Generator().manual_seed(0)
    >>> q, k = torch.randn(1, 2, 4, generator=gen), torch.randn(1, 1, 6, 4, generator=gen)
    >>> problem = AttentionProblem(q, k, k, torch.tensor([0]), torch.tensor([6]), None, 0.5)
    >>> assert_merge_matches_union(exact_state, problem, [(4, 6), (0, 0), (0, 4)])
    >>> def average(o_a, lse_a, o_b, lse_b):  # forgets the weights
    ...     return (o_a + o_b) / 2, torch.logaddexp(lse_a, lse_b)
    >>> parts = [(0, 3), (3, 6)]
    >>> assert_merge_matches_union(exact_state, problem, parts, merge_fn=average)
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    AssertionError: merge of the states over parts [(0, 3), (3, 6)] o: ...
    """
    _check_partition(partition, problem.n_keys)
    part_states = []
    for lo, hi in partition:
        o, lse = state_fn(*problem.with_key_range(lo, hi).args)
        _assert_state_dtypes(f"state of keys [{lo}, {hi})", o, lse)
        part_states.append((o, lse))
    merged = _merge_all(part_states, merge_fn)
    assert_states_close(
        merged,
        problem.reference_state(),
        problem.dtype,
        tolerance=tolerance,
        name=f"merge of the states over parts {partition}",
    )
