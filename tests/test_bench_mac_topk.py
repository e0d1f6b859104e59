"""``profile_steps mac-topk``'s variants at a tiny size on CPU (Triton interpreted): each runs,
the forced hit rates hold in the composed step, and an all-hit composed step is MAC alone."""

from __future__ import annotations

import pytest
import torch

from examples.research.mac_topk import mac_topk_variants
from macopt.bench import mac as bench_mac
from macopt.kernels.feature_maps import positive_random_features

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def outputs():
    config = bench_mac.MACBenchConfig(device=DEVICE, q_heads=4, kv_heads=2, head_dim=64,
                                      dtype=torch.float32)
    layer = bench_mac.make_layer(config, batch=2, context=256)
    maps = positive_random_features(4, 2, 64, 16, generator=torch.Generator().manual_seed(0))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MACOPT_CPU_KERNELS", "triton")
        variants = mac_topk_variants(layer, maps.to(DEVICE), budget=32, ring_size=16, offset=8,
                                     page_size=16)
        return {name: step() for name, step in variants}


def test_every_variant_runs_and_is_finite(outputs):
    assert list(outputs) == [
        "exact", "topk_phi 32", "mac h1.0", "mac+topk h1.0",
        "mac h0.95", "mac+topk h0.95", "mac+topk h0.95 uncounted",
        "mac h0.0", "mac+topk h0.0"]
    for name, out in outputs.items():
        o = out[0] if isinstance(out, tuple) else out
        assert torch.isfinite(o).all(), name


@pytest.mark.parametrize("rate", [1.0, 0.95, 0.0])
def test_the_composed_step_hits_at_the_forced_rate(outputs, rate):
    _, hit, _ = outputs[f"mac+topk h{rate}"]
    assert abs(hit.float().mean().item() - rate) <= 1 / hit.numel()


def test_an_all_hit_composed_step_is_mac_alone(outputs):
    mac_o, mac_hit, mac_keys = outputs["mac h1.0"]
    o, hit, keys = outputs["mac+topk h1.0"]
    assert torch.equal(hit, mac_hit) and torch.equal(keys, mac_keys)
    torch.testing.assert_close(o, mac_o, atol=0, rtol=0)


def test_a_miss_reads_far_fewer_keys_than_mac_alone(outputs):
    _, _, mac_keys = outputs["mac h0.0"]
    _, _, keys = outputs["mac+topk h0.0"]
    assert (keys < mac_keys / 2).all()  # 32 retrieved + sinks + tail vs all 256 keys
