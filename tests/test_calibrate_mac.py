"""``macopt.calibrate_mac``: the simulated MAC decode is the reference step and the compiled
path's decode; the search writes a config the rest of macopt reads."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
from model_zoo import ZOO

import macopt
from macopt.calibrate_mac import (
    MACCalibration,
    _allocate,
    _Option,
    calibrate_mac,
    exact_window,
    load_result,
    mac_step,
    matched_query,
    prefill_ring,
    search_steps,
    simulate_decode,
    tau_for_radius,
    write_result,
)
from macopt.evaluation.capture import AttentionCall
from macopt.evaluation.harness import Method, _Cache, _KeyMeter, _prepare, _Runner
from macopt.kernels.mac_reference import MACRing, mac_decode_step, prefill_entries, threshold


@pytest.mark.parametrize("sinks", [0, 3])
def test_mac_step_is_the_reference_step(sinks):
    generator = torch.Generator().manual_seed(0)
    q_heads, kv_heads, head_dim, n = 4, 2, 16, 96
    k = torch.randn(1, kv_heads, n, head_dim, generator=generator)
    v = torch.randn(1, kv_heads, n, head_dim, generator=generator)
    prototypes = torch.randn(3, q_heads, head_dim, generator=generator)
    config = macopt.MACConfig(ring_size=16, offset=8, tau=0.7, t_min=40, sinks=sinks,
                              max_chain_depth=3)
    mine = MACRing.empty(1, q_heads, 16, head_dim, torch.float32)
    reference = mine.clone()
    hits = 0
    for t in range(32, n):  # queries near a few prototypes: hits, misses, chains
        noise = 0.05 * torch.randn(q_heads, head_dim, generator=generator)
        q_pre = (prototypes[t % 3] + noise)[None]
        q = q_pre * 1.1
        o, hit, keys = mac_step(q, q_pre, k, v, mine, t, 0.25, config)
        o_ref, hit_ref, keys_ref = mac_decode_step(
            q, q_pre, k, v, reference, torch.tensor([t]), torch.tensor([0]), 0.25,
            offset=8, sinks=sinks, tau=0.7, t_min=40, max_depth=3)
        torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(hit, hit_ref) and torch.equal(keys, keys_ref)
        hits += int(hit.sum())
    for a, b in zip(mine.tensors(), reference.tensors(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert 0 < hits < q_heads * (n - 40)


def test_prefill_ring_is_the_reference_prefill():
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 40, 16, generator=generator)
    k, v = (torch.randn(1, 2, 40, 16, generator=generator) for _ in range(2))
    call = AttentionCall(0, "layer", q * 0.5, q, k, v, 0.25)
    config = macopt.MACConfig(ring_size=16, offset=6, sinks=2)
    mine = prefill_ring(call, config)
    zero, end = torch.tensor([0]), torch.tensor([40])
    # The ring holds the queries as the match sees them (scaled to sqrt(D): relative radius).
    matched = matched_query(q * 0.5, config)
    reference = prefill_entries(q, matched, k, v, 0.25, zero, end, 16, 6, 2)
    for a, b in zip(mine.tensors(), reference.tensors(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_tau_for_radius_inverts_the_threshold():
    assert tau_for_radius(threshold(64, 0.3), 64) == pytest.approx(0.3)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return ZOO["llama"].build()


@pytest.mark.parametrize("radius", ["absolute", "relative"])
@pytest.mark.parametrize("layer_offsets", [None, (2, 9)])
def test_simulated_decode_is_the_compiled_paths_decode(model, layer_offsets, radius):
    """Teacher-forced MAC decode steps of the optimized model (eager backend, reference ops)
    and the simulation from one exact prefill give the same logits, hits and keys read; with
    per-layer offsets too (module overrides, as a calibration with ``offsets`` writes them).

    No token repeats: a first layer's pre-RoPE query depends on the token alone, so repeats
    tie at distance 0, and which of them is "nearest" then depends on the last bits of two
    differently computed projections (both choices are valid MAC)."""
    ids = torch.randperm(200, generator=torch.Generator().manual_seed(2))[:81]
    config = macopt.MACConfig(ring_size=16, offset=4, tau=0.2, t_min=0, radius=radius)
    settings = MACCalibration(prefill=64, decode=16, base=config, offsets=layer_offsets)
    window = exact_window(model, ids, settings)
    configs = dict.fromkeys(window.names, config)
    overrides = None
    if layer_offsets is not None:
        configs = {layer: dataclasses.replace(config, offset=offset)
                   for layer, offset in zip(sorted(window.names), layer_offsets, strict=True)}
        overrides = {window.names[layer]: c for layer, c in configs.items()}
    logits, attention = simulate_decode(model, window, configs, 64)
    optimized = _prepare(model, Method("mac", config, overrides))
    meter = _KeyMeter(optimized, config, 96)
    with torch.no_grad():
        compiled = _Runner(optimized, _Cache(optimized, 96, "cpu"), meter, "cpu").forward(
            ids[:80].tolist(), 64)[64:]
    torch.testing.assert_close(logits[0], compiled, atol=1e-5, rtol=1e-5)
    counted = meter.report()
    hits = sum(attention.hits.values())
    assert hits > 0 and counted["hit_rate"] * sum(attention.steps.values()) == hits
    simulated_reads = sum(attention.read.values()) / sum(attention.full.values())
    assert counted["read_fraction"] == pytest.approx(simulated_reads, rel=1e-9)
    # The random model's queries are tiny: the absolute radius matches most of them.
    assert simulated_reads < (0.5 if radius == "absolute" else 1.0)


def test_calibration_writes_a_config_that_loads(model, tmp_path):
    windows = [torch.randint(0, 200, (97,), generator=torch.Generator().manual_seed(s))
               for s in range(2)]
    settings = MACCalibration(prefill=80, decode=16, shares=(0.3, 0.9), refine=1,
                              families=("per_layer", "global"),
                              base=macopt.MACConfig(ring_size=16, offset=4, t_min=64))
    seen = []
    result = calibrate_mac(model, windows, settings, progress=seen.append)
    path = write_result(result, tmp_path / "mac.json", model="zoo llama")
    data = json.loads(path.read_text())
    assert data["calibration"]["model"] == "zoo llama" and len(seen) >= 2 + 2 * 2
    measured = data["calibration"]["measured"]
    assert {m["kind"] for m in measured} == {"layer", "per_layer", "global"}
    config, overrides = load_result(path)
    chosen = data["calibration"]["chosen"]
    if chosen is not None:
        assert chosen["within_target"] and chosen["expected_ppl_ratio"] - 1 <= 0.005
        taus = {name: overrides.get(name, config).tau for name in chosen["taus"]}
        assert taus == pytest.approx(chosen["taus"])
    assert config.ring_size == 16 and config.t_min == 64
    # No offsets given: tau alone is searched, everything at the base offset, as before.
    assert settings.offsets == (4,) and data["calibration"]["offsets"] == [4]
    assert len([m for m in measured if m["kind"] == "layer"]) == 2 * 2  # shares x layers
    assert {s for m in measured for s in m["offsets"].values()} == {4}
    assert config.offset == 4 and {c.offset for c in overrides.values()} <= {4}
    assert len(seen) == 2 + len(measured) <= 2 + search_steps(settings, 2)


def test_offset_search_chooses_per_layer_offsets_that_load_back(model, tmp_path):
    windows = [torch.randint(0, 200, (97,), generator=torch.Generator().manual_seed(s))
               for s in range(2)]
    settings = MACCalibration(prefill=80, decode=16, shares=(0.3, 0.9), refine=1,
                              offsets=(8, 2, 8),
                              base=macopt.MACConfig(ring_size=16, offset=4, t_min=64))
    assert settings.offsets == (2, 8)  # sorted, once each
    result = calibrate_mac(model, windows, settings)
    data = json.loads(write_result(result, tmp_path / "mac.json").read_text())
    assert data["calibration"]["offsets"] == [2, 8]
    layers = [m for m in data["calibration"]["measured"] if m["kind"] == "layer"]
    assert len(layers) == 2 * 2 * 2  # shares x offsets x layers
    # Every (layer, share) was measured at both offsets: a larger S reads more keys.
    reads = {}
    for m in layers:
        layer = next(i for i, tau in enumerate(m["taus"].values()) if tau < 1.0)
        name = list(m["taus"])[layer]
        reads[layer, m["share"], m["offsets"][name]] = m["layer_read_fractions"][layer]
    assert len(reads) == 8
    for layer in (0, 1):
        for share in (0.3, 0.9):
            assert reads[layer, share, 2] < reads[layer, share, 8]
    chosen = data["calibration"]["chosen"]
    assert chosen is not None and chosen["kind"] == "per_layer" and chosen["within_target"]
    matching = [name for name, tau in chosen["taus"].items() if tau < 1.0]
    assert matching and {chosen["offsets"][name] for name in matching} <= {2, 8}
    config, overrides = load_result(tmp_path / "mac.json")
    loaded = {name: overrides.get(name, config) for name in chosen["taus"]}
    assert {n: c.offset for n, c in loaded.items()} == chosen["offsets"]
    assert {n: c.tau for n, c in loaded.items()} == pytest.approx(chosen["taus"])
    assert all(c.ring_size == 16 and c.t_min == 64 for c in loaded.values())


@pytest.mark.parametrize("offsets", [(), (-1,), (2.5,), (True,), ("8",)])
def test_offsets_must_be_valid_mac_offsets(offsets):
    with pytest.raises(ValueError, match="MACCalibration.offsets"):
        MACCalibration(prefill=80, base=macopt.MACConfig(t_min=64), offsets=offsets)


def test_nothing_within_target_writes_tau_one(model):
    windows = [torch.randint(0, 200, (97,), generator=torch.Generator().manual_seed(3))]
    settings = MACCalibration(target=-1.0, prefill=80, decode=16, shares=(0.9,), refine=0,
                              families=("global",),
                              base=macopt.MACConfig(ring_size=16, offset=4, t_min=64))
    result = calibrate_mac(model, windows, settings)
    assert result.chosen is None and result.config.tau == 1.0 and result.overrides == {}


def test_allocation_reads_the_fewest_keys_within_the_budget():
    """The per-layer allocation is the exact optimum: against every combination of a few
    random options, and where a Lagrangian sweep (which only reaches the convex hull's
    corners) would stop at a corner reading far more."""
    never = _Option(1.0, 256, 1.0, 0.0)
    gap = {0: [never, _Option(0.5, 256, 0.1, 2.0), _Option(0.6, 1024, 0.6, 0.9)],
           1: [never, _Option(0.5, 128, 0.1, 1.0)]}
    # Hull corners: 2.0 read at KL 0, 1.1 at KL 1, 0.2 at KL 3; the best within 1.9 is 0.7.
    assert _allocate(gap, 1.9) == {0: gap[0][2], 1: gap[1][1]}
    assert _allocate(gap, 0.5) == {0: never, 1: never}
    assert _allocate(gap, float("-inf")) == {0: never, 1: never}
    generator = torch.Generator().manual_seed(4)
    for _ in range(50):
        curves = {layer: [never] + [_Option(0.5, 256, *torch.rand(2, generator=generator)
                                            .tolist()) for _ in range(4)] for layer in range(3)}
        budget = float(torch.rand(1, generator=generator)) * 1.5
        fits = [c for c in itertools.product(*curves.values())
                if sum(o.kl for o in c) <= budget]
        best = min(sum(o.read for o in c) for c in fits)
        chosen = _allocate(curves, budget)
        assert all(chosen[layer] in options for layer, options in curves.items())
        assert sum(o.kl for o in chosen.values()) <= budget
        assert sum(o.read for o in chosen.values()) == pytest.approx(best)
