"""The kernel pieces MAC + Top-K + phi adds (Triton; on CPU through the interpreter): MAC's
match on its own with the all-hit group flags, and Top-K + phi launches that skip groups."""

from __future__ import annotations

import pytest
import topk_phi_cases
import torch

from macopt.kernels import mac, page_select, topk_phi
from macopt.kernels import topk_phi_reference as ref
from macopt.kernels.mac_reference import MACRing, match, threshold

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _ring_case(seed: int, batch=3, kv_heads=2, group=4, ring_size=16, head_dim=64):
    """Integer pre-RoPE queries (exact distances). Every head's query copies a ring entry
    (a hit at any radius) but for head 1 of row 0 and the second group of row 1 (misses at a
    radius below 1, the smallest nonzero distance): rows 0 and 1 mix hits and misses."""
    gen = torch.Generator().manual_seed(seed)
    q_heads = kv_heads * group
    t, s0 = torch.tensor([40, 33, 70]), torch.tensor([0, 5, 9])
    ring = MACRing.empty(batch, q_heads, ring_size, head_dim, torch.float32)
    oldest = (t - ring_size)[:, None]
    window = oldest + (torch.arange(ring_size) - oldest) % ring_size  # slot j: p = j mod M
    ring.pos.copy_(window[:, None].expand(-1, q_heads, -1))
    ring.q.copy_(torch.randint(-1, 2, ring.q.shape, generator=gen).float())
    ring.lse.copy_(torch.randn(ring.lse.shape, generator=gen))
    ring.depth.zero_()
    slots = torch.randint(0, ring_size, (batch, q_heads, 1, 1), generator=gen)
    q_pre = ring.q.gather(2, slots.expand(-1, -1, 1, head_dim))[:, :, 0].clone()
    q_pre[0, 1, 0] += 3.0
    q_pre[1, group:, 0] += 3.0
    return q_pre, ring, t, s0


@pytest.mark.parametrize("seed", [0, 1])
def test_all_hit_groups_are_the_groups_whose_heads_the_reference_match_hits(seed):
    q_pre, ring, t, s0 = _ring_case(seed)
    params = dict(offset=8, sinks=0, tau=0.95, t_min=0, max_depth=2)
    want = match(q_pre, ring, t, s0, **params).hit.view(3, 2, 4).all(-1)
    assert want.tolist() == [[False, True], [True, False], [True, True]]
    on = lambda x: x.to(DEVICE)  # noqa: E731
    ring_on = MACRing(*map(on, ring.tensors()))
    found = mac.match_candidates(on(q_pre), ring_on, on(t), on(s0), t_min=0, max_depth=2)
    got = mac.all_hit_groups(found, on(t), on(s0), 2, ring_size=16, offset=8, tau=0.95,
                             t_min=0, head_dim=64)
    assert torch.equal(got.cpu().bool(), want)
    assert threshold(64, 0.95) < 1  # only copies (distance 0) hit


def test_a_step_given_its_own_match_candidates_equals_the_plain_step():
    q_pre, ring, t, s0 = _ring_case(3)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(q_pre.shape, generator=gen)
    k, v = (torch.randn(3, 2, 80, 64, generator=gen) for _ in range(2))
    args = [x.to(DEVICE) for x in (q, q_pre, k, v)]
    params = dict(offset=8, tau=0.95, t_min=0, max_depth=2)
    plain_ring, given_ring = (MACRing(*(x.to(DEVICE) for x in ring.clone().tensors()))
                              for _ in range(2))
    t, s0 = t.to(DEVICE), s0.to(DEVICE)
    plain = mac.mac_decode_step(*args, plain_ring, t, s0, 0.125, **params)
    found = mac.match_candidates(args[1], given_ring, t, s0, t_min=0, max_depth=2)
    assert plain[1].any() and not plain[1].all()
    given = mac.mac_decode_step(*args, given_ring, t, s0, 0.125, candidates=found, **params)
    for a, b in zip(plain, given, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(plain_ring.tensors(), given_ring.tensors(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("separate_share", [False, True])
def test_a_skipped_group_gets_the_empty_state_and_the_others_are_unchanged(separate_share):
    p = topk_phi_cases.make_problem(batch=2, n_q_heads=8, n_kv_heads=2, n_keys=160,
                                    head_dim=64, d_phi=16, device=DEVICE)
    log_phi_q, _ = p.log_phi()
    summary = topk_phi.build_summary(p.k, p.v, p.maps.phi_k.folded(), p.mid_start, p.mid_end)
    bounds = topk_phi.build_page_bounds(p.k, p.mid_start, p.mid_end, 16)
    skip = torch.tensor([[1, 0], [0, 1]], dtype=torch.uint8, device=DEVICE)
    kept = ~skip.bool().repeat_interleave(4, dim=1)
    selected = topk_phi.select_pages(p.q, bounds, p.mid_start, p.mid_end, 16, p.scale, 3)
    selected_skip = topk_phi.select_pages(p.q, bounds, p.mid_start, p.mid_end, 16, p.scale, 3,
                                          skip=skip)
    assert torch.equal(selected_skip[~skip.bool()], selected[~skip.bool()])
    assert (selected_skip[skip.bool()] == -1).all()
    args = (p.q, p.k, p.v, p.scale, p.starts, p.ends, summary)
    o, lse = topk_phi.topk_phi_decode_state(*args, selected, log_phi_q, p.maps.phi_k.folded(),
                                            separate_share=separate_share)
    o_skip, lse_skip = topk_phi.topk_phi_decode_state(*args, selected_skip, log_phi_q,
                                                      p.maps.phi_k.folded(), skip=skip,
                                                      separate_share=separate_share)
    assert torch.equal(o_skip[kept], o[kept]) and torch.equal(lse_skip[kept], lse[kept])
    assert (o_skip[~kept] == 0).all() and (lse_skip[~kept] == float("-inf")).all()


def test_page_tokens_of_skipped_groups_are_minus_one():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 4, 9, generator=gen).to(DEVICE)
    skip = torch.tensor([[0, 1], [1, 0]], dtype=torch.bool, device=DEVICE)
    plain = page_select.select_page_tokens(scores, 2, 3, 8)
    skipped = page_select.select_page_tokens(scores, 2, 3, 8, skip=skip)
    assert torch.equal(skipped[~skip], plain[~skip]) and (skipped[skip] == -1).all()
    assert torch.equal(plain.cpu(), ref.pages_to_tokens(ref.select_pages(scores.cpu(), 2, 3), 8))


def test_a_badly_shaped_skip_flag_is_refused():
    p = topk_phi_cases.make_problem(head_dim=64, device=DEVICE)
    bounds = topk_phi.build_page_bounds(p.k, p.mid_start, p.mid_end, 16)
    with pytest.raises(ValueError, match="skip: expected"):
        topk_phi.page_scores(p.q, bounds, p.mid_start, p.mid_end, 16, p.scale,
                             skip=torch.zeros(3, dtype=torch.uint8, device=DEVICE))
