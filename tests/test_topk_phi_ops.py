"""torch.ops.macopt.topk_phi_prefill / topk_phi_decode: opcheck, compile, state, identities."""

import pytest
import torch
from topk_phi_cases import Problem, make_problem

import macopt  # noqa: F401  (registers torch.ops.macopt.*)
from macopt.config import TopKPhiConfig
from macopt.kernels import reference
from macopt.kernels import topk_phi_reference as ref
from macopt.topk_phi_select import (
    exact_selection,
    group_counts,
    select,
    summary_budget_tokens,
    summary_counts,
)
from macopt.topk_phi_state import TopKPhiState, budget_summary_tokens, decode, decode_impl, prefill

ops = torch.ops.macopt
HEAD_DIM = 64  # the kernels' smallest supported head dim
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(dtype=torch.float32, **overrides) -> Problem:
    fields = dict(batch=2, n_q_heads=4, n_kv_heads=2, n_keys=96, head_dim=HEAD_DIM, d_phi=16,
                  dtype=dtype, n_tail=8)
    return make_problem(**{**fields, **overrides})


def _state(p: Problem, page_size: int | None = 16, completion=None,
           sketch: bool = False) -> TopKPhiState:
    batch, n_q_heads, head_dim = p.q.shape
    return TopKPhiState.allocate(batch, n_q_heads, p.k.shape[1], p.k.shape[2], head_dim,
                                 p.k.dtype, p.k.device, page_size=page_size, maps=p.maps,
                                 completion=completion, sketch=sketch)


def _config(**fields) -> TopKPhiConfig:
    # The page selector unless a test names another (these tests cover the page bounds too).
    return TopKPhiConfig(**{"sinks": 4, "tail": 8, "page_size": 16, "selector": "page", **fields})


def _prefilled(p: Problem, config: TopKPhiConfig, completion=None) -> TopKPhiState:
    page_size = config.page_size if config.selector == "page" else None
    state = _state(p, page_size, completion, sketch=config.selector == "sketch")
    prefill(state, p.k, p.v, p.starts, p.prefill_ends, config)
    return state


def _prefill_args(state: TopKPhiState, p: Problem, config: TopKPhiConfig) -> tuple:
    return (p.k, p.v, p.starts, p.prefill_ends, state.phi_k, state.phi_k_mlp, config.sinks,
            config.tail, config.page_size, state.m, state.u, state.t, state.mid_start,
            state.mid_end, state.kmin, state.kmax)


def _decode_args(state: TopKPhiState, p: Problem, config: TopKPhiConfig, budget: int) -> tuple:
    return (p.q, p.k, p.v, p.starts, p.ends, state.m, state.u, state.t, state.mid_start,
            state.mid_end, state.kmin, state.kmax, state.phi_q, state.phi_q_mlp, state.phi_k,
            state.phi_k_mlp, state.completion, p.scale, budget, config.page_size,
            config.selector_spec())


def _exact(p: Problem) -> torch.Tensor:
    return reference.attention(p.q, p.k, p.v, p.scale, p.starts, p.ends)


# --- registration ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_bounds", [True, False], ids=["page_bounds", "no_bounds"])
def test_prefill_passes_opcheck(dtype, with_bounds):
    p, config = _problem(dtype), _config()
    state = _state(p, config.page_size if with_bounds else None)
    torch.library.opcheck(ops.topk_phi_prefill, _prefill_args(state, p, config))


@pytest.mark.parametrize("selector", ["page", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_passes_opcheck(selector, dtype):
    p, config = _problem(dtype), _config(selector=selector)
    state = _prefilled(p, config)
    torch.library.opcheck(ops.topk_phi_decode, _decode_args(state, p, config, budget=32))


def test_prefill_then_decode_compile_with_fullgraph_and_match_eager():
    p, config = _problem(), _config(budget=32)
    eager_state, compiled_state = _state(p), _state(p)

    def step(state, q, k, v):
        prefill(state, k, v, p.starts, p.prefill_ends, config)
        return decode(state, q * 2.0, k, v, p.starts, p.ends, p.scale, config) + 1.0

    expected = step(eager_state, p.q, p.k, p.v)
    got = torch.compile(step, fullgraph=True)(compiled_state, p.q, p.k, p.v)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(compiled_state.t, eager_state.t)


# --- state -----------------------------------------------------------------------------------


def test_prefill_writes_the_reference_summary_and_bounds_in_place():
    p, config = _problem(), _config()
    state = _state(p)
    addresses = [x.data_ptr() for x in (state.m, state.u, state.t, state.kmin, state.kmax)]
    prefill(state, p.k, p.v, p.starts, p.prefill_ends, config)
    summary = p.summary()
    for name in ("m", "u", "t"):
        torch.testing.assert_close(getattr(state, name), getattr(summary, name).float(),
                                   rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(state.mid_start, p.mid_start) and torch.equal(state.mid_end, p.mid_end)
    bounds = ref.build_page_bounds(p.k, p.mid_start, p.mid_end, config.page_size)
    assert torch.equal(state.kmin, bounds.kmin) and torch.equal(state.kmax, bounds.kmax)
    after = [x.data_ptr() for x in (state.m, state.u, state.t, state.kmin, state.kmax)]
    assert after == addresses


def test_a_second_prefill_replaces_the_state_of_the_first():
    first, second, config = _problem(seed=1), _problem(seed=2), _config()
    reused = _prefilled(first, config)
    prefill(reused, second.k, second.v, second.starts, second.prefill_ends, config)
    second.maps = first.maps  # the state holds the site's maps; only the prompt changed
    fresh = _prefilled(second, config)
    for name in ("m", "u", "t", "mid_start", "mid_end", "kmin", "kmax"):
        assert torch.equal(getattr(reused, name), getattr(fresh, name)), name


# --- identities through the ops --------------------------------------------------------------


@pytest.mark.parametrize("selector", ["page", "exact", "channel", "sketch"])
def test_a_budget_covering_the_context_gives_exact_attention(selector):
    p = _problem(lengths=[80, 51])
    config = _config(selector=selector, budget=1.0)
    out = decode(_prefilled(p, config), p.q, p.k, p.v, p.starts, p.ends, p.scale, config)
    torch.testing.assert_close(out, _exact(p), rtol=1e-5, atol=1e-5)


def test_completion_off_is_topk_only_renormalised_attention():
    p, config = _problem(), _config(selector="exact", budget=8)
    state = _prefilled(p, config, completion=(False,) * 4)
    out = decode(state, p.q, p.k, p.v, p.starts, p.ends, p.scale, config)
    selected = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, 8, per_kv_head=True)
    retrieved = ref.selection_mask(selected, 4, p.mid_start, p.mid_end, p.k.shape[2])
    current = ref.positions_in(p.starts, p.ends, p.k.shape[2])[:, None, :]
    mid = ref.positions_in(p.mid_start, p.mid_end, p.k.shape[2])[:, None, :]
    expected, _ = ref.exact_state(p.q, p.k, p.v, p.scale, current & (~mid | retrieved))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_completion_brings_topk_closer_to_full_attention_on_diffuse_heads():
    # Small random queries and keys give near-uniform attention (most mass lies outside any
    # small Top-K) and keep the positive random features' variance low.
    p = _problem(n_keys=512, d_phi=64, lengths=[500, 480])
    p.q, p.k = 0.5 * p.q, 0.5 * p.k
    on, off = _config(selector="exact", budget=16), _config(selector="exact", budget=16)
    exact = _exact(p)
    with_phi = decode(_prefilled(p, on), p.q, p.k, p.v, p.starts, p.ends, p.scale, on)
    topk_only = decode(_prefilled(p, off, completion=(False,) * 4), p.q, p.k, p.v, p.starts,
                       p.ends, p.scale, off)
    error = lambda out: float((out - exact).abs().sum() / exact.abs().sum())  # noqa: E731
    assert error(with_phi) < 0.5 * error(topk_only)


def test_triton_path_matches_the_reference_path(monkeypatch):
    # The reference path runs on CPU tensors; the Triton path on the test device (a CUDA
    # tensor always takes it), from the same seeded problem.
    p, config = _problem(), _config(budget=32)
    expected = decode(_prefilled(p, config), p.q, p.k, p.v, p.starts, p.ends, p.scale, config)
    monkeypatch.setenv("MACOPT_CPU_KERNELS", "triton")
    p = _problem(device=DEVICE)
    got = decode(_prefilled(p, config), p.q, p.k, p.v, p.starts, p.ends, p.scale, config)
    torch.testing.assert_close(got.cpu(), expected, rtol=2e-5, atol=2e-5)


def test_exact_selection_without_fp32_keys_equals_the_reference_topk():
    p = _problem(n_q_heads=8, n_keys=200, lengths=[190, 150])
    got = exact_selection(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k=20)
    expected = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, 20, per_kv_head=True)
    assert torch.equal(got, expected)


# --- validation ------------------------------------------------------------------------------


def _bad_decode(change):
    p, config = _problem(), _config()
    args = list(_decode_args(_prefilled(p, config), p, config, budget=16))
    change(args)
    return args


BAD_DECODE = [
    pytest.param(lambda a: a.__setitem__(5, a[5].double()), "m: expected", id="m-fp64"),
    pytest.param(lambda a: a.__setitem__(7, a[7][..., :32]), "t: expected", id="t-head-dim"),
    pytest.param(lambda a: a.__setitem__(8, a[8].float()), "mid_start", id="mid-start-float"),
    pytest.param(lambda a: a.__setitem__(10, None), "kmin: the page selector", id="no-bounds"),
    pytest.param(lambda a: a.__setitem__(11, a[11][:, :, :-1]), "kmax", id="kmax-pages"),
    pytest.param(lambda a: a.__setitem__(12, a[12][:5]), "phi_q: expected the 6", id="phi-q-5"),
    pytest.param(lambda a: a.__setitem__(14, [a[12][0], *a[14][1:]]), "phi_k: expected lin_w",
                 id="phi-k-has-q-heads"),
    pytest.param(lambda a: a.__setitem__(16, torch.ones(3, dtype=torch.bool)), "completion",
                 id="completion-3-heads"),
    pytest.param(lambda a: a.__setitem__(18, 0), "budget", id="budget-0"),
    pytest.param(lambda a: a.__setitem__(19, 12), "page_size", id="page-size-12"),
    pytest.param(lambda a: a.__setitem__(20, "quest"), "selector", id="selector-quest"),
]


@pytest.mark.parametrize("change, named", BAD_DECODE)
def test_decode_rejects_bad_input_naming_the_argument(change, named):
    with pytest.raises(ValueError, match=f"^{named}"):
        ops.topk_phi_decode(*_bad_decode(change))


def test_prefill_rejects_a_summary_of_the_wrong_feature_count():
    p, config = _problem(), _config()
    state = _state(p)
    args = list(_prefill_args(state, p, config))
    args[9] = torch.zeros(2, 2, 8)  # m with 8 features; u and t have 16
    with pytest.raises(ValueError, match="^u: expected"):
        ops.topk_phi_prefill(*args)


# --- summary_in_budget -------------------------------------------------------------------------

# Group 0 (heads 0, 1) reads the summary through head 0; group 1 (heads 2, 3) has every head off.
MIXED = (True, False, False, False)


def _decode_with(p: Problem, config: TopKPhiConfig, completion) -> torch.Tensor:
    state = _prefilled(p, config, completion=completion)
    return decode(state, p.q, p.k, p.v, p.starts, p.ends, p.scale, config)


@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize("selector", ["page", "exact"])
def test_summary_in_budget_charges_only_groups_that_read_the_summary(selector, path,
                                                                     monkeypatch):
    if path == "triton":
        monkeypatch.setenv("MACOPT_CPU_KERNELS", "triton")
    p = _problem(n_keys=128, lengths=[120, 101], device=DEVICE if path == "triton" else "cpu")
    given_up = summary_budget_tokens(HEAD_DIM, 16, p.k.element_size())
    assert given_up == 9  # fp32 cache, d_phi 16: 8.25 token equivalents, rounded up
    budget = 40  # page selector: 3 pages for Top-K, ceil(31 / 16) = 2 with the summary
    charged = _config(selector=selector, budget=budget, summary_in_budget=True)
    out = _decode_with(p, charged, MIXED)
    # An all-off group is exactly Top-K-only attention at the full budget ...
    topk_full = _decode_with(p, _config(selector=selector, budget=budget), (False,) * 4)
    torch.testing.assert_close(out[:, 2:], topk_full[:, 2:], rtol=1e-6, atol=1e-6)
    # ... and a summary-reading group is Top-K + phi with K - s keys (its off head: Top-K).
    reduced = _decode_with(p, _config(selector=selector, budget=budget - given_up), MIXED)
    torch.testing.assert_close(out[:, :2], reduced[:, :2], rtol=1e-6, atol=1e-6)
    # The summary's keys matter here: without the charge, group 0 differs.
    uncharged = _decode_with(p, _config(selector=selector, budget=budget), MIXED)
    assert not torch.allclose(out[:, :2], uncharged[:, :2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("selector", ["page", "exact"])
def test_summary_in_budget_keeps_the_selection_width_and_pads_with_minus_one(selector):
    p = _problem(n_keys=128, lengths=[120, 101])
    config = _config(selector=selector, budget=40)
    state = _prefilled(p, config, completion=MIXED)
    counts = group_counts(state.completion, 2, 40, 9, 16 if selector == "page" else None)
    assert counts.tolist() == ([2, 3] if selector == "page" else [31, 40])
    args = (p.q, p.k, p.scale, p.mid_start, p.mid_end, state.kmin, state.kmax, 40, 16,
            selector, False)
    symbolic = summary_counts(state.completion, 40, 9, 16 if selector == "page" else None)
    assert torch.equal(symbolic.tensor(2), counts)
    plain, counted = select(*args), select(*args, counts=symbolic)
    assert counted.shape == plain.shape  # static shapes: only the contents change
    kept = (counted >= 0).sum(dim=-1)
    per_group = [2 * 16, 3 * 16] if selector == "page" else [31, 40]
    assert kept.tolist() == [per_group, per_group]
    assert torch.equal(counted[:, 1], plain[:, 1])  # a full count is the plain selection


def test_summary_in_budget_false_is_bit_identical_to_the_op_without_the_argument():
    p, config = _problem(), _config(budget=32)
    state = _prefilled(p, config, completion=MIXED)
    assert budget_summary_tokens(config, state.t, p.k.dtype) == 0
    args = _decode_args(state, p, config, budget=32)
    assert torch.equal(ops.topk_phi_decode(*args), ops.topk_phi_decode(*args, 0))
    assert torch.equal(decode(state, p.q, p.k, p.v, p.starts, p.ends, p.scale, config),
                       ops.topk_phi_decode(*args))


@pytest.mark.parametrize("selector", ["page", "exact"])
def test_decode_with_summary_tokens_passes_opcheck_and_its_state_form_is_fp32(selector):
    p, config = _problem(), _config(selector=selector)
    state = _prefilled(p, config, completion=MIXED)
    args = _decode_args(state, p, config, budget=32)
    torch.library.opcheck(ops.topk_phi_decode, (*args, 9))
    # The state form MAC + Top-K + phi reads (a miss's prefix state): fp32 (o, lse), the op's
    # output before its cast to q's dtype.
    o, lse, _ = decode_impl(*args, state=True, summary_tokens=9)
    assert o.dtype == lse.dtype == torch.float32
    assert o.shape == p.q.shape and lse.shape == p.q.shape[:2]
    torch.testing.assert_close(o.to(p.q.dtype), ops.topk_phi_decode(*args, 9))


@pytest.mark.parametrize("selector", ["sketch", "exact", "page"])
def test_a_state_with_every_completion_off_skips_the_features_with_the_same_output(
        monkeypatch, selector):
    """A state allocated with every head's completion off knows it statically (``complete``)
    and its Triton decode launches no feature work; it answers what the full path answers with
    the same switches."""
    monkeypatch.setenv("MACOPT_CPU_KERNELS", "triton")
    torch.manual_seed(0)
    batch, q_heads, kv_heads, n, d = 2, 4, 2, 160, 64
    q, k, v = torch.randn(batch, q_heads, d), *torch.randn(2, batch, kv_heads, n, d)
    starts = torch.zeros(batch, dtype=torch.int32)
    ends = torch.full((batch,), n, dtype=torch.int32)
    config = TopKPhiConfig(sinks=2, tail=8, budget=16, page_size=16, selector=selector,
                           completion=False)
    outs = []
    for full_path in (True, False):
        state = TopKPhiState.allocate(batch, q_heads, kv_heads, n, d, torch.float32, "cpu",
                                      page_size=16 if selector == "page" else None,
                                      completion=(False,) * q_heads,
                                      sketch=selector == "sketch")
        assert not state.complete
        state.complete = full_path
        prefill(state, k, v, starts, ends, config)
        outs.append(decode(state, q, k, v, starts, ends, d ** -0.5, config))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
