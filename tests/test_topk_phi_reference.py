"""Identities of the Top-K + phi reference (docs/ALGORITHMS.md, section 2)."""

import pytest
import torch
from topk_phi_cases import Problem, make_problem

from macopt.kernels import reference
from macopt.kernels import topk_phi_reference as ref

F64 = torch.float64


def _decode(p: Problem, selected, completion=None, eps=1e-6):
    log_phi_q, log_phi_k = p.log_phi()
    return ref.topk_phi_decode_state(p.q, p.k, p.v, p.scale, p.starts, p.ends, p.summary(),
                                     selected, log_phi_q, log_phi_k, completion, eps,
                                     compute_dtype=F64)


def _all_mid_keys(p: Problem, n_heads: int) -> torch.Tensor:
    n_keys = p.k.shape[2]
    return torch.arange(n_keys, dtype=torch.int32).expand(p.q.shape[0], n_heads, n_keys)


def _exact(p: Problem):
    return reference.attention_state(p.q, p.k, p.v, p.scale, p.starts, p.ends, compute_dtype=F64)


@pytest.mark.parametrize("group", [1, 4])
def test_selecting_the_whole_mid_region_gives_exact_attention(group):
    p = make_problem(n_q_heads=2 * group, n_kv_heads=2)
    o, lse = _decode(p, _all_mid_keys(p, 2))
    o_exact, lse_exact = _exact(p)
    torch.testing.assert_close(o, o_exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_exact, rtol=1e-5, atol=1e-5)


def test_zero_mass_completion_equals_topk_only_renormalised_attention():
    p = make_problem()
    with torch.no_grad():
        p.maps.phi_q.b_o.fill_(-1e4)  # exp underflows: the completion carries no mass
    selected = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k=10)
    o, lse = _decode(p, selected)
    o_off, lse_off = _decode(p, selected, completion=torch.zeros(p.q.shape[1], dtype=torch.bool))
    torch.testing.assert_close(o, o_off, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_off, rtol=1e-12, atol=1e-12)


def test_completion_off_attends_exactly_the_anchors_and_the_retrieved_keys():
    p = make_problem(batch=1)
    selected = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k=10)
    o, lse = _decode(p, selected, completion=torch.zeros(p.q.shape[1], dtype=torch.bool))
    attend = ref.selection_mask(selected, p.q.shape[1], p.mid_start, p.mid_end, p.k.shape[2])
    anchors = torch.zeros_like(attend)
    anchors[:, :, p.starts[0]:p.mid_start[0]] = True
    anchors[:, :, p.mid_end[0]:p.ends[0]] = True
    o_exact, lse_exact = ref.exact_state(p.q, p.k, p.v, p.scale, attend | anchors, F64)
    torch.testing.assert_close(o, o_exact)
    torch.testing.assert_close(lse, lse_exact)


def test_subtraction_equals_a_summary_built_without_the_retrieved_keys():
    p = make_problem(n_q_heads=4, n_kv_heads=4)
    selected = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k=12)
    retrieved = ref.selection_mask(selected, 4, p.mid_start, p.mid_end, p.k.shape[2])
    summary = p.summary()
    u_r, t_r = ref.subtract_retrieved(summary, p.v, p.log_phi()[1], retrieved)
    direct = ref.build_summary(p.v, p.log_phi()[1], p.mid_start, p.mid_end, ~retrieved, F64)
    rescale = torch.exp(direct.m - summary.m)  # the direct summary has its own max shift
    torch.testing.assert_close(u_r, direct.u * rescale)
    torch.testing.assert_close(t_r, direct.t * rescale[..., None])


def test_summary_weights_are_max_shifted_to_at_most_one():
    p = make_problem()
    summary = p.summary()
    assert torch.all(summary.u >= 1 - 1e-12)  # the max key contributes exactly 1
    n_mid = (p.mid_end - p.mid_start).to(F64)
    assert torch.all(summary.u <= n_mid[:, None, None])


def test_completion_state_estimates_the_unretrieved_mid_keys_with_many_features():
    p = make_problem(batch=1, n_q_heads=2, n_kv_heads=1, head_dim=8, d_phi=20_000, n_keys=64)
    p.q, p.k = p.q * 0.5, p.k * 0.5  # moderate logits: random features converge quickly
    log_phi_q, log_phi_k = p.log_phi()
    summary = p.summary()
    y, log_z = ref.completion_state(log_phi_q.to(F64), summary.m.expand(1, 2, -1),
                                    summary.u.expand(1, 2, -1), summary.t.expand(1, 2, -1, -1))
    mid = ref.positions_in(p.mid_start, p.mid_end, 64)[:, None, :].expand(1, 2, -1)
    o_mid, lse_mid = ref.exact_state(p.q, p.k, p.v, p.scale, mid, F64)
    torch.testing.assert_close(log_z, lse_mid, rtol=0, atol=0.05)
    torch.testing.assert_close(y, o_mid, rtol=0, atol=0.02)


def test_keys_outside_each_rows_range_do_not_matter():
    p = make_problem(lengths=[60, 41])
    selected = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k=8)
    o, lse = _decode(p, selected)
    outside = ~ref.positions_in(p.starts, p.ends, p.k.shape[2])[:, None, :, None]
    p.k = torch.where(outside, 1e3, p.k)
    p.v = torch.where(outside, -1e3, p.v)
    o2, lse2 = _decode(p, selected)
    torch.testing.assert_close(o, o2)
    torch.testing.assert_close(lse, lse2)


def test_short_prompts_have_an_empty_mid_region_and_stay_exact():
    p = make_problem(lengths=[10, 3], n_sink=4, n_tail=8)
    assert torch.all(p.mid_end == p.mid_start)
    summary = p.summary()
    assert torch.all(summary.m == float("-inf")) and torch.all(summary.u == 0)
    o, lse = _decode(p, torch.zeros(2, 2, 4, dtype=torch.int32))
    o_exact, lse_exact = _exact(p)
    torch.testing.assert_close(o, o_exact)
    torch.testing.assert_close(lse, lse_exact)


def test_a_row_without_keys_gets_the_empty_state():
    p = make_problem(batch=1, lengths=[0], n_generated=0)
    o, lse = _decode(p, torch.zeros(1, 2, 4, dtype=torch.int32))
    assert torch.all(o == 0) and torch.all(lse == float("-inf"))


def test_page_bounds_bound_every_mid_key_score():
    p = make_problem(lengths=[70, 55])
    page_size = 8
    bounds = ref.build_page_bounds(p.k, p.mid_start, p.mid_end, page_size)
    scores = ref.page_scores(p.q, bounds, p.mid_start, p.mid_end, page_size, p.scale)
    exact = torch.einsum("bhgd,bhnd->bhgn", p.q.view(2, 2, 2, -1), p.k).reshape(2, 4, -1)
    mid = ref.positions_in(p.mid_start, p.mid_end, p.k.shape[2])[:, None, :]
    exact = (exact * p.scale).masked_fill(~mid, float("-inf"))
    best_per_page = exact.view(2, 4, -1, page_size).amax(-1)
    assert torch.all(best_per_page <= scores + 1e-5)
    assert torch.equal(torch.isinf(best_per_page), torch.isinf(scores))


def test_page_selection_prefers_valid_pages_and_returns_sorted_distinct_indices():
    p = make_problem(lengths=[70, 30])
    page_size = 8
    bounds = ref.build_page_bounds(p.k, p.mid_start, p.mid_end, page_size)
    scores = ref.page_scores(p.q, bounds, p.mid_start, p.mid_end, page_size, p.scale)
    pages = ref.select_pages(scores, n_kv_heads=2, n_selected=3)
    assert pages.shape == (2, 2, 3) and pages.dtype == torch.int32
    assert torch.all(pages[..., 1:] > pages[..., :-1])
    chosen = torch.gather(scores.view(2, 2, 2, -1).amax(2), 2, pages.long())
    assert torch.all(torch.isfinite(chosen))


def test_selecting_every_page_gives_exact_attention():
    p = make_problem(lengths=[70, 41])
    page_size = 8
    bounds = ref.build_page_bounds(p.k, p.mid_start, p.mid_end, page_size)
    scores = ref.page_scores(p.q, bounds, p.mid_start, p.mid_end, page_size, p.scale)
    pages = ref.select_pages(scores, 2, n_selected=p.k.shape[2] // page_size)
    o, lse = _decode(p, ref.pages_to_tokens(pages, page_size))
    o_exact, lse_exact = _exact(p)
    torch.testing.assert_close(o, o_exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_exact, rtol=1e-5, atol=1e-5)


def test_exact_topk_per_query_head_returns_the_highest_scoring_mid_keys():
    p = make_problem(batch=1)
    top = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k=5, per_kv_head=False)
    scores = torch.einsum("bhgd,bhnd->bhgn", p.q.view(1, 2, 2, -1), p.k).reshape(1, 4, -1)
    mid = ref.positions_in(p.mid_start, p.mid_end, p.k.shape[2])[:, None, :]
    expected = scores.masked_fill(~mid, float("-inf")).topk(5, dim=-1).indices.sort(-1).values
    assert torch.equal(top.long(), expected)


def test_exact_topk_per_kv_head_keeps_every_heads_best_key():
    p = make_problem(batch=1)
    top = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k=4, per_kv_head=True)
    best = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k=1, per_kv_head=False)
    for h in range(4):
        assert best[0, h, 0] in top[0, h // 2]
