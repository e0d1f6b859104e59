"""``macopt.calibrate_mac``: the simulated MAC decode is the reference step and the compiled
path's decode; the search writes a config the rest of macopt reads."""

from __future__ import annotations

import json

import pytest
import torch

import macopt
from macopt.calibrate_mac import (
    MACCalibration,
    calibrate_mac,
    exact_window,
    load_result,
    mac_step,
    prefill_ring,
    simulate_decode,
    tau_for_radius,
    write_result,
)
from macopt.evaluation.capture import AttentionCall
from macopt.evaluation.harness import Method, _Cache, _KeyMeter, _prepare, _Runner
from macopt.kernels.mac_reference import MACRing, mac_decode_step, prefill_entries, threshold
from tests.model_zoo import ZOO


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
    reference = prefill_entries(q, q * 0.5, k, v, 0.25, zero, end, 16, 6, 2)
    for a, b in zip(mine.tensors(), reference.tensors(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_tau_for_radius_inverts_the_threshold():
    assert tau_for_radius(threshold(64, 0.3), 64) == pytest.approx(0.3)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return ZOO["llama"].build()


def test_simulated_decode_is_the_compiled_paths_decode(model):
    """Teacher-forced MAC decode steps of the optimized model (eager backend, reference ops)
    and the simulation from one exact prefill give the same logits, hits and keys read.

    No token repeats: a first layer's pre-RoPE query depends on the token alone, so repeats
    tie at distance 0, and which of them is "nearest" then depends on the last bits of two
    differently computed projections (both choices are valid MAC)."""
    ids = torch.randperm(200, generator=torch.Generator().manual_seed(2))[:81]
    config = macopt.MACConfig(ring_size=16, offset=4, tau=0.2, t_min=0)
    settings = MACCalibration(prefill=64, decode=16, base=config)
    window = exact_window(model, ids, settings)
    configs = dict.fromkeys(window.names, config)
    logits, attention = simulate_decode(model, window, configs, 64)
    optimized = _prepare(model, Method("mac", config))
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
    assert simulated_reads < 0.5


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


def test_nothing_within_target_writes_tau_one(model):
    windows = [torch.randint(0, 200, (97,), generator=torch.Generator().manual_seed(3))]
    settings = MACCalibration(target=-1.0, prefill=80, decode=16, shares=(0.9,), refine=0,
                              families=("global",),
                              base=macopt.MACConfig(ring_size=16, offset=4, t_min=64))
    result = calibrate_mac(model, windows, settings)
    assert result.chosen is None and result.config.tau == 1.0 and result.overrides == {}
