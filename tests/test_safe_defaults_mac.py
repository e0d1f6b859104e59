"""MAC's safe defaults: the guard warns on a site that hits on nearly every early decode
step, and the relative radius gives tau the same meaning on models of any query scale."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from model_zoo import ZOO
from passes_harness import generate

import macopt
from macopt import mac_guard
from macopt.kernels.mac_reference import threshold
from macopt.passes._compat import dynamo

# Random models' pre-RoPE queries are tiny (~0.05 per element): the absolute radius of
# tau = 0.45 (sqrt(38.7) at D = 64) makes nearly every step hit (tests/test_mac_generate.py).
LOOSE = macopt.MACConfig(ring_size=16, offset=4, tau=0.45, t_min=0, batch_capacity=3,
                         radius="absolute")


def _llama() -> torch.nn.Module:
    # Each model compiles the same forward code object: reset dynamo so that the recompile
    # limit never sends a later model down the unrewritten path.
    dynamo.reset()
    model = ZOO["llama"].build()
    model.set_attn_implementation("sdpa")
    return model


# Forced hits on queries sharpened 10x: reused attention is far from exact (a relative L1 of
# ~0.1 at the guard's step), where the zoo's plain random attention is nearly uniform and
# reusing it costs ~0.01.
FORCED = macopt.MACConfig(ring_size=16, offset=4, tau=-1000.0, t_min=0, batch_capacity=3,
                          max_chain_depth=2**30)


def _sharpened(model: torch.nn.Module, factor: float = 10.0) -> torch.nn.Module:
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
    return model


def _warnings_of(config: macopt.MACConfig, runs: int = 1, sharpen: bool = False) -> list[str]:
    mac_guard.reset()
    model = _llama()
    model = macopt.optimize(_sharpened(model) if sharpen else model, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(runs):
            generate(model, 3, compiled=False)
    return [str(w.message) for w in caught if issubclass(w.category, mac_guard.MACHitRateWarning)]


def test_guard_warns_once_per_site_naming_it_and_the_remedy():
    # Two generations: a site that warned in the first stays quiet in the second.
    messages = _warnings_of(FORCED, runs=2, sharpen=True)
    assert 1 <= len(messages) <= 2  # the zoo's Llama has two attention layers
    assert all("self_attn" in m and "tau" in m and "calibrate" in m for m in messages)
    assert all("away from exact attention" in m for m in messages)
    assert len(set(messages)) == len(messages)
    assert all(error > mac_guard.ERROR_LIMIT for _, error in mac_guard.CHECKS.values())


def test_guard_is_silent_when_the_reused_attention_stays_close_to_exact():
    # The plain random model's nearly uniform attention: the loose absolute radius hits on
    # over 90% of the steps, but the output the guard measures stays within its limit.
    assert _warnings_of(LOOSE) == []
    over = [(rate, error) for rate, error in mac_guard.CHECKS.values()]
    assert over and all(rate > mac_guard.HIT_LIMIT and error <= mac_guard.ERROR_LIMIT
                        for rate, error in over)


# MAC + Top-K + phi: the guard measures a step against the same step with every head missing
# (Top-K + phi over the prefix, the exact tail), reuse's own share of the error.
COMPOSED_TOPK = macopt.TopKPhiConfig(budget=0.25, sinks=1, tail=2, page_size=16,
                                     selector="exact")


def test_guard_measures_mac_with_topk_phi_against_its_steps_without_reuse():
    forced = macopt.MACTopKPhiConfig(FORCED, COMPOSED_TOPK)
    messages = _warnings_of(forced, sharpen=True)
    assert 1 <= len(messages) <= 2
    assert all("without reuse (Top-K + phi)" in m and "self_attn" in m for m in messages)
    assert all(error > mac_guard.ERROR_LIMIT for _, error in mac_guard.CHECKS.values())
    # the plain model's nearly uniform attention: reuse stays close to the step without it
    loose = macopt.MACTopKPhiConfig(LOOSE, COMPOSED_TOPK)
    assert _warnings_of(loose) == []
    over = list(mac_guard.CHECKS.values())
    assert over and all(rate > mac_guard.HIT_LIMIT and error <= mac_guard.ERROR_LIMIT
                        for rate, error in over)


def test_guard_is_silent_when_nothing_matches():
    assert _warnings_of(macopt.MACConfig(ring_size=16, offset=4, tau=1.0, t_min=0,
                                         batch_capacity=3)) == []


def _hit_rates(config: macopt.MACConfig) -> list[float]:
    model = macopt.optimize(copy.deepcopy(_llama()), config)
    generate(model, 3, compiled=False)
    return [layer.hit_rate for layer in macopt.stats(model)]


def test_relative_radius_does_not_depend_on_the_query_scale():
    # Queries x100 and keys / 100: the same model (q.k, hence every token, unchanged) with
    # other query norms. The absolute radius now matches what it did not (its hit rate moves),
    # the relative one sees the same directions (its hit rate stays).
    def scaled(factor):
        model = _llama()
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(factor)
                layer.self_attn.k_proj.weight.div_(factor)
        return model

    rates = {}
    for radius in ("relative", "absolute"):
        config = macopt.MACConfig(ring_size=16, offset=4, tau=0.2, t_min=0, batch_capacity=3,
                                  radius=radius)
        for factor in (1.0, 100.0):
            model = macopt.optimize(scaled(factor), config)
            generate(model, 3, compiled=False)
            rates[radius, factor] = [layer.hit_rate for layer in macopt.stats(model)]
    assert rates["relative", 1.0] == pytest.approx(rates["relative", 100.0], abs=0.05)
    assert rates["absolute", 1.0] != pytest.approx(rates["absolute", 100.0], abs=0.05)


def test_tau_source_says_which_radius_a_site_uses():
    assert "relative" in macopt.MACConfig().tau_source()
    assert "absolute" in macopt.MACConfig(radius="absolute").tau_source()
    with pytest.raises(ValueError, match="radius"):
        macopt.MACConfig(radius="cosine")


def test_relative_radius_means_the_same_at_head_dim_64_and_256():
    # A direction at cosine c from another is at squared distance 2 D (1 - c) after the
    # scaling to norm sqrt(D): the hit test 2 D (1 - c) < 2 D (1 - tau)^2 drops D. The absolute
    # radius at D 256 is twice the one at D 64 on queries of the same norm.
    for dim in (64, 256):
        cos = 1 - (1 - 0.85) ** 2
        assert 2 * dim * (1 - (cos + 1e-6)) < threshold(dim, 0.85) < 2 * dim * (1 - (cos - 1e-6))
    assert math.sqrt(threshold(256, 0.45)) == pytest.approx(2 * math.sqrt(threshold(64, 0.45)))


def test_stats_name_each_mac_sites_tau_and_radius():
    model = macopt.optimize(_llama(), macopt.MACConfig(ring_size=16, offset=4, t_min=0,
                                                       batch_capacity=3))
    generate(model, 3, compiled=False)
    taus = [layer.tau for layer in macopt.stats(model)]
    assert taus and all(t == macopt.MACConfig().tau_source() for t in taus)


def _ring_query_norms(model: torch.nn.Module) -> list[float]:
    """Median norm of the pre-RoPE queries each MAC site's ring holds after a generation."""
    from macopt import state
    from macopt.passes import scope

    norms = []
    for module in model.modules():
        site_id = scope.site_id_of(module)
        site = state.get(site_id) if site_id is not None else None
        if site is not None and site.method == "mac":
            ring = site.buffers
            filled = ring.pos >= 0
            norms.append(ring.q.float().norm(dim=-1)[filled].median().item())
    return norms


def test_head_dim_256_normalised_queries_get_their_own_radius():
    # Gemma-3-like (q-norm: normalised queries, D 256) vs Llama-like (D 64), random weights.
    # The relative radius scales every query to norm sqrt(D) before the match: the radius in
    # the model's raw query units is sqrt(2) (1 - tau) |q|, which differs between the two
    # models (and from the absolute sqrt(2 D) (1 - tau)) wherever their query norms differ.
    dynamo.reset()
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    gemma = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=256, num_hidden_layers=2, hidden_size=128, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, head_dim=256, max_position_embeddings=256,
        query_pre_attn_scalar=256, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"])).eval()
    gemma.set_attn_implementation("sdpa")
    config = macopt.MACConfig(ring_size=16, offset=4, t_min=0, batch_capacity=3)
    for model, dim in ((gemma, 256), (_llama(), 64)):
        dynamo.reset()
        model = macopt.optimize(model, config)
        generate(model, 3, compiled=False)
        norms = _ring_query_norms(model)
        assert norms and all(n == pytest.approx(math.sqrt(dim), rel=1e-3) for n in norms)


def test_guard_snapshot_reuses_one_buffer_and_indexes_nothing_from_the_host():
    # Under generate()'s compile a chunked prefill runs in CUDA-graph trees: a snapshot
    # allocated there would stay alive in their pool, and a list index copies from the host,
    # which capture refuses (BENCHMARKS.md 22). CPU proxy: the second prefill's snapshot
    # lands in the first one's buffer, through no index op.
    from torch.utils._python_dispatch import TorchDispatchMode

    from macopt.kernels.mac_counters import COUNTER_ROWS

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    site = 987_655  # a site id no model in this process uses
    counters = torch.arange(COUNTER_ROWS * 3, dtype=torch.int64).view(COUNTER_ROWS, 3)
    mac_guard.on_prefill(site, counters)
    first = mac_guard._WATCH[site][1]
    counters += 1
    with Ops() as ops:
        mac_guard.on_prefill(site, counters)
    try:
        assert mac_guard._WATCH[site][1] is first
        assert first.tolist() == [int(counters[r].sum()) for r in mac_guard._ROWS]
        assert not [n for n in ops.names if "index" in n or "lift_fresh" in n], ops.names
    finally:
        mac_guard._WATCH.pop(site, None)
        mac_guard._BASELINES.pop(site, None)


def test_a_released_site_leaves_no_guard_entries():
    # A garbage-collected module's site is released (macopt.passes.scope): the guard's watch,
    # baseline buffer and check go with it.
    from macopt import state
    from macopt.kernels.mac_counters import COUNTER_ROWS

    site = 987_656  # a site id no model in this process uses
    mac_guard.on_prefill(site, torch.zeros(COUNTER_ROWS, 2, dtype=torch.int64))
    mac_guard.CHECKS[site] = (1.0, None)
    assert site in mac_guard._WATCH and site in mac_guard._BASELINES
    state.release(site)
    assert site not in mac_guard._WATCH
    assert site not in mac_guard._BASELINES
    assert site not in mac_guard.CHECKS
