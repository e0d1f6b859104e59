"""One decode-attention layer step of MAC + Top-K + phi at forced hit rates, beside exact, MAC
alone and Top-K + phi alone on the same K/V: the variants ``profile_steps mac-topk`` times.

The layer is :func:`macopt.bench.mac.make_layer`'s (every row at ``t = N - 1``, its K/V the
whole cache) and hit rates are forced per (row, query head) by
:func:`macopt.bench.mac.forced_ring`. Top-K + phi (alone and inside the composed step) treats
the whole cache as the prompt; the composed step's summary leaves out the last ``max(tail, S)``
keys (its ``mid_end`` is then ``E(t)``), as ``mac_topk_phi_prefill`` builds it. The composed
step runs with the site counters (what a model runs), skipping the Top-K + phi work of groups
whose heads all hit, and at one rate "uncounted" runs without counters (what the counting
costs). Feature maps are positive random features: speed does not depend on them.

>>> variants = mac_topk_variants(layer, maps, budget=0.02)  # doctest: +SKIP
>>> [name for name, _ in variants][:3]  # doctest: +SKIP
['exact', 'topk_phi 0.02', 'mac h1.0']
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from macopt.bench import mac as bench_mac
from macopt.config import MACConfig, MACTopKPhiConfig, TopKPhiConfig
from macopt.kernels.feature_maps import FeatureMaps
from macopt.kernels.mac_counters import COUNTER_ROWS

HIT_RATES = (1.0, 0.95, 0.0)
Step = Callable[[], object]


def mac_topk_variants(
    layer: bench_mac.Layer, maps: FeatureMaps, budget: float | int = 0.02,
    hit_rates: tuple[float, ...] = HIT_RATES, ring_size: int = 512, offset: int = 256,
    page_size: int = 32,
) -> list[tuple[str, Step]]:
    """``(variant, step)`` pairs: exact, Top-K + phi alone, then per hit rate MAC alone and the
    composed step (with counters; the first rate below 1 also without counters)."""
    from macopt.kernels import mac
    from macopt.mac_topk_phi_ops import MACTopKPhiSite, decode_step
    from macopt.topk_phi_state import decode as topk_decode

    config = MACTopKPhiConfig(
        MACConfig(ring_size=ring_size, offset=offset, tau=0.45, t_min=0),
        TopKPhiConfig(budget=budget, page_size=page_size, d_phi=maps.phi_k.d_phi))
    topk = config.topk_phi
    n_keys = layer.k.shape[2]
    ends = layer.positions + 1
    alone = _prefilled(layer, maps, topk, topk.tail)
    composed = _prefilled(layer, maps, topk, config.summary_tail)
    exact = torch.ops.macopt.decode_attention
    variants: list[tuple[str, Step]] = [
        ("exact", lambda: exact(layer.q, layer.k, layer.v, layer.starts, ends, None,
                                layer.scale)),
        (f"topk_phi {budget:g}", lambda: topk_decode(alone, layer.q, layer.k, layer.v,
                                                     layer.starts, ends, layer.scale, topk)),
    ]
    step_args = dict(offset=offset, tau=0.45, t_min=0, max_depth=16)
    uncounted = next((r for r in hit_rates if r < 1.0), None)
    for rate in hit_rates:
        ring = bench_mac.forced_ring(layer, ring_size, rate)

        def mac_step(ring=ring) -> object:
            return mac.mac_decode_step(layer.q, layer.q_pre, layer.k, layer.v, ring,
                                       layer.positions, layer.starts, layer.scale, **step_args)

        site = MACTopKPhiSite(ring.clone(), composed)  # the same entries as MAC alone
        counters = torch.zeros(COUNTER_ROWS, layer.q.shape[1], dtype=torch.int64,
                               device=layer.q.device)

        def composed_step(site=site, counters=counters) -> object:
            return decode_step(layer.q, layer.q_pre, layer.k, layer.v, site, layer.positions,
                               layer.starts, layer.scale, budget=topk.budget_tokens(n_keys),
                               page_size=page_size, selector=topk.selector, counters=counters,
                               **step_args)

        variants += [(f"mac h{rate}", mac_step), (f"mac+topk h{rate}", composed_step)]
        if rate == uncounted:
            variants.append((f"mac+topk h{rate} uncounted",
                             partial(composed_step, counters=None)))
    return variants


def _prefilled(layer: bench_mac.Layer, maps: FeatureMaps, topk: TopKPhiConfig, tail: int):
    """A Top-K + phi state whose prompt is the whole cache, summarised but for ``tail`` keys."""
    from macopt.topk_phi_state import TopKPhiState
    from macopt.topk_phi_state import prefill as topk_prefill

    batch, q_heads, head_dim = layer.q.shape
    kv_heads, n_keys = layer.k.shape[1], layer.k.shape[2]
    state = TopKPhiState.allocate(batch, q_heads, kv_heads, n_keys, head_dim, layer.k.dtype,
                                  layer.k.device, page_size=topk.page_size, maps=maps,
                                  sketch=topk.selector == "sketch")
    prompt = TopKPhiConfig(sinks=topk.sinks, tail=tail, page_size=topk.page_size)
    topk_prefill(state, layer.k, layer.v, layer.starts, layer.positions + 1, prompt)
    return state
