"""MAC + Top-K + phi: the composed decode step and its ops (CPU references; Triton through
the interpreter at tiny sizes).

Pre-RoPE queries are small integers, so squared distances are exact in fp32 and every path
makes the same match decisions; about half of the (row, head) decode queries get a near copy
of a recent query planted, so hits and misses mix within GQA groups. Rows differ in left
padding and prompt length.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import macopt  # noqa: F401  (registers torch.ops.macopt.*)
from macopt import state
from macopt.kernels import mac_counters, mac_reference, reference
from macopt.kernels import topk_phi_reference as ref
from macopt.kernels.feature_maps import log_features
from macopt.kernels.mac_reference import MACRing
from macopt.mac_topk_phi_ops import MACTopKPhiSite, decode_step
from macopt.topk_phi_state import TopKPhiState

ops = torch.ops.macopt
_SITE_IDS = itertools.count(20_000)  # far from the ids models get
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, HKV, GROUP, N, D, M, S = 2, 2, 4, 160, 64, 16, 8
HQ = HKV * GROUP
SCALE = D**-0.5
STARTS, PROMPT_ENDS, CHUNK = (0, 13), (140, 120), 40  # row 1: left padding 13, shorter prompt
TOPK_SINKS, TOPK_TAIL, PAGE = 2, 4, 16  # the summary's tail is max(TOPK_TAIL, S) = S
RADIUS2 = 4.5  # planted near copies (squared distance 0..2) hit, random integer queries miss
TAU = 1.0 - (RADIUS2 / (2 * D)) ** 0.5


@dataclasses.dataclass
class Case:
    q: torch.Tensor  # [B, Hq, N, D] post-RoPE queries of every position
    q_pre: torch.Tensor  # [B, Hq, N, D] small integers
    k: torch.Tensor
    v: torch.Tensor
    starts: torch.Tensor
    prompt_ends: torch.Tensor

    def at(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, q_pre, positions) of decode step ``step`` (row b at prompt_ends[b] + step)."""
        t = self.prompt_ends.long() + step
        rows = torch.arange(B, device=t.device)
        return self.q[rows, :, t], self.q_pre[rows, :, t], t.to(torch.int32)


def make_case(seed: int = 0, hit_share: float = 0.5, device: str = "cpu") -> Case:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, N, D, generator=gen)
    q_pre = torch.randint(-1, 2, (B, HQ, N, D), generator=gen).float()
    k, v = (torch.randn(B, HKV, N, D, generator=gen) for _ in range(2))
    for b, end in enumerate(PROMPT_ENDS):
        for t in range(end, N):  # plant near copies of a query at most M / 2 steps back
            near = torch.rand(HQ, generator=gen) < hit_share
            for h in near.nonzero()[:, 0].tolist():
                j = t - 1 - int(torch.randint(0, M // 2, (1,), generator=gen))
                noise = torch.zeros(D)
                noise[:int(torch.randint(0, 3, (1,), generator=gen))] = 1.0
                q_pre[b, h, t] = q_pre[b, h, j] + noise
    ints = dict(dtype=torch.int32)
    return Case(*(x.to(device) for x in (q, q_pre, k, v, torch.tensor(STARTS, **ints),
                                         torch.tensor(PROMPT_ENDS, **ints))))


def _prefill(case: Case, site: int, tail: int = S, selector: str = "page", capacity: int = 0,
             seed: int = 0) -> torch.Tensor:
    """The composed prefill op over each row's last CHUNK prompt positions."""
    rows = torch.arange(B, device=case.q.device)[:, None]
    positions = case.prompt_ends.long()[:, None] - CHUNK + torch.arange(CHUNK,
                                                                         device=case.q.device)
    chunk = lambda x: x[rows, :, positions].transpose(1, 2)  # noqa: E731  [B, Hq, CHUNK, D]
    out = torch.zeros(B, HQ, CHUNK, D, device=case.q.device)
    return ops.mac_topk_phi_prefill(out, chunk(case.q), chunk(case.q_pre), case.k, case.v,
                                    case.starts, case.prompt_ends, SCALE, site, 0, M, S,
                                    capacity, TOPK_SINKS, tail, PAGE, selector == "page", 16,
                                    [True] * HQ, "", seed, selector == "sketch")


def _site(site_id: int) -> MACTopKPhiSite:
    return state.get(site_id).buffers


def _clone(site: MACTopKPhiSite) -> MACTopKPhiSite:
    topk = site.topk
    copies = {f.name: getattr(topk, f.name).clone() for f in dataclasses.fields(topk)
              if isinstance(getattr(topk, f.name), torch.Tensor)}
    return MACTopKPhiSite(site.ring.clone(), dataclasses.replace(topk, **copies))


def _step(case: Case, site: MACTopKPhiSite, step: int, tau: float = TAU, budget: int = 16,
          selector: str = "page", counters: torch.Tensor | None = None):
    q, q_pre, t = case.at(step)
    return decode_step(q, q_pre, case.k, case.v, site, t, case.starts, SCALE, offset=S, tau=tau,
                       t_min=0, max_depth=4, budget=budget, page_size=PAGE, selector=selector,
                       counters=counters)


def _prefix_end(t: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    return torch.maximum(t.long() + 1 - S, starts.long())


# --- the identities that define the method -----------------------------------------------------


@pytest.mark.parametrize("selector", ["page", "exact", "sketch"])
def test_a_budget_covering_the_middle_equals_plain_mac_whose_misses_are_exact(selector):
    case, site_id = make_case(seed=1), next(_SITE_IDS)
    _prefill(case, site_id, selector=selector)
    composed, mac_ring = _clone(_site(site_id)), _site(site_id).ring.clone()
    hits = []
    for step in range(8):
        o, hit, _ = _step(case, composed, step, budget=N, selector=selector)
        q, q_pre, t = case.at(step)
        want, want_hit, _ = mac_reference.mac_decode_step(
            q, q_pre, case.k, case.v, mac_ring, t, case.starts, SCALE, offset=S, tau=TAU,
            t_min=0, max_depth=4)
        assert torch.equal(hit, want_hit)
        torch.testing.assert_close(o, want, atol=1e-5, rtol=1e-5)
        hits.append(hit)
    hits = torch.stack(hits)
    assert hits.any() and not hits.all()


def test_nothing_matching_is_topk_phi_over_the_prefix_merged_with_the_exact_tail():
    case, site_id = make_case(seed=2), next(_SITE_IDS)
    _prefill(case, site_id, selector="exact")
    site = _site(site_id)
    summary = ref.PhiSummary(site.topk.m, site.topk.u, site.topk.t, site.topk.mid_start,
                             site.topk.mid_end)
    log_phi_k = log_features(case.k, _folded(site.topk.phi_k, site.topk.phi_k_mlp))
    for step in range(4):
        o, hit, _ = _step(case, site, step, tau=1.0, budget=6, selector="exact")
        assert not hit.any()
        q, _, t = case.at(step)
        end = _prefix_end(t, case.starts)
        selected = ref.exact_topk(q, case.k, SCALE, summary.mid_start, summary.mid_end, 6)
        log_phi_q = log_features(q, _folded(site.topk.phi_q, site.topk.phi_q_mlp))
        prefix = ref.topk_phi_decode_state(q, case.k, case.v, SCALE, case.starts, end, summary,
                                           selected, log_phi_q, log_phi_k)
        tail = reference.attention_state(q, case.k, case.v, SCALE, end, t.long() + 1)
        want, _ = reference.merge_state(*prefix, *tail)
        torch.testing.assert_close(o, want, atol=1e-5, rtol=1e-5)


def test_the_summary_ends_before_every_prefix_end():
    case, site_id = make_case(), next(_SITE_IDS)
    _prefill(case, site_id)
    topk = _site(site_id).topk
    assert torch.equal(topk.mid_end, case.prompt_ends - S)  # the tail is max(TOPK_TAIL, S)
    assert torch.equal(topk.mid_start, case.starts + TOPK_SINKS)
    _, _, t = case.at(0)
    assert (topk.mid_end < _prefix_end(t, case.starts)).all()


def test_a_miss_writes_its_topk_phi_prefix_state_to_the_ring_as_an_exact_depth_entry():
    case, site_id = make_case(seed=3), next(_SITE_IDS)
    _prefill(case, site_id)
    site = _site(site_id)
    _, hit, _ = _step(case, site, 0)
    _, _, t = case.at(0)
    slot = (t.long() % M)[:, None, None].expand(B, HQ, 1)
    depth = site.ring.depth.gather(-1, slot)[..., 0]
    assert torch.equal(depth[~hit], torch.zeros_like(depth[~hit]))
    assert (depth[hit] >= 1).all()


def test_keys_read_count_a_misses_topk_keys_and_tail():
    case, site_id = make_case(seed=4), next(_SITE_IDS)
    _prefill(case, site_id, selector="exact")
    counters = state.get(site_id).counters
    _, hit, keys = _step(case, _site(site_id), 0, tau=1.0, budget=6, selector="exact",
                         counters=counters)
    _, _, t = case.at(0)
    end = _prefix_end(t, case.starts)
    # sinks + 6 retrieved + [mid_end, E(t)) + the tail [E(t), t]
    mid_end = case.prompt_ends.long() - S
    expected = TOPK_SINKS + 6 + (end - mid_end) + (t.long() + 1 - end)
    assert torch.equal(keys.long(), expected[:, None].expand(B, HQ))
    named = dict(zip(mac_counters.COUNTERS, counters.tolist(), strict=True))
    assert named["keys_read"] == [int(expected.sum())] * HQ
    assert named["hits"] == [0] * HQ and named["steps"] == [1] * HQ


# --- Triton path (interpreted on CPU) ------------------------------------------------------------


# The page budget is GROUP pages: each head's best page has group score exactly 0, and a tie
# at the last page kept would be broken differently (the Triton selection keeps the lowest
# page, torch.topk any), so at least as many pages as heads in a group are kept.
@pytest.mark.parametrize("selector, budget", [("page", GROUP * PAGE), ("exact", 6)])
def test_the_triton_path_equals_the_reference_with_hits_and_misses_mixed_in_groups(
        monkeypatch, selector, budget):
    case, site_id = make_case(seed=5, hit_share=0.75), next(_SITE_IDS)
    _prefill(case, site_id, selector=selector)
    on_ref = _clone(_site(site_id))
    on_kernel = _clone(_site(site_id))
    on_kernel = MACTopKPhiSite(MACRing(*(x.to(DEVICE) for x in on_kernel.ring.tensors())),
                               _to(on_kernel.topk, DEVICE))
    kernel_case = dataclasses.replace(case, **{f.name: getattr(case, f.name).to(DEVICE)
                                               for f in dataclasses.fields(case)})
    mixed = all_hit = False
    for step in range(4):
        monkeypatch.setenv("MACOPT_CPU_KERNELS", "reference")
        o_ref, hit_ref, keys_ref = _step(case, on_ref, step, budget=budget, selector=selector)
        monkeypatch.setenv("MACOPT_CPU_KERNELS", "triton")
        o, hit, keys = _step(kernel_case, on_kernel, step, budget=budget, selector=selector)
        assert torch.equal(hit.cpu(), hit_ref) and torch.equal(keys.cpu(), keys_ref)
        torch.testing.assert_close(o.cpu(), o_ref, atol=1e-4, rtol=1e-4)
        groups = hit_ref.view(B, HKV, GROUP)
        mixed |= bool((groups.any(-1) & ~groups.all(-1)).any())
        all_hit |= bool(groups.all(-1).any())  # groups the skipping path computes nothing for
    assert mixed and all_hit
    for got, want in zip(on_kernel.ring.tensors(), on_ref.ring.tensors(), strict=True):
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


# --- the ops: registration, state, validation --------------------------------------------------


def _decode_args(case: Case, site_id: int, step: int, tau: float) -> tuple:
    q, q_pre, t = case.at(step)
    return (q, q_pre, case.k, case.v, t, case.starts, SCALE, site_id, M, S, tau, 0, 4, 0, 16,
            PAGE, "page")


def test_decode_passes_opcheck_when_nothing_matches():
    # opcheck runs the op several times: with tau = 1.0 its output does not depend on the ring.
    case, site_id = make_case(), next(_SITE_IDS)
    _prefill(case, site_id)
    torch.library.opcheck(ops.mac_topk_phi_decode, _decode_args(case, site_id, 0, 1.0))


def test_prefill_passes_opcheck():
    case, site_id = make_case(), next(_SITE_IDS)
    chunk = case.q[:, :, :CHUNK]
    args = (torch.randn(B, HQ, CHUNK, D), chunk, case.q_pre[:, :, :CHUNK], case.k, case.v,
            case.starts, case.prompt_ends, SCALE, site_id, 0, M, S, 0, TOPK_SINKS, S, PAGE,
            True, 16, [True] * HQ, "", 0)
    torch.library.opcheck(ops.mac_topk_phi_prefill, args)


def test_the_decode_op_runs_the_step_on_the_sites_state_and_counts_it():
    case, site_id = make_case(seed=6), next(_SITE_IDS)
    _prefill(case, site_id)
    expected = _clone(_site(site_id))
    for step in range(3):
        got = ops.mac_topk_phi_decode(*_decode_args(case, site_id, step, TAU))
        want, _, _ = _step(case, expected, step)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    counts = dict(zip(mac_counters.COUNTERS, state.get(site_id).counters.tolist(), strict=True))
    assert counts["steps"] == [3] * HQ and counts["prefills"] == [1] * HQ
    assert 0 < sum(counts["hits"]) < 3 * B * HQ


def test_decode_compiles_with_inductor_and_keeps_state():
    case, site_id = make_case(seed=7), next(_SITE_IDS)
    _prefill(case, site_id)
    expected = _clone(_site(site_id))

    @torch.compile(fullgraph=True)
    def step(q, q_pre, k, v, positions, starts):
        return ops.mac_topk_phi_decode(q, q_pre, k, v, positions, starts, SCALE, site_id, M, S,
                                       TAU, 0, 4, 0, 16, PAGE, "page") * 1.0

    for i in range(2):
        q, q_pre, t = case.at(i)
        got = step(q, q_pre, case.k, case.v, t, case.starts)
        want, _, _ = _step(case, expected, i)
        torch.testing.assert_close(got, want)


def test_a_prefill_resets_the_state_so_nothing_leaks_from_an_earlier_sequence():
    first, second, site_id = make_case(seed=8), make_case(seed=9), next(_SITE_IDS)
    _prefill(first, site_id)
    for step in range(3):
        ops.mac_topk_phi_decode(*_decode_args(first, site_id, step, TAU))
    _prefill(second, site_id)
    fresh = next(_SITE_IDS)
    _prefill(second, fresh)
    for mine, theirs in zip(_site(site_id).tensors(), _site(fresh).tensors(), strict=True):
        assert torch.equal(mine, theirs)


def test_the_state_is_allocated_once_for_the_batch_capacity():
    case, site_id = make_case(), next(_SITE_IDS)
    _prefill(case, site_id, capacity=3)
    addresses = [t.data_ptr() for t in _site(site_id).tensors()]
    assert _site(site_id).ring.q.shape[0] == 3 and _site(site_id).topk.m.shape[0] == 3
    _prefill(case, site_id, capacity=3)
    assert [t.data_ptr() for t in _site(site_id).tensors()] == addresses


def test_a_batch_beyond_the_allocated_rows_is_a_clear_error():
    case, site_id = make_case(), next(_SITE_IDS)
    with pytest.raises(ValueError, match="batch_capacity=2"):
        _prefill(case, site_id, capacity=1)  # a batch of 2 into a state for one row


def test_decoding_before_any_prefill_is_a_clear_error():
    case = make_case()
    with pytest.raises(RuntimeError, match="before any prefill"):
        ops.mac_topk_phi_decode(*_decode_args(case, next(_SITE_IDS), 0, TAU))


def test_a_summary_tail_shorter_than_the_offset_is_refused():
    case = make_case()
    with pytest.raises(ValueError, match="^tail: expected at least the offset"):
        _prefill(case, next(_SITE_IDS), tail=S - 1)


def _folded(tensors, has_mlp):
    from macopt.kernels.feature_maps import FoldedFeatureMap

    return FoldedFeatureMap(*tensors, has_mlp=has_mlp)


def _to(topk: TopKPhiState, device: str) -> TopKPhiState:
    moved = {f.name: getattr(topk, f.name) for f in dataclasses.fields(topk)}
    for name, x in moved.items():
        if isinstance(x, torch.Tensor):
            moved[name] = x.to(device)
        elif isinstance(x, list):
            moved[name] = [t.to(device) for t in x]
    return TopKPhiState(**moved)


def test_the_triton_prefix_key_count_equals_the_reference():
    gen = torch.Generator().manual_seed(11)
    hit = torch.rand(3, HQ, generator=gen) < 0.5
    selected = torch.randint(-5, 120, (3, HKV, 40), generator=gen, dtype=torch.int32)
    t = torch.tensor([100, 90, 40], dtype=torch.int32)
    s0 = torch.tensor([0, 7, 15])
    mid_start, mid_end = s0.int() + 2, torch.tensor([92, 60, 17], dtype=torch.int32)
    args = (selected, t, s0, mid_start, mid_end, S)
    want = mac_counters.prefix_keys_reference(hit, *args)
    keys = torch.randint(0, 50, (3, HQ), generator=gen, dtype=torch.int32)
    counters = torch.zeros(mac_counters.COUNTER_ROWS, HQ, dtype=torch.int64)
    on = lambda x: x.to(DEVICE)  # noqa: E731
    got_keys, got_counters = on(keys.clone()), on(counters)
    mac_counters.add_prefix_keys_(got_counters, got_keys, on(hit), *map(on, args[:-1]), S)
    assert torch.equal(got_keys.cpu(), keys + want)
    assert torch.equal(got_counters.cpu()[mac_counters.COUNTERS.index("keys_read")],
                       want.long().sum(0))
    assert (want[hit] == 0).all() and (want[~hit] > 0).all()
