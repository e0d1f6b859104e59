"""MAC-Attention reference: the invariants of docs/ALGORITHMS.md section 1, checked in fp64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from macopt.kernels import reference
from macopt.kernels.mac_reference import (
    MACRing,
    MatchCandidates,
    decide,
    mac_decode_step,
    match,
    nearest_entries,
    prefill_entries,
    prefix_end,
)

F64 = torch.float64


def _cache(batch, q_heads, kv_heads, n_keys, head_dim, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, kv_heads, n_keys, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, kv_heads, n_keys, head_dim, generator=gen, dtype=dtype)
    return q, k, v


def _exact(q, k, v, scale, s0, t):
    return reference.attention(q, k, v, scale, s0, t + 1, compute_dtype=F64)


def _step(q, q_pre, k, v, ring, t, s0, scale, **params):
    defaults = dict(offset=4, sinks=0, tau=0.45, t_min=0, max_depth=8)
    return mac_decode_step(q, q_pre, k, v, ring, t, s0, scale, compute_dtype=F64,
                           out_dtype=F64, **{**defaults, **params})


problems = st.fixed_dictionaries({
    "batch": st.integers(1, 3),
    "kv_heads": st.integers(1, 2),
    "group": st.sampled_from([1, 2, 4]),
    "n_keys": st.integers(8, 40),
    "offset": st.integers(1, 12),
    "sinks": st.integers(0, 4),
    "seed": st.integers(0, 2**16),
})


def _rows(batch, n_keys, seed):
    """Per-row key start (left padding) and decode position, rows of different lengths."""
    gen = torch.Generator().manual_seed(seed + 1)
    s0 = torch.randint(0, n_keys // 2, (batch,), generator=gen)
    t = s0 + (torch.rand(batch, generator=gen) * (n_keys - s0)).long().clamp(max=n_keys - 1 - s0)
    return s0, t


@given(problems)
def test_a_miss_is_full_attention(p):
    head_dim, q_heads = 8, p["kv_heads"] * p["group"]
    q, k, v = _cache(p["batch"], q_heads, p["kv_heads"], p["n_keys"], head_dim, p["seed"])
    s0, t = _rows(p["batch"], p["n_keys"], p["seed"])
    ring = MACRing.empty(p["batch"], q_heads, 6, head_dim, F64)
    ring.pos.copy_((t[:, None, None] - 1 - torch.arange(6)).clamp(min=-1).to(torch.int32))
    ring.lse.zero_()  # valid, finite, and identical to q: only tau can refuse the match
    ring.q.copy_(q[:, :, None].expand_as(ring.q))
    o, hit, keys = _step(q, q, k, v, ring, t, s0, 0.3, offset=p["offset"], sinks=p["sinks"],
                         tau=1.0)  # radius 0: nothing matches
    assert not hit.any()
    torch.testing.assert_close(o, _exact(q, k, v, 0.3, s0, t), rtol=1e-12, atol=1e-12)
    assert torch.equal(keys, (t + 1 - s0)[:, None].expand_as(keys).to(torch.int32))


@given(problems)
def test_a_hit_on_an_identical_query_at_the_same_position_is_exact(p):
    head_dim, q_heads, offset, sinks = 8, p["kv_heads"] * p["group"], p["offset"], p["sinks"]
    q, k, v = _cache(p["batch"], q_heads, p["kv_heads"], p["n_keys"], head_dim, p["seed"])
    s0 = torch.zeros(p["batch"], dtype=torch.long)
    t = torch.full((p["batch"],), p["n_keys"] - 1)
    j = t - 1 - torch.arange(p["batch"]) % 3  # the entry being reused, per row
    first = s0 + sinks
    o_j, lse_j = reference.attention_state(q, k, v, 0.3, first, prefix_end(j, s0, offset),
                                           compute_dtype=F64)
    ring = MACRing.empty(p["batch"], q_heads, 8, head_dim, F64)
    rows = torch.arange(p["batch"])
    ring.q[rows, :, j % 8] = q
    ring.o[rows, :, j % 8] = o_j.float()
    ring.lse[rows, :, j % 8] = lse_j.float()
    ring.pos[rows, :, j % 8] = j.to(torch.int32)[:, None]
    hit_expected = (lse_j > float("-inf"))  # an empty entry is never reused
    o, hit, keys = _step(q, q, k, v, ring, t, s0, 0.3, offset=offset, sinks=sinks)
    assert torch.equal(hit, hit_expected)
    torch.testing.assert_close(o, _exact(q, k, v, 0.3, s0, t), rtol=1e-6, atol=1e-6)
    e_t, e_j = prefix_end(t, s0, offset), prefix_end(j, s0, offset)
    band = e_t - torch.maximum(e_j, first)
    on_hit = band + (t + 1 - e_t) + torch.minimum(first, e_t) - s0
    expected_keys = torch.where(hit, on_hit[:, None], (t + 1 - s0)[:, None])
    assert torch.equal(keys, expected_keys.to(torch.int32))


@given(problems, st.integers(1, 12), st.integers(1, 12))
def test_prefill_entries_are_the_prefix_states_of_the_last_positions(p, ring_size, chunk):
    # A prompt chunk: row b's queries sit at cache positions [ends[b] - N, ends[b]), keys are
    # the whole cache (a whole prompt is the chunk with N = ends).
    head_dim, q_heads, n = 8, p["kv_heads"] * p["group"], p["n_keys"]
    offset, sinks = p["offset"], p["sinks"]
    gen = torch.Generator().manual_seed(p["seed"])
    _, k, v = _cache(p["batch"], q_heads, p["kv_heads"], n, head_dim, p["seed"])
    s0, t = _rows(p["batch"], n, p["seed"])
    ends = t + 1
    n_chunk = min(chunk, int(ends.min()))
    q_post = torch.randn(p["batch"], q_heads, n_chunk, head_dim, generator=gen, dtype=F64)
    q_pre = torch.randn(p["batch"], q_heads, n_chunk, head_dim, generator=gen, dtype=F64)
    ring = prefill_entries(q_post, q_pre, k, v, 0.3, s0, ends, ring_size, offset, sinks, F64)
    for b in range(p["batch"]):
        first = int(ends[b]) - n_chunk
        for slot in range(ring_size):
            positions = [x for x in range(max(ends[b] - ring_size, s0[b], first), ends[b])
                         if x % ring_size == slot]
            if not positions:
                assert (ring.pos[b, :, slot] == -1).all()
                assert (ring.lse[b, :, slot] == float("-inf")).all()
                continue
            (x,) = positions
            o, lse = reference.attention_state(
                q_post[b:b + 1, :, x - first], k[b:b + 1], v[b:b + 1], 0.3,
                s0[b:b + 1] + sinks, prefix_end(torch.tensor([x]), s0[b:b + 1], offset),
                compute_dtype=F64)
            assert (ring.pos[b, :, slot] == x).all() and (ring.depth[b, :, slot] == 0).all()
            assert torch.equal(ring.q[b, :, slot], q_pre[b, :, x - first])
            torch.testing.assert_close(ring.o[b, :, slot], o[0].float())
            torch.testing.assert_close(ring.lse[b, :, slot], lse[0].float())


def _decode_run(n_prompt, steps, drift, max_depth, tau, seed=0, group=2, offset=4, sinks=0,
                ring_size=8):
    """Prefill then decode ``steps`` tokens whose pre-RoPE queries drift by ``drift`` a step."""
    head_dim, kv_heads, n = 8, 2, n_prompt + steps
    q_heads = kv_heads * group
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1, q_heads, 1, head_dim, generator=gen, dtype=F64)
    q_pre = base + drift * torch.arange(n, dtype=F64)[None, None, :, None]
    q_post = torch.randn(1, q_heads, n, head_dim, generator=gen, dtype=F64)
    _, k, v = _cache(1, q_heads, kv_heads, n, head_dim, seed + 1)
    s0 = torch.zeros(1, dtype=torch.long)
    ring = prefill_entries(q_post[:, :, :n_prompt], q_pre[:, :, :n_prompt], k[:, :, :n_prompt],
                           v[:, :, :n_prompt], 0.3, s0, torch.tensor([n_prompt]), ring_size,
                           offset, sinks, F64)
    for t in range(n_prompt, n):
        pos = torch.tensor([t])
        o, hit, _ = _step(q_post[:, :, t], q_pre[:, :, t], k, v, ring, pos, s0, 0.3,
                          offset=offset, sinks=sinks, tau=tau, max_depth=max_depth)
        yield t, o, hit, ring, _exact(q_post[:, :, t], k, v, 0.3, s0, pos)


def test_a_zero_radius_decodes_exactly_step_after_step():
    # tau = 1 makes the radius 2 D (1 - tau)^2 zero: even identical queries do not match.
    for _, o, hit, _, exact in _decode_run(20, 12, drift=0.0, max_depth=8, tau=1.0):
        assert not hit.any()
        torch.testing.assert_close(o, exact, rtol=1e-12, atol=1e-12)


def test_chained_hits_stop_at_max_depth_and_the_refresh_is_exact():
    # Queries drift, so the nearest entry is always the previous position: each hit builds on
    # the last one, until the entry is max_depth deep and the step recomputes exactly.
    hits, depths = [], []
    for t, o, hit, ring, exact in _decode_run(20, 9, drift=1e-3, max_depth=2, tau=0.5):
        assert hit.all() or not hit.any()
        hits.append(bool(hit.all()))
        depths.append(int(ring.depth[0, 0, t % ring.size]))
        assert (ring.depth[0, :, t % ring.size] == depths[-1]).all()
        if not hit.any():
            torch.testing.assert_close(o, exact, rtol=1e-12, atol=1e-12)
    assert hits == [True, True, False] * 3
    assert depths == [1, 2, 0] * 3


def test_max_depth_zero_never_reuses():
    assert not any(hit.any() for _, _, hit, _, _ in _decode_run(20, 4, 1e-3, 0, tau=0.5))


def _one_entry_ring(q_pre, t, entry_pos, ring_size=8, lse=0.0, depth=0):
    batch, q_heads, head_dim = q_pre.shape
    ring = MACRing.empty(batch, q_heads, ring_size, head_dim, q_pre.dtype)
    for x in entry_pos:
        ring.q[:, :, x % ring_size] = q_pre
        ring.pos[:, :, x % ring_size] = x
        ring.lse[:, :, x % ring_size] = lse
        ring.depth[:, :, x % ring_size] = depth
    return ring


@pytest.mark.parametrize("entry, ring_size, s0, hits", [
    (15, 4, 4, True),  # t - 1
    (12, 4, 4, True),  # t - M: in the slot this step overwrites, read before it is written
    (11, 4, 4, False),  # older than the ring window
    (16, 4, 4, False),  # the current position is not an entry yet
    (10, 8, 10, True),  # the row's first key
    (9, 8, 10, False),  # before the row's key start
])
def test_only_entries_in_the_window_match(entry, ring_size, s0, hits):
    q, k, v = _cache(1, 2, 1, 20, 8, 0)
    ring = _one_entry_ring(q, 16, [entry], ring_size=ring_size)
    _, hit, _ = _step(q, q, k, v, ring, torch.tensor([16]), torch.tensor([s0]), 0.3, offset=1)
    assert bool(hit.all()) == hits


def test_ties_go_to_the_older_entry():
    q, k, v = _cache(1, 2, 1, 20, 8, 0)
    ring = _one_entry_ring(q, 16, [13, 15], lse=0.0)
    ring.lse[:, :, 13 % 8] = 1.0  # tell the two equidistant entries apart by their state
    ring.o[:, :, 13 % 8] = 1.0
    o, hit, keys = _step(q, q, k, v, ring, torch.tensor([16]), torch.tensor([0]), 0.3, offset=4)
    assert hit.all() and (keys == 16 - 13 + 4).all()  # band t - j* = 3, tail S = 4


@pytest.mark.parametrize("what", ["t_min", "empty_entry", "deep_entry"])
def test_ineligible_nearest_entry_is_a_miss(what):
    q, k, v = _cache(1, 2, 1, 20, 8, 0)
    ring = _one_entry_ring(q, 16, [15], lse=float("-inf") if what == "empty_entry" else 0.0,
                           depth=3 if what == "deep_entry" else 0)
    t, s0 = torch.tensor([16]), torch.tensor([2])
    params = dict(t_min=15 if what == "t_min" else 14, max_depth=3)  # t - s0 = 14
    o, hit, _ = _step(q, q, k, v, ring, t, s0, 0.3, **params)
    assert not hit.any()
    torch.testing.assert_close(o, _exact(q, k, v, 0.3, s0, t), rtol=1e-12, atol=1e-12)


def test_the_step_writes_its_entry_into_slot_t_mod_m():
    q, k, v = _cache(2, 4, 2, 30, 8, 0)
    q_pre = torch.randn(2, 4, 8, dtype=F64)
    ring = MACRing.empty(2, 4, 8, 8, F64)
    t, s0 = torch.tensor([20, 27]), torch.tensor([0, 5])
    _step(q, q_pre, k, v, ring, t, s0, 0.3, offset=4, sinks=2)
    for b in range(2):
        slot = int(t[b]) % 8
        assert torch.equal(ring.q[b, :, slot], q_pre[b])
        assert (ring.pos[b, :, slot] == t[b]).all() and (ring.depth[b, :, slot] == 0).all()
        o, lse = reference.attention_state(q[b:b + 1], k[b:b + 1], v[b:b + 1], 0.3,
                                           s0[b:b + 1] + 2, t[b:b + 1] + 1 - 4, compute_dtype=F64)
        torch.testing.assert_close(ring.o[b, :, slot], o[0].float())
        torch.testing.assert_close(ring.lse[b, :, slot], lse[0].float())
        assert (ring.pos[b, :, torch.arange(8) != slot] == -1).all()


@given(st.integers(1, 4), st.integers(0, 2**16))
def test_the_decision_is_the_same_from_any_split_of_the_ring_into_parts(parts, seed):
    # Small integer queries make equal distances (ties) common; some entries are empty, deep
    # or outside the window. Part r sees only its slots (the others marked empty).
    gen = torch.Generator().manual_seed(seed)
    batch, heads, ring_size, head_dim = 2, 3, 8, 4
    ring = MACRing.empty(batch, heads, ring_size, head_dim, F64)
    ring.q.copy_(torch.randint(-1, 2, ring.q.shape, generator=gen).to(F64))
    ring.pos.copy_(torch.randint(-1, 14, ring.pos.shape, generator=gen).to(torch.int32))
    ring.lse.copy_(torch.where(torch.rand(ring.lse.shape, generator=gen) < 0.2, float("-inf"), 0.0))
    ring.depth.copy_(torch.randint(0, 4, ring.depth.shape, generator=gen).to(torch.int32))
    q_pre = torch.randint(-1, 2, (batch, heads, head_dim), generator=gen).to(F64)
    t, s0 = torch.tensor([12, 13]), torch.tensor([0, 6])
    split = []
    for part in torch.arange(ring_size).tensor_split(parts):
        mine = ring.clone()
        others = torch.ones(ring_size, dtype=torch.bool)
        others[part] = False
        mine.pos[:, :, others] = -1
        split.append(nearest_entries(q_pre, mine, t, s0, max_depth=3))
    candidates = MatchCandidates(*(torch.cat(x, dim=-1) for x in zip(*split, strict=True)))
    params = dict(offset=4, sinks=1, tau=0.5, t_min=0)
    got = decide(candidates, t, s0, ring_size=ring_size, head_dim=head_dim, **params)
    want = match(q_pre, ring, t, s0, max_depth=3, **params)
    assert torch.equal(got.hit, want.hit)
    assert torch.equal(got.start, want.start)
    assert torch.equal(got.slot[got.hit], want.slot[want.hit])
