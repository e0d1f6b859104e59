"""Top-K + phi Triton kernels against the reference (CPU: through TRITON_INTERPRET=1)."""

import pytest
import topk_phi_cases
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from topk_phi_cases import Problem

from macopt.kernels import reference, topk_phi
from macopt.kernels import topk_phi_reference as ref
from macopt.kernels.feature_maps import positive_random_features

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_problem(*args, **kwargs) -> Problem:
    """The shared random problem, on the device the kernels run on (same values anywhere)."""
    return topk_phi_cases.make_problem(*args, device=DEVICE, **kwargs)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernels allocate starts as NaN: an unwritten element fails the test."""
    def nan_empty(*shape, dtype=None, device=None):
        return torch.full(*shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(topk_phi, "_new_empty", nan_empty)


def _switch_mlp_on(p: Problem, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for phi in (p.maps.phi_q, p.maps.phi_k):
            phi.alpha.copy_(torch.rand(phi.alpha.shape, generator=gen))
            phi.w_2.copy_(torch.randn(phi.w_2.shape, generator=gen) * 0.1)


def _kernel_summary(p: Problem, num_splits: int | None = None) -> ref.PhiSummary:
    return topk_phi.build_summary(p.k, p.v, p.maps.phi_k.folded(), p.mid_start, p.mid_end,
                                  num_splits=num_splits)


def _both_decodes(p: Problem, selected, completion=None, num_splits=None, block_n=None,
                  separate_share=None):
    log_phi_q, log_phi_k = p.log_phi()
    kernel = topk_phi.topk_phi_decode_state(
        p.q, p.k, p.v, p.scale, p.starts, p.ends, _kernel_summary(p), selected, log_phi_q,
        p.maps.phi_k.folded(), completion, num_splits=num_splits, block_n=block_n,
        separate_share=separate_share)
    oracle = ref.topk_phi_decode_state(
        p.q, p.k, p.v, p.scale, p.starts, p.ends, p.summary(), selected, log_phi_q, log_phi_k,
        completion, compute_dtype=F64)
    return kernel, oracle


def _assert_states_close(kernel, oracle, tol=2e-5):
    torch.testing.assert_close(kernel[0], oracle[0].float(), rtol=tol, atol=tol)
    torch.testing.assert_close(kernel[1], oracle[1].float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_summary_kernel_matches_the_reference_with_the_mlp_on(num_splits):
    p = make_problem(head_dim=64, d_phi=32, n_keys=128)
    _switch_mlp_on(p)
    kernel, oracle = _kernel_summary(p, num_splits), p.summary()
    for name in ("m", "u", "t"):
        torch.testing.assert_close(getattr(kernel, name), getattr(oracle, name).float(),
                                   rtol=1e-5, atol=1e-5, msg=name)


def test_summary_of_an_empty_mid_region_is_the_empty_summary():
    p = make_problem(head_dim=64, lengths=[10, 2])
    summary = _kernel_summary(p, num_splits=2)
    assert torch.all(summary.m == float("-inf"))
    assert torch.all(summary.u == 0) and torch.all(summary.t == 0)


@pytest.mark.parametrize("page_size", [8, 16])
def test_page_bounds_and_scores_match_the_reference(page_size):
    p = make_problem(n_q_heads=8, head_dim=64, n_keys=100, lengths=[90, 61])
    bounds = topk_phi.build_page_bounds(p.k, p.mid_start, p.mid_end, page_size)
    expected = ref.build_page_bounds(p.k, p.mid_start, p.mid_end, page_size)
    torch.testing.assert_close(bounds.kmin, expected.kmin, rtol=0, atol=0)
    torch.testing.assert_close(bounds.kmax, expected.kmax, rtol=0, atol=0)
    scores = topk_phi.page_scores(p.q, bounds, p.mid_start, p.mid_end, page_size, p.scale)
    oracle = ref.page_scores(p.q, expected, p.mid_start, p.mid_end, page_size, p.scale)
    torch.testing.assert_close(scores, oracle, rtol=1e-5, atol=1e-5)


def test_page_selector_returns_the_reference_pages_as_token_indices():
    p = make_problem(n_q_heads=8, head_dim=64, n_keys=128)
    bounds = topk_phi.build_page_bounds(p.k, p.mid_start, p.mid_end, 16)
    tokens = topk_phi.select_pages(p.q, bounds, p.mid_start, p.mid_end, 16, p.scale, 3)
    oracle_scores = ref.page_scores(p.q, bounds, p.mid_start, p.mid_end, 16, p.scale)
    pages = ref.select_pages(oracle_scores, n_kv_heads=2, n_selected=3)
    assert tokens.shape == (2, 2, 48)
    assert torch.equal(tokens, ref.pages_to_tokens(pages, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_kernel_matches_the_reference(head_dim, group, dtype):
    p = make_problem(n_q_heads=2 * group, n_kv_heads=2, head_dim=head_dim, d_phi=32,
                     n_keys=112, dtype=dtype, lengths=[100, 57], n_generated=5, seed=group)
    if group == 4:
        _switch_mlp_on(p)
    selected = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k=24)
    kernel, oracle = _both_decodes(p, selected, num_splits=3, block_n=16)
    # bf16 on a GPU rounds the probabilities to bf16 before P.V (the interpreter upcasts), as
    # every bf16 attention kernel does: a bf16 tolerance, as for the exact decode kernel.
    _assert_states_close(kernel, oracle, tol=1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("d_phi", [2, 6, 16])
def test_small_feature_maps_fill_a_padded_dot_tile(d_phi):
    # Calibrated probe maps use 2-16 features; tl.dot tiles are at least 16 wide, so the
    # kernels mask the padding features out of the summary and the completion alike.
    p = make_problem(n_q_heads=8, n_kv_heads=2, head_dim=64, d_phi=d_phi, n_keys=96,
                     lengths=[90, 41], n_generated=3, seed=d_phi)
    kernel, oracle = _kernel_summary(p, num_splits=2), p.summary()
    for name in ("m", "u", "t"):
        torch.testing.assert_close(getattr(kernel, name), getattr(oracle, name).float(),
                                   rtol=1e-5, atol=1e-5, msg=name)
    selected = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k=16)
    decoded, expected = _both_decodes(p, selected, num_splits=2, block_n=16)
    _assert_states_close(decoded, expected, tol=1e-4)


@pytest.mark.parametrize(("d_phi", "mlp", "batch"), [(2, False, 3), (16, True, 17), (72, True, 2)])
def test_query_feature_kernel_matches_log_features(d_phi, mlp, batch):
    # Rows past a 16-row block (17), features past a 64-feature block (72), the MLP path.
    from macopt.kernels.feature_maps import log_features

    maps = positive_random_features(8, 2, 32, d_phi, generator=torch.Generator().manual_seed(3))
    if mlp:
        gen = torch.Generator().manual_seed(4)
        with torch.no_grad():
            maps.phi_q.alpha.copy_(torch.rand(maps.phi_q.alpha.shape, generator=gen))
            maps.phi_q.w_2.copy_(torch.randn(maps.phi_q.w_2.shape, generator=gen) * 0.1)
    folded = maps.phi_q.folded()
    assert folded.has_mlp == mlp
    folded = type(folded)(*(x.to(DEVICE) if torch.is_tensor(x) else x for x in folded))
    q = torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    got = topk_phi.query_log_features(q.to(torch.bfloat16), folded)
    want = log_features(q.to(torch.bfloat16), folded)
    assert got.shape == (batch, 8, d_phi) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_decode_output_is_the_state_in_q_dtype():
    p = make_problem(head_dim=64, dtype=torch.bfloat16)
    selected = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k=16)
    log_phi_q, _ = p.log_phi()
    args = (p.q, p.k, p.v, p.scale, p.starts, p.ends, _kernel_summary(p), selected, log_phi_q,
            p.maps.phi_k.folded())
    out = topk_phi.topk_phi_decode(*args)
    o, _ = topk_phi.topk_phi_decode_state(*args)
    assert out.dtype == torch.bfloat16
    # One bf16 ulp: the interpreter's fp32 -> bf16 cast does not round to nearest.
    torch.testing.assert_close(out, o.to(torch.bfloat16), rtol=2**-7, atol=1e-6)


def test_selecting_every_page_gives_exact_attention():
    p = make_problem(n_q_heads=8, head_dim=64, n_keys=128, lengths=[110, 70])
    bounds = topk_phi.build_page_bounds(p.k, p.mid_start, p.mid_end, 16)
    selected = topk_phi.select_pages(p.q, bounds, p.mid_start, p.mid_end, 16, p.scale, 8)
    kernel, _ = _both_decodes(p, selected, num_splits=2)
    exact = reference.attention_state(p.q, p.k, p.v, p.scale, p.starts, p.ends)
    _assert_states_close(kernel, exact, tol=1e-5)


def test_zero_mass_completion_equals_topk_only_attention():
    p = make_problem(head_dim=64)
    with torch.no_grad():
        p.maps.phi_q.b_o.fill_(-1e4)
    selected = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k=16)
    (o, lse), _ = _both_decodes(p, selected)
    off = torch.zeros(p.q.shape[1], dtype=torch.bool, device=DEVICE)
    _, (o_off, lse_off) = _both_decodes(p, selected, completion=off)
    _assert_states_close((o, lse), (o_off, lse_off), tol=1e-5)


def test_completion_switch_is_per_query_head():
    p = make_problem(head_dim=64)
    selected = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k=16)
    completion = torch.tensor([True, False, False, True], device=DEVICE)
    kernel, oracle = _both_decodes(p, selected, completion=completion)
    _assert_states_close(kernel, oracle)


@pytest.mark.parametrize("kind", ["state", "output"])
def test_no_completion_anywhere_skips_the_features_with_the_same_result(kind):
    """``complete=False`` (every head's completion off, known statically) launches no feature
    share and reads no query features (here NaN: any read would show) and no summary moments
    (NaN too), and gives what the same switches give through the full path."""
    p = make_problem(head_dim=64)
    selected = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k=16)
    off = torch.zeros(p.q.shape[1], dtype=torch.bool, device=DEVICE)
    log_phi_q, _ = p.log_phi()
    summary = _kernel_summary(p)
    run = topk_phi.topk_phi_decode_state if kind == "state" else topk_phi.topk_phi_decode
    full = run(p.q, p.k, p.v, p.scale, p.starts, p.ends, summary, selected, log_phi_q,
               p.maps.phi_k.folded(), off)
    poisoned = ref.PhiSummary(*(torch.full_like(x, float("nan")) for x in summary[:3]),
                              *summary[3:])
    skipped = run(p.q, p.k, p.v, p.scale, p.starts, p.ends, poisoned, selected,
                  torch.full_like(log_phi_q, float("nan"))[..., :0], p.maps.phi_k.folded(),
                  off, complete=False)
    for a, b in zip(full if kind == "state" else (full,), skipped if kind == "state" else
                    (skipped,), strict=True):
        assert not b.isnan().any()
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_selection_entries_outside_the_mid_region_are_ignored():
    p = make_problem(head_dim=64)
    selected = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k=8)
    junk = torch.tensor([-5, 0, 1, 95, 500], dtype=torch.int32, device=DEVICE).expand(2, 2, 5)
    kernel, _ = _both_decodes(p, torch.cat([selected, junk], dim=-1))
    _, oracle = _both_decodes(p, selected)
    _assert_states_close(kernel, oracle)


@pytest.mark.parametrize("separate_share", [False, True])
def test_rows_without_mid_or_without_keys_stay_finite(separate_share):
    p = make_problem(batch=3, head_dim=64, lengths=[6, 0, 40], n_generated=0)
    selected = torch.zeros(3, 2, 16, dtype=torch.int32, device=DEVICE)
    kernel, oracle = _both_decodes(p, selected, num_splits=2, separate_share=separate_share)
    _assert_states_close(kernel, oracle)
    assert torch.all(kernel[0][1] == 0) and torch.all(kernel[1][1] == float("-inf"))


@settings(max_examples=12)
@given(
    batch=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4, 8]),
    n_kv_heads=st.integers(1, 2),
    n_keys=st.integers(24, 120),
    n_sink=st.integers(0, 6),
    n_tail=st.integers(0, 20),
    n_generated=st.integers(0, 9),
    top_k=st.integers(1, 40),
    per_page=st.booleans(),
    num_splits=st.integers(1, 4),
    separate_share=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_decode_kernel_matches_the_reference_on_random_problems(
    batch, group, n_kv_heads, n_keys, n_sink, n_tail, n_generated, top_k, per_page, num_splits,
    separate_share, seed, data,
):
    prompt = st.integers(0, n_keys - n_generated)
    lengths = data.draw(st.lists(prompt, min_size=batch, max_size=batch), label="lengths")
    p = make_problem(batch, group * n_kv_heads, n_kv_heads, n_keys, head_dim=64, d_phi=16,
                     seed=seed, n_sink=n_sink, n_tail=n_tail, n_generated=n_generated,
                     lengths=lengths)
    if per_page:
        bounds = topk_phi.build_page_bounds(p.k, p.mid_start, p.mid_end, 8)
        selected = topk_phi.select_pages(p.q, bounds, p.mid_start, p.mid_end, 8, p.scale,
                                         -(-top_k // 8))
    else:
        selected = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k)
    kernel, oracle = _both_decodes(p, selected, num_splits=num_splits, block_n=16,
                                   separate_share=separate_share)
    # The completion subtracts the retrieved keys' features from the summary: when (nearly)
    # every mid key is retrieved, that difference is fp32 rounding, and the fp32 reference is
    # as far from fp64 as the kernel. Each head gets 4x its fp32 reference's own error.
    log_phi_q, log_phi_k = p.log_phi()
    fp32 = ref.topk_phi_decode_state(p.q, p.k, p.v, p.scale, p.starts, p.ends, p.summary(),
                                     selected, log_phi_q, log_phi_k)
    conditioning = 4 * (fp32[0].double() - oracle[0]).abs().amax(dim=-1, keepdim=True)
    error = (kernel[0].double() - oracle[0]).abs()
    assert torch.all(error <= 1e-4 * (1 + oracle[0].abs()) + conditioning), error.max()
    torch.testing.assert_close(kernel[1], oracle[1].float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_share_in_its_own_launch_gives_the_fused_state(monkeypatch, dtype):
    # The retrieved keys' feature share from a launch of its own (split over the retrieved
    # keys alone, its own split count) against the one launch that makes both; the MLP path.
    p = make_problem(n_q_heads=8, n_kv_heads=2, head_dim=64, d_phi=24, n_keys=150, dtype=dtype,
                     lengths=[140, 77], n_generated=4, seed=21)
    _switch_mlp_on(p)
    selected = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k=40)
    fused, oracle = _both_decodes(p, selected, num_splits=3, block_n=32, separate_share=False)
    apart, _ = _both_decodes(p, selected, num_splits=3, block_n=32, separate_share=True)
    _assert_states_close(apart, fused, tol=1e-5)
    _assert_states_close(apart, oracle, tol=1e-4 if dtype == torch.float32 else 2e-2)
    monkeypatch.setattr(topk_phi, "SHARE_BLOCK_N", 16)  # the share's own, smaller tiles
    small_tiles, _ = _both_decodes(p, selected, num_splits=3, block_n=32, separate_share=True)
    _assert_states_close(small_tiles, fused, tol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 80])
def test_completion_split_over_dim_blocks_gives_the_same_state(monkeypatch, head_dim):
    # On a GPU with fewer (row, KV head) programs than SMs the completion launch splits the
    # output dims into blocks; the CPU has one "SM", so force 16-dim blocks (80: a partial one).
    monkeypatch.setattr(topk_phi, "_complete_dim_block", lambda programs, block_d, device: 16)
    p = make_problem(n_q_heads=6, n_kv_heads=2, head_dim=head_dim, d_phi=24, n_keys=90,
                     lengths=[80, 41], n_generated=3, seed=11)
    selected = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k=12)
    split, oracle = _both_decodes(p, selected, num_splits=2, block_n=16)
    _assert_states_close(split, oracle, tol=1e-4)


def test_fp16_feature_products_stay_near_the_reference(monkeypatch):
    # topk_phi.HALF_FEATURES (the default): the keys' feature products on fp16 tensor cores,
    # in the summary and in the decode kernel alike (their roundings cancel in the
    # subtraction); the bf16 tolerance of the other kernel tests. Mismatched roundings
    # measured 0.0094 here under the interpreter, 0.032 on the H100.
    monkeypatch.setattr(topk_phi, "HALF_FEATURES", True)
    p = make_problem(n_q_heads=16, n_kv_heads=2, head_dim=64, d_phi=32, n_keys=112,
                     dtype=torch.bfloat16, lengths=[100, 57], n_generated=5, seed=8)
    selected = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k=24)
    kernel, oracle = _both_decodes(p, selected, num_splits=3, block_n=16)
    _assert_states_close(kernel, oracle, tol=2e-2)
    monkeypatch.setattr(topk_phi, "HALF_FEATURES", False)
    precise, oracle = _both_decodes(p, selected, num_splits=3, block_n=16)
    assert not torch.equal(kernel[0], precise[0])  # the switch did change the products
    _assert_states_close(precise, oracle, tol=2e-2)
