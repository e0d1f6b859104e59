"""MAC + Top-K + phi ops (``torch.ops.macopt.mac_topk_phi_decode`` / ``mac_topk_phi_prefill``):
what the ``mac_topk_phi`` rewrites insert. Approximate by design (MACTopKPhiConfig).

A decode step (:func:`decode_step`) is two steps of the existing methods:

1. Top-K + phi over each row's keys ``[s0, E(t))``, ``E(t) = max(t + 1 - S, s0)``: the state
   ``(o, lse)`` of the sinks, the retrieved middle keys and the keys in ``[mid_end, E(t))``,
   exact, merged with the completion of the rest of the prompt's middle
   (:func:`macopt.topk_phi_state.decode_impl` with ``state=True``);
2. the MAC step with that state as ``miss_prefix``: a head that misses takes it as its prefix
   state (and writes it to its ring slot, depth 0) instead of attending ``[s0, E(t))``; a head
   that hits reuses its ring entry and attends the band since it, as in ``mac``. Both add the
   exact tail ``[E(t), t]``.

The Top-K + phi summary is built at prefill with the tail ``max(topk_phi.tail, S)``, so it ends
at ``mid_end <= N - S < E(t)`` for every decode position ``t >= N``: step 1 never summarises a
key that MAC's tail attends. On the Triton path MAC's match runs first and step 1 skips the
(row, KV head) groups whose heads all hit (:func:`macopt.kernels.mac.all_hit_groups`; they
read no page bound, key or summary). The counters report what the method needs: a hit's band
and tail, a miss's tail plus the keys its Top-K + phi state attends exactly (sinks, retrieved,
``[mid_end, E(t))``); the page bounds and summary it reads are not keys and are not counted
here (``macopt eval`` adds them as key-row equivalents).

CPU runs the references (:mod:`macopt.kernels.topk_phi_reference`,
:mod:`macopt.kernels.mac_reference`), CUDA the Triton kernels; ``MACOPT_CPU_KERNELS=triton``
runs Triton on CPU through the interpreter. Per-site state (the MAC ring, the Top-K + phi
summary and the MAC counters) is keyed by the site id (:mod:`macopt.state`), allocated for
``batch_capacity`` rows at the first prefill and rebuilt by every prefill. As for ``mac`` the
ops are declared functional and return a fresh tensor the graph uses.

>>> o = torch.ops.macopt.mac_topk_phi_decode(q, q_pre, k, v, t, s0, 0.125, site_id, 512, 256,
...                                          0.45, 2048, 16, 0, 2622, 32, "page")  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from macopt import mac_guard, state, topk_phi_ops
from macopt.config import MACTopKPhiConfig, check_budget_args, resolve_budget
from macopt.exact_ops import _use_triton
from macopt.kernels import mac_counters, mac_reference
from macopt.kernels.mac_counters import COUNTER_ROWS
from macopt.kernels.mac_reference import MACRing
from macopt.mac_ops import check_prefill_inputs, count_prefill_, write_prefill_entries
from macopt.site_params import SiteParams, site_op
from macopt.topk_phi_ops import TopKPhiPrefillParams
from macopt.topk_phi_state import TopKPhiState, decode_impl, topk_phi_prefill
from macopt.validation import check_decode_inputs

Tensor = torch.Tensor
METHOD = "mac_topk_phi"


@dataclass(frozen=True)
class MACTopKPhiDecodeParams(SiteParams):
    """A MAC + Top-K + phi site's decode constants: MAC's (no sinks: Top-K + phi's cover
    them) then Top-K + phi's selection (``budget``, ``budget_fraction`` as
    :meth:`TopKPhiConfig.budget_args`)."""

    ring_size: int
    offset: int
    tau: float
    t_min: int
    max_chain_depth: int
    batch_capacity: int
    budget: int
    page_size: int
    selector: str
    budget_fraction: float = 0.0

    @classmethod
    def from_config(cls, config: MACTopKPhiConfig) -> MACTopKPhiDecodeParams:
        mac, topk = config.mac, config.topk_phi
        budget, fraction = topk.budget_args()  # a fraction: resolved when the step runs
        return cls(mac.ring_size, mac.offset, mac.tau, mac.t_min, mac.max_chain_depth,
                   mac.batch_capacity or 0, budget, topk.page_size, topk.selector_spec(),
                   fraction)


@dataclass(frozen=True)
class MACRingParams(SiteParams):
    """The MAC ring a MAC + Top-K + phi prefill writes."""

    ring_size: int
    offset: int
    batch_capacity: int


@dataclass(frozen=True)
class MACTopKPhiPrefillParams(TopKPhiPrefillParams, MACRingParams):
    """A MAC + Top-K + phi site's prefill constants: :class:`MACRingParams`' fields, then
    :class:`TopKPhiPrefillParams`' (the summary's tail at least MAC's offset)."""

    @classmethod
    def from_config(cls, config: MACTopKPhiConfig, layer: int, q_heads: int
                    ) -> MACTopKPhiPrefillParams:
        mac = config.mac
        topk = TopKPhiPrefillParams.from_config(config.topk_phi, layer, q_heads,
                                                tail=config.summary_tail)
        return cls(mac.ring_size, mac.offset, mac.batch_capacity or 0, *topk.op_args())


@dataclass
class MACTopKPhiSite:
    """One attention site's state: the MAC ring and the Top-K + phi state (same rows)."""

    ring: MACRing
    topk: TopKPhiState

    def tensors(self) -> tuple[Tensor, ...]:
        """Every buffer (for memory accounting)."""
        return (*self.ring.tensors(), *self.topk.tensors())

    def first_rows(self, batch: int) -> MACTopKPhiSite:
        """Views of the first ``batch`` rows (same addresses)."""
        rows = self.ring.pos.shape[0]
        if batch > rows:
            raise ValueError(
                f"macopt MAC + Top-K + phi: batch {batch} exceeds the {rows} rows the site's "
                f"state was allocated for at its first prefill. Set MACConfig(batch_capacity="
                f"{batch}) (or larger) in the config's mac part and optimize the model again.")
        if batch == rows:
            return self
        return MACTopKPhiSite(MACRing(*(t[:batch] for t in self.ring.tensors())),
                              self.topk.first_rows(batch))


def decode_step(
    q: Tensor, q_pre: Tensor, k: Tensor, v: Tensor, site: MACTopKPhiSite, positions: Tensor,
    key_starts: Tensor, scale: float, *, offset: int, tau: float, t_min: int, max_depth: int,
    budget: int, page_size: int, selector: str, counters: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One MAC + Top-K + phi decode step (see the module docstring); updates the ring in place.

    ``q, q_pre[B, Hq, D]``, ``k, v[B, Hkv, N, D]``; row ``b`` decodes position
    ``positions[b]`` over keys ``[key_starts[b], positions[b]]``. Returns ``o[B, Hq, D]`` in
    ``q.dtype``, ``hit[B, Hq]`` and the keys each head attended ``[B, Hq]`` (int32); adds the
    step to ``counters`` (MAC's ``[COUNTER_ROWS, Hq]`` int64) when given. No host sync.

    On the Triton path MAC's match runs first and no Top-K + phi state is computed for (row,
    KV head) groups whose heads all hit (they would not read it).

    >>> o, hit, keys = decode_step(q, q_pre, k, v, site, t, s0, 0.125, offset=256, tau=0.45,
    ...                            t_min=2048, max_depth=16, budget=2622, page_size=32,
    ...                            selector="page")  # doctest: +SKIP
    """
    topk, triton_path = site.topk, _use_triton(q.device)
    candidates = skip = None
    if triton_path:
        from macopt.kernels import mac

        candidates = mac.match_candidates(q_pre, site.ring, positions, key_starts, t_min=t_min,
                                          max_depth=max_depth)
        skip = mac.all_hit_groups(candidates, positions, key_starts, k.shape[1],
                                  ring_size=site.ring.size, offset=offset, tau=tau,
                                  t_min=t_min, head_dim=q.shape[-1])
    prefix_end = mac_reference.prefix_end(positions.long(), key_starts.long(), offset)
    o_prefix, lse_prefix, selected = decode_impl(
        q, k, v, key_starts, prefix_end, topk.m, topk.u, topk.t, topk.mid_start, topk.mid_end,
        topk.kmin, topk.kmax, topk.phi_q, topk.phi_q_mlp, topk.phi_k, topk.phi_k_mlp,
        topk.completion, scale, budget, page_size, selector, state=True, skip=skip)
    params = dict(offset=offset, sinks=0, tau=tau, t_min=t_min, max_depth=max_depth,
                  miss_prefix=(o_prefix, lse_prefix))
    mid = (topk.mid_start, topk.mid_end)
    if triton_path:
        from macopt.kernels import mac

        # The finalize launch counts the step (a miss: its tail only); one more launch adds
        # the misses' Top-K + phi keys to keys_read and the counters.
        o, hit, keys_read = mac.mac_decode_step(q, q_pre, k, v, site.ring, positions,
                                                key_starts, scale, counters=counters,
                                                candidates=candidates, **params)
        mac_counters.add_prefix_keys_(counters, keys_read, hit, selected, positions, key_starts,
                                      *mid, offset)
        return o, hit, keys_read
    o, hit, keys_read = mac_reference.mac_decode_step(q, q_pre, k, v, site.ring, positions,
                                                      key_starts, scale, **params)
    keys_read = keys_read + mac_counters.prefix_keys_reference(hit, selected, positions,
                                                               key_starts, *mid, offset)
    if counters is not None:
        mac_counters.count_decode_reference_(counters, hit, keys_read, positions, key_starts)
    return o, hit, keys_read


def _check_decode(q: Tensor, q_pre: Tensor, k: Tensor, v: Tensor, positions: Tensor,
                  key_starts: Tensor, budget: int, page_size: int,
                  budget_fraction: float = 0.0) -> None:
    check_decode_inputs(q, k, v, key_starts, positions, None)
    if q_pre.shape != q.shape:
        raise ValueError(f"q_pre: expected the shape of q {tuple(q.shape)}, got "
                         f"{tuple(q_pre.shape)}")
    check_budget_args(budget, budget_fraction)
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size: expected a power of two, got {page_size}")


@site_op("macopt::mac_topk_phi_decode", MACTopKPhiDecodeParams)
def mac_topk_phi_decode(
    q: Tensor, q_pre: Tensor, k: Tensor, v: Tensor, positions: Tensor, key_starts: Tensor,
    scale: float, site_id: int, params: MACTopKPhiDecodeParams,
) -> Tensor:
    """One MAC + Top-K + phi decode step ``o[B, Hq, D]`` of row ``b`` at cache position
    ``positions[b]`` over keys ``[key_starts[b], positions[b]]`` (approximate); updates the
    site's ring and counters in place. The site's last prefill built its summary.
    ``budget_fraction`` > 0: K is that fraction of this step's cache length ``k.shape[2]``
    (:func:`macopt.config.resolve_budget`; ``budget`` is then unused)."""
    p = params
    _check_decode(q, q_pre, k, v, positions, key_starts, p.budget, p.page_size,
                  p.budget_fraction)
    budget = resolve_budget(p.budget, p.budget_fraction, k.shape[2])
    found = state.get(site_id)
    if found is None or found.method != METHOD:
        raise RuntimeError(f"macopt MAC + Top-K + phi: attention site {site_id} decodes before "
                           "any prefill built its state; run the prompt through the optimized "
                           "model first")
    site: MACTopKPhiSite = found.buffers.first_rows(q.shape[0])
    if site.ring.size != p.ring_size or site.ring.q.shape[1:2] != q.shape[1:2]:
        raise ValueError(f"macopt MAC + Top-K + phi: site {site_id}'s state holds a ring of "
                         f"{site.ring.size} slots for {site.ring.q.shape[1]} query heads, the "
                         f"step has ring_size {p.ring_size} and {q.shape[1]} query heads")
    steps = dict(offset=p.offset, t_min=p.t_min, max_depth=p.max_chain_depth, budget=budget,
                 page_size=p.page_size, selector=p.selector)
    # the guard's measurement needs the ring as it was before this step updates it
    before = site.ring.clone() if mac_guard.measures_next(site_id) else None
    o, _, _ = decode_step(q, q_pre, k, v, site, positions, key_starts, scale, tau=p.tau,
                          counters=found.counters, **steps)
    mac_guard.on_decode(site_id, found.counters, measure=lambda: _error_against_misses(
        o, q, q_pre, k, v, MACTopKPhiSite(before, site.topk), positions, key_starts, scale,
        steps), against="the same step without reuse (Top-K + phi)")
    return o


def _error_against_misses(o: Tensor, q: Tensor, q_pre: Tensor, k: Tensor, v: Tensor,
                          site: MACTopKPhiSite, positions: Tensor, key_starts: Tensor,
                          scale: float, steps: dict) -> float:
    """Relative L1 distance of a MAC + Top-K + phi step's output from the same step with every
    head missing (tau 1: Top-K + phi over the prefix, the exact tail): what MAC's reuse adds
    to the Top-K + phi error, the guard's check. ``site``'s ring (a copy) is updated."""
    want, _, _ = decode_step(q, q_pre, k, v, site, positions, key_starts, scale, tau=1.0,
                             **steps)
    return mac_guard.relative_error(o, want)


@mac_topk_phi_decode.register_fake
def _(q, q_pre, k, v, positions, key_starts, scale, site_id, params):
    _check_decode(q, q_pre, k, v, positions, key_starts, params.budget, params.page_size,
                  params.budget_fraction)
    return torch.empty_like(q)


def site_state(site_id: int, layer: int, q_pre: Tensor, k: Tensor, ring_size: int,
               capacity: int, use_pages: bool, page_size: int, d_phi: int,
               completion: list[bool], feature_maps: str, seed: int,
               sketch: bool = False) -> tuple[MACTopKPhiSite, Tensor]:
    """The state (first ``B`` rows) and counters of ``site_id`` for a prefill of
    ``q_pre[B, Hq, N, D]`` into the cache ``k[B, Hkv, Nk, D]``; allocated for ``capacity``
    rows (0: ``B``) on first use, at addresses that never move afterwards."""
    batch, q_heads, _, head_dim = q_pre.shape
    topk_args = (layer, q_heads, k, use_pages, page_size, d_phi, completion, feature_maps, seed,
                 sketch)
    spec = (q_heads, head_dim, ring_size, q_pre.dtype, q_pre.device, capacity,
            topk_phi_ops.state_spec(capacity, *topk_args))

    def allocate() -> tuple[MACTopKPhiSite, Tensor]:
        rows = capacity or batch
        ring = MACRing.empty(rows, q_heads, ring_size, head_dim, q_pre.dtype, q_pre.device)
        topk = topk_phi_ops.allocate_state(rows, *topk_args, site_id=site_id)
        counters = torch.zeros(COUNTER_ROWS, q_heads, dtype=torch.int64, device=q_pre.device)
        return MACTopKPhiSite(ring, topk), counters

    found = state.site_state(site_id, METHOD, spec, allocate)
    return found.buffers.first_rows(batch), found.counters


@site_op("macopt::mac_topk_phi_prefill", MACTopKPhiPrefillParams)
def mac_topk_phi_prefill(
    attn_out: Tensor, q_post: Tensor, q_pre: Tensor, k: Tensor, v: Tensor, key_starts: Tensor,
    ends: Tensor, scale: float, site_id: int, layer: int, params: MACTopKPhiPrefillParams,
) -> Tensor:
    """A copy of ``attn_out[B, Hq, N, D]``; rebuilds the site's state from the prompt chunk
    (queries at cache positions ``[ends[b] - N, ends[b])``, row ``b``'s prompt ``[key_starts[b],
    ends[b])``): MAC's exact ring entries and the Top-K + phi summary of the middle
    ``[s0 + sinks, ends - tail)``. ``tail`` must be at least ``offset`` (S), so the summary
    ends before every decode step's ``E(t)``."""
    p = params
    _check_prefill(attn_out, q_post, q_pre, k, key_starts, ends, p.offset, p.tail)
    site, counters = site_state(site_id, layer, q_pre, k, p.ring_size, p.batch_capacity,
                                *p.state_args())
    write_prefill_entries(site.ring, q_post, q_pre, k, v, scale, key_starts, ends, p.offset, 0)
    topk = site.topk
    topk_phi_prefill(k, v, key_starts, ends, topk.phi_k, topk.phi_k_mlp, p.sinks, p.tail,
                     p.page_size, topk.m, topk.u, topk.t, topk.mid_start, topk.mid_end,
                     topk.kmin, topk.kmax)
    count_prefill_(counters, q_post.shape[2], site.ring.size, key_starts, ends)
    mac_guard.on_prefill(site_id, counters)
    return attn_out.clone()


def _check_prefill(attn_out: Tensor, q_post: Tensor, q_pre: Tensor, k: Tensor,
                   key_starts: Tensor, ends: Tensor, offset: int, tail: int) -> None:
    check_prefill_inputs(attn_out, q_post, q_pre, k, key_starts, ends)
    if tail < offset:
        raise ValueError(f"tail: expected at least the offset S = {offset} (the summary must "
                         f"end before every decode step's prefix end), got {tail}")


@mac_topk_phi_prefill.register_fake
def _(attn_out, q_post, q_pre, k, v, key_starts, ends, scale, site_id, layer, params):
    _check_prefill(attn_out, q_post, q_pre, k, key_starts, ends, params.offset, params.tail)
    return torch.empty_like(attn_out)
