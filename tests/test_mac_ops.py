"""torch.ops.macopt.mac_match + mac_decode_matched / mac_prefill: registration, the per-site
ring they keep, the device counters, and the capacity rule.

opcheck calls an op several times on the same inputs and compares the results. The ops keep
hidden state (the site's ring), so it can only check a decode step whose output does not depend
on that state: tau = 1.0 (nothing matches: every step is exactly full attention) and a prefill
(its output is a copy of the attention). What the state does is tested below directly.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import macopt  # noqa: F401  (registers torch.ops.macopt.*)
from macopt import mac_state, state
from macopt.kernels import mac_counters, mac_reference
from macopt.kernels.reference import attention
from macopt.mac_ops import MACParams

ops = torch.ops.macopt
_SITE_IDS = itertools.count(10_000)  # far from the ids models get
SCALE = 64**-0.5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, HQ, HKV, N, D, M, S = 2, 4, 2, 24, 64, 8, 4


def _problem(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Row 0 holds keys [0, 20), row 1 is left-padded by 3: [3, 20); prompt of 12 tokens."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, N, D, generator=gen).to(dtype)
    return {
        "q": q, "q_pre": (q + 0.01 * torch.randn(q.shape, generator=gen)).to(dtype),
        "k": torch.randn(B, HKV, N, D, generator=gen).to(dtype),
        "v": torch.randn(B, HKV, N, D, generator=gen).to(dtype),
        "starts": torch.tensor([0, 3], dtype=torch.int32),
    }


def _prefill(p: dict, site: int, n: int = 12, capacity: int = 0) -> torch.Tensor:
    ends = torch.full((B,), n, dtype=torch.int32)
    out = torch.zeros(B, HQ, n, D, dtype=p["q"].dtype)
    return ops.mac_prefill(out, p["q"][:, :, :n], p["q_pre"][:, :, :n], p["k"], p["v"],
                           p["starts"], ends, SCALE, site, M, S, 0, capacity)


def _decode(p: dict, site: int, t: int, tau: float, capacity: int = 0) -> torch.Tensor:
    """One decode step as the ``mac`` rewrite inserts it: ``mac_match``, then
    ``mac_decode_matched`` on its candidates."""
    positions = torch.full((B,), t, dtype=torch.int32)
    q, q_pre = p["q"][:, :, t], p["q_pre"][:, :, t]
    found = ops.mac_match(q_pre, positions, p["starts"], site, M, 0, 16, capacity)
    return ops.mac_decode_matched(q, q_pre, p["k"], p["v"], positions, p["starts"], *found,
                                  None, None, SCALE, site, M, S, 0, tau, 0, 16, capacity)


def test_match_and_decode_matched_pass_opcheck_when_nothing_matches():
    p, site = _problem(), next(_SITE_IDS)
    _prefill(p, site)
    positions = torch.full((B,), 12, dtype=torch.int32)
    q_pre = p["q_pre"][:, :, 12]
    match_args = (q_pre, positions, p["starts"], site, M, 0, 16, 0)
    torch.library.opcheck(ops.mac_match, match_args)  # reads the ring, writes nothing
    found = ops.mac_match(*match_args)
    torch.library.opcheck(ops.mac_decode_matched,
                          (p["q"][:, :, 12], q_pre, p["k"], p["v"], positions, p["starts"],
                           *found, None, None, SCALE, site, M, S, 0, 1.0, 0, 16, 0))


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("tau, hits", [(0.0, True), (1.0, False)])
def test_the_step_in_two_ops_equals_the_kernel_step_with_its_own_match(tau, hits, kernels,
                                                                      monkeypatch):
    # The two ops against the kernel's whole step (its own match) on a copy of the site's ring
    # and counters. tau 0: every head finds a near entry (hits, chained); tau 1: nothing
    # matches. On CPU "triton" is the interpreter (no side stream there: macopt.side_stream is
    # CUDA only; tests/test_gpu_mac.py).
    monkeypatch.setenv("MACOPT_CPU_KERNELS", kernels)
    p, site = _problem(seed=5), next(_SITE_IDS)
    _prefill(p, site)
    ring, counters = state.get(site).buffers.clone(), state.get(site).counters.clone()
    step_kwargs = MACParams(M, S, 0, tau, 0, 16, 0).step_kwargs()
    for t in range(12, 20):
        positions = torch.full((B,), t, dtype=torch.int32)
        args = (p["q"][:, :, t], p["q_pre"][:, :, t], p["k"], p["v"], ring, positions,
                p["starts"], SCALE)
        if kernels == "triton":
            from macopt.kernels import mac

            want, _, _ = mac.mac_decode_step(*args, counters=counters, **step_kwargs)
        else:
            want, hit, keys_read = mac_reference.mac_decode_step(*args, **step_kwargs)
            mac_counters.count_decode_reference_(counters, hit, keys_read, positions,
                                                 p["starts"])
        torch.testing.assert_close(_decode(p, site, t, tau), want, atol=0, rtol=0)
        for mine, theirs in zip(state.get(site).buffers.tensors(), ring.tensors(), strict=True):
            assert torch.equal(mine, theirs)
    assert torch.equal(state.get(site).counters, counters)
    counted = state.get(site).counters[mac_counters.COUNTERS.index("hits")].sum()
    assert (counted > 0) == hits


def test_prefill_passes_opcheck():
    p, site = _problem(), next(_SITE_IDS)
    ends = torch.full((B,), 12, dtype=torch.int32)
    args = (torch.randn(B, HQ, 12, D), p["q"][:, :, :12], p["q_pre"][:, :, :12], p["k"], p["v"],
            p["starts"], ends, SCALE, site, M, S, 0, 0)
    torch.library.opcheck(ops.mac_prefill, args)


def test_prefill_returns_a_copy_and_writes_the_reference_entries():
    p, site = _problem(), next(_SITE_IDS)
    out = torch.randn(B, HQ, 12, D)
    copy = ops.mac_prefill(out, p["q"][:, :, :12], p["q_pre"][:, :, :12], p["k"], p["v"],
                           p["starts"], torch.full((B,), 12), SCALE, site, M, S, 0, 0)
    assert torch.equal(copy, out) and copy.data_ptr() != out.data_ptr()
    want = mac_reference.prefill_entries(p["q"][:, :, :12], p["q_pre"][:, :, :12],
                                         p["k"][:, :, :12], p["v"][:, :, :12], SCALE,
                                         p["starts"], torch.full((B,), 12), M, S)
    ring = state.get(site).buffers
    for got, expected in zip(ring.tensors(), want.tensors(), strict=True):
        torch.testing.assert_close(got, expected)


def test_a_prefill_chunk_continuing_a_sequence_writes_the_entries_of_its_positions():
    # Cache positions [10, 16) after an earlier chunk: queries there over the cached keys.
    p, site = _problem(seed=3), next(_SITE_IDS)
    ends = torch.full((B,), 16, dtype=torch.int32)
    chunk_q, chunk_pre = p["q"][:, :, 10:16], p["q_pre"][:, :, 10:16]
    ops.mac_prefill(torch.zeros(B, HQ, 6, D), chunk_q, chunk_pre, p["k"], p["v"], p["starts"],
                    ends, SCALE, site, M, S, 0, 0)
    want = mac_reference.prefill_entries(chunk_q, chunk_pre, p["k"], p["v"], SCALE,
                                         p["starts"], ends, M, S)
    ring = state.get(site).buffers
    assert sorted(ring.pos[0, 0].tolist()) == [-1, -1, 10, 11, 12, 13, 14, 15]
    for got, expected in zip(ring.tensors(), want.tensors(), strict=True):
        torch.testing.assert_close(got, expected)
    # Each entry is the state of its query over [s0, E(p)): the same as a whole-prompt prefill.
    whole = mac_reference.prefill_entries(p["q"][:, :, :16], p["q_pre"][:, :, :16],
                                          p["k"][:, :, :16], p["v"][:, :, :16], SCALE,
                                          p["starts"], ends, M, S)
    kept = ring.pos >= 0
    torch.testing.assert_close(ring.o[kept], whole.o[kept])
    torch.testing.assert_close(ring.lse[kept], whole.lse[kept])


def test_decode_with_nothing_matching_is_full_attention():
    p, site = _problem(), next(_SITE_IDS)
    _prefill(p, site)
    for t in range(12, 20):
        got = _decode(p, site, t, tau=1.0)
        want = attention(p["q"][:, :, t], p["k"], p["v"], SCALE, p["starts"],
                         torch.full((B,), t + 1))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_decode_matches_the_reference_step_on_the_same_ring():
    p, site = _problem(), next(_SITE_IDS)
    _prefill(p, site)
    ring = state.get(site).buffers.clone()
    for t in range(12, 20):
        got = _decode(p, site, t, tau=0.0)
        want, _, _ = mac_reference.mac_decode_step(
            p["q"][:, :, t], p["q_pre"][:, :, t], p["k"], p["v"], ring,
            torch.full((B,), t), p["starts"], SCALE, offset=S, tau=0.0, t_min=0, max_depth=16)
        torch.testing.assert_close(got, want)


def test_prefill_resets_every_slot_so_nothing_leaks_from_an_earlier_sequence():
    first, second, site = _problem(0), _problem(1), next(_SITE_IDS)
    _prefill(first, site)
    for t in range(12, 20):
        _decode(first, site, t, tau=0.0)
    _prefill(second, site)
    fresh = next(_SITE_IDS)
    _prefill(second, fresh)
    for mine, theirs in zip(state.get(site).buffers.tensors(),
                            state.get(fresh).buffers.tensors(), strict=True):
        assert torch.equal(mine, theirs)


def test_counters_count_steps_hits_and_keys_without_a_sync():
    p, site = _problem(), next(_SITE_IDS)
    _prefill(p, site)
    for t in range(12, 16):
        _decode(p, site, t, tau=0.0)  # permissive: the near-copies in q_pre match
    counters = dict(zip(mac_counters.COUNTERS, state.get(site).counters.tolist(), strict=True))
    assert counters["steps"] == [4] * HQ and counters["queries"] == [4 * B] * HQ
    assert counters["prefills"] == [1] * HQ
    full_keys = sum(t + 1 - 0 + t + 1 - 3 for t in range(12, 16))
    assert counters["keys_full"] == [full_keys] * HQ
    assert all(0 < h <= 4 * B for h in counters["hits"])
    assert all(k < full_keys for k in counters["keys_read"])


def test_a_prefill_chunk_shorter_than_the_ring_counts_when_it_continues_a_sequence():
    p, site = _problem(), next(_SITE_IDS)
    short = mac_counters.COUNTERS.index("short_continued_chunks")

    def chunk(first: tuple[int, int], n: int) -> list[int]:
        """Prefill row b's positions [first[b], first[b] + n); the count after it."""
        ends = torch.tensor(first, dtype=torch.int32) + n
        rows = torch.arange(B)[:, None]
        positions = torch.tensor(first)[:, None] + torch.arange(n)
        q, q_pre = (p[x][rows, :, positions].transpose(1, 2) for x in ("q", "q_pre"))
        ops.mac_prefill(torch.zeros_like(q), q, q_pre, p["k"], p["v"], p["starts"], ends,
                        SCALE, site, M, S, 0, 0)
        return state.get(site).counters[short].tolist()

    assert chunk((0, 0), 12) == [0] * HQ  # the ring's size or more: it fills every slot
    assert chunk((0, 3), 4) == [0] * HQ  # each row's first keys (row 1's after its padding)
    assert chunk((4, 3), 4) == [1] * HQ  # row 0 has keys before it: they lost their slots
    assert chunk((4, 7), M) == [1] * HQ  # ring-sized chunk after keys: not counted


def test_triton_counter_update_equals_the_reference():
    gen = torch.Generator().manual_seed(3)
    hit = torch.rand(5, 3, generator=gen) > 0.5
    keys = torch.randint(0, 100, (5, 3), dtype=torch.int32, generator=gen)
    t, s0 = torch.randint(50, 60, (5,), dtype=torch.int32), torch.randint(0, 9, (5,))
    got, want = (torch.randint(0, 9, (mac_counters.COUNTER_ROWS, 3)) for _ in range(2))
    want.copy_(got)
    # The Triton kernel runs on the test device; the reference update runs there too.
    hit, keys, t, s0, got, want = (x.to(DEVICE) for x in (hit, keys, t, s0, got, want))
    mac_counters.count_decode_(got, hit, keys, t, s0)
    mac_counters.count_decode_reference_(want, hit, keys, t, s0)
    assert torch.equal(got, want)


def test_rings_are_allocated_once_at_a_fixed_address_for_the_capacity():
    p, site = _problem(), next(_SITE_IDS)
    ring, _ = mac_state.ring_for(site, p["q_pre"][:1], M, capacity=2)
    address = state.get(site).buffers.q.data_ptr()
    _prefill(p, site, capacity=2)  # batch 2 fits the capacity: same buffers
    assert ring.q.data_ptr() == address == state.get(site).buffers.q.data_ptr()
    assert state.get(site).buffers.q.shape[0] == 2


def test_a_batch_beyond_the_allocated_rows_is_a_clear_error():
    p, site = _problem(), next(_SITE_IDS)
    mac_state.ring_for(site, p["q_pre"][:1], M, capacity=0)  # first use: batch 1
    with pytest.raises(ValueError, match="batch_capacity=2"):
        _prefill(p, site)


def test_decode_rejects_a_pre_rope_query_of_another_shape():
    p, site = _problem(), next(_SITE_IDS)
    positions = torch.full((B,), 12, dtype=torch.int32)
    found = ops.mac_match(p["q_pre"][:, :, 12], positions, p["starts"], site, M, 0, 16, 0)
    with pytest.raises(ValueError, match="q_pre"):
        ops.mac_decode_matched(p["q"][:, :, 12], p["q_pre"][:, :2, 12], p["k"], p["v"],
                               positions, p["starts"], *found, None, None, SCALE, site, M, S,
                               0, 1.0, 0, 16, 0)


def test_decode_compiles_with_inductor_and_keeps_state():
    p, site = _problem(), next(_SITE_IDS)
    _prefill(p, site)

    @torch.compile(fullgraph=True)
    def step(q, q_pre, k, v, positions, starts):
        found = ops.mac_match(q_pre, positions, starts, site, M, 0, 16, 0)
        return ops.mac_decode_matched(q, q_pre, k, v, positions, starts, *found, None, None,
                                      SCALE, site, M, S, 0, 1.0, 0, 16, 0) * 1.0

    positions = torch.full((B,), 12, dtype=torch.int32)
    got = step(p["q"][:, :, 12], p["q_pre"][:, :, 12], p["k"], p["v"], positions, p["starts"])
    want = attention(p["q"][:, :, 12], p["k"], p["v"], SCALE, p["starts"], positions + 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert state.get(site).counters[mac_counters.COUNTERS.index("steps")].tolist() == [1] * HQ
