"""The "channel" selector (the default before the sketch selector): approximate scores over the
group's largest query channels, then an exact re-rank. It must keep what exact Top-K keeps where
that is knowable."""

import math

import pytest
import torch

from macopt.config import TopKPhiConfig
from macopt.kernels import topk_phi_reference as ref
from macopt.topk_phi_select import channel_selection, exact_selection, parse_selector


def _case(seed=0, batch=2, n_kv=2, group=3, n_keys=300, dim=32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_kv * group, dim, generator=gen)
    k = torch.randn(batch, n_kv, n_keys, dim, generator=gen)
    mid_start = torch.tensor([4, 10])[:batch]
    mid_end = torch.tensor([n_keys - 16, n_keys - 40])[:batch]
    return q, k, dim ** -0.5, mid_start, mid_end


def _as_sets(tokens, mid_start, mid_end):
    out = []
    for b in range(tokens.shape[0]):
        lo, hi = int(mid_start[b]), int(mid_end[b])
        out.append([{t for t in row.tolist() if lo <= t < hi} for row in tokens[b]])
    return out


def test_default_config_uses_the_sketch_selector_and_the_others_stay_selectable():
    config = TopKPhiConfig()
    assert config.selector == "sketch" and config.selector_spec() == "sketch:0:2"
    assert TopKPhiConfig(selector="exact").selector_spec() == "exact"
    assert TopKPhiConfig(selector="channel").selector_spec() == "channel:0:2"
    assert TopKPhiConfig(selector="sketch", channels=8, rerank=3).selector_spec() == "sketch:8:3"
    with pytest.raises(ValueError):
        TopKPhiConfig(rerank=0)
    with pytest.raises(ValueError):
        parse_selector("page:1:2")


def test_all_channels_equal_exact_selection():
    # With every channel the approximate score is the exact one: same keys as the oracle.
    q, k, scale, lo, hi = _case()
    ours = channel_selection(q, k, scale, lo, hi, 20, channels=q.shape[-1], rerank=1)
    oracle = exact_selection(q, k, scale, lo, hi, 20)
    assert _as_sets(ours, lo, hi) == _as_sets(oracle, lo, hi)


def test_covering_budget_keeps_every_middle_key():
    q, k, scale, lo, hi = _case(seed=1)
    ours = channel_selection(q, k, scale, lo, hi, k.shape[2], channels=2, rerank=1)
    for b, rows in enumerate(_as_sets(ours, lo, hi)):
        assert all(row == set(range(int(lo[b]), int(hi[b]))) for row in rows)


def test_planted_needle_is_kept_with_few_channels():
    # A key aligned with the query on its large channels must be found from 1/4 of the dims.
    q, k, scale, lo, hi = _case(seed=2, n_keys=1024, dim=64)
    q[..., :8] *= 6.0
    needle = 500
    k[:, :, needle] = 0.8 * q.view(2, 2, 3, 64)[:, :, 0] / q.view(2, 2, 3, 64)[:, :, 0].norm(
        dim=-1, keepdim=True) * math.sqrt(64) * 2
    tokens = channel_selection(q, k, scale, lo, hi, 16)
    assert all(needle in row for rows in _as_sets(tokens, lo, hi) for row in rows)


def test_counts_limit_each_group():
    q, k, scale, lo, hi = _case(seed=3)
    counts = torch.tensor([[5, 12], [0, 12]])
    tokens = channel_selection(q, k, scale, lo, hi, 12, counts=counts)
    kept = (tokens >= 0).sum(-1)
    assert kept.tolist() == [[5, 12], [0, 12]]


def test_mass_recall_close_to_exact_on_structured_keys():
    # Keys with a few dominant channels (as real models have): 95% of exact Top-K's mass.
    gen = torch.Generator().manual_seed(4)
    q, k, scale, lo, hi = _case(seed=4, n_keys=2048, dim=64)
    weights = torch.rand(64, generator=gen) ** 4 * 4 + 0.2
    k = k * weights
    q = q * weights
    probs = torch.softmax(torch.einsum("bhgd,bhnd->bhgn", q.view(2, 2, 3, 64), k) * scale, -1)
    probs = probs.reshape(2, 6, -1)

    def mass(tokens):
        mask = ref.selection_mask(tokens, 6, lo, hi, k.shape[2])
        return (probs * mask).sum(-1)

    ours = mass(channel_selection(q, k, scale, lo, hi, 40))
    oracle = mass(exact_selection(q, k, scale, lo, hi, 40))
    assert (ours / oracle).median() >= 0.95
