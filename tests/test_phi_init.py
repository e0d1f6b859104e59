"""The probe init of the phi maps (macopt.phi_init): centring identity, folded form through the
decode op, the per-head log-mass bias, validation."""

from __future__ import annotations

import math

import pytest
import torch
from model_zoo import ZOO

from macopt.calibrate_phi import CalibrationConfig, CapturedLayer, capture_attention, initial_maps
from macopt.config import TopKPhiConfig
from macopt.kernels import topk_phi_reference as ref
from macopt.kernels.feature_maps import positive_random_features
from macopt.phi_init import (
    centred_maps,
    kmeans,
    log_mass_errors,
    probe_feature_maps,
    query_probes,
)
from macopt.topk_phi_state import TopKPhiState, decode, prefill

SINKS, TAIL = 4, 8


@pytest.fixture(scope="module")
def captured():
    model = ZOO["llama"].build()
    ids = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(0))
    return capture_attention(model, ids)


def _synthetic_layer(norm: float = 6.0, seed: int = 0) -> CapturedLayer:
    """Queries and keys with large norms (as real post-RoPE ones), 2 KV heads of 2 queries."""
    gen = torch.Generator().manual_seed(seed)
    q = norm * torch.randn(2, 4, 160, 16, generator=gen) / 4
    k = norm * torch.randn(2, 2, 160, 16, generator=gen) / 4 + 1.0
    return CapturedLayer(q, k, 16**-0.5)


def test_centring_identity_holds_exactly_in_fp64():
    gen = torch.Generator().manual_seed(0)
    probes = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64) * 3
    mean_keys = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64) * 3
    bias = torch.randn(4, generator=gen, dtype=torch.float64)
    maps = centred_maps(probes, mean_keys, 0.25, group=2, bias=bias)
    q = torch.randn(1, 4, 7, 16, generator=gen, dtype=torch.float64) * 5
    k = torch.randn(1, 2, 9, 16, generator=gen, dtype=torch.float64) * 5
    log_phi_q = maps.phi_q(q)[0]  # [4, 7, F]
    log_phi_k = maps.phi_k(k)[0].repeat_interleave(2, 0)  # [4, 9, F]
    pair = log_phi_q[:, :, None, :] + log_phi_k[:, None, :, :] - bias[:, None, None, None]
    p, c = probes.repeat_interleave(2, 0), mean_keys.repeat_interleave(2, 0)  # [4, F, D]
    qq, kk = q[0], k[0].repeat_interleave(2, 0)
    exact = 0.25 * torch.einsum("hqd,hnd->hqn", qq, kk)[..., None]
    centred = 0.25 * torch.einsum("hqfd,hnfd->hqnf", qq[:, :, None] - p[:, None],
                                  kk[:, :, None] - c[:, None])
    assert maps.phi_q.w_o.dtype == torch.float64
    torch.testing.assert_close(pair, exact - centred, rtol=0, atol=1e-12)


def test_one_probe_is_plain_centring_by_the_mean_query():
    layer = _synthetic_layer()
    probes = query_probes(layer.q, 2, 1, SINKS + TAIL, torch.Generator().manual_seed(0))
    expected = torch.stack([layer.q[:, 2 * h:2 * h + 2, SINKS + TAIL:].reshape(-1, 16).mean(0)
                            for h in range(2)])
    torch.testing.assert_close(probes[:, 0], expected)


def test_kmeans_recovers_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    x = (centres[:, None] + 0.1 * torch.randn(3, 50, 2, generator=gen)).reshape(-1, 2)
    found = kmeans(x, 3, torch.Generator().manual_seed(1))
    distance = torch.cdist(found, centres).amin(dim=0)
    assert float(distance.max()) < 0.1


def test_probe_maps_are_folded_linear_maps_the_decode_op_uses_unchanged(captured):
    maps = initial_maps(captured, CalibrationConfig(d_phi=8, sinks=SINKS, tail=TAIL))["layer.1"]
    folded = maps.phi_q.folded()
    assert not folded.has_mlp and float(folded.sq_norm.abs().max()) == 0.0
    layer = captured[1]
    rows, length = 2, 96
    q, k = layer.q[:, :, -1], layer.k
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(3))
    starts = torch.zeros(rows, dtype=torch.int32)
    ends = torch.full((rows,), length, dtype=torch.int32)
    config = TopKPhiConfig(sinks=SINKS, tail=TAIL, budget=12, selector="exact")
    state = TopKPhiState.allocate(rows, 4, 2, length, 64, torch.float32, "cpu", maps=maps)
    prefill(state, k, v, starts, ends, config)
    out = decode(state, q, k, v, starts, ends, layer.scale, config)
    # The same decode from the unfolded module's features, through the reference.
    mid_start, mid_end = ref.mid_range(starts.long(), ends.long(), SINKS, TAIL)
    log_phi_k = maps.phi_k(k)
    summary = ref.build_summary(v, log_phi_k, mid_start, mid_end)
    selected = ref.exact_topk(q, k, layer.scale, mid_start, mid_end, 12)
    expected = ref.topk_phi_decode(q, k, v, layer.scale, starts, ends, summary, selected,
                                   maps.phi_q(q), log_phi_k)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("margin", [0.0, 1.5])
def test_the_bias_puts_the_calibration_log_mass_error_margin_stds_under_zero(margin):
    layer = _synthetic_layer()
    maps = probe_feature_maps(layer, 4, SINKS, TAIL, margin=margin)
    errors = log_mass_errors(maps, layer, SINKS, TAIL)
    assert errors.shape[1] == 4 and bool(torch.isfinite(errors).all())
    mean, std = errors.mean(0), errors.std(0)
    torch.testing.assert_close(mean, -margin * std, rtol=0, atol=1e-4)
    assert float(std.min()) > 0.01  # the check above is not trivially true


def test_probe_init_estimates_the_unretrieved_mass_far_better_than_random_features():
    layer = _synthetic_layer(norm=8.0)
    probe = probe_feature_maps(layer, 8, SINKS, TAIL, margin=0.0)
    prf = positive_random_features(4, 2, 16, 8, layer.scale, torch.Generator().manual_seed(0))
    probe_error = log_mass_errors(probe, layer, SINKS, TAIL).abs().mean()
    prf_error = log_mass_errors(prf, layer, SINKS, TAIL).abs().mean()
    assert float(probe_error) < 0.5 * float(prf_error), (probe_error, prf_error)


def test_initial_maps_keep_the_random_feature_init_available(captured):
    config = CalibrationConfig(d_phi=8, init="prf", seed=2)
    maps = initial_maps(captured, config)["layer.0"]
    expected = positive_random_features(4, 2, 64, 8, captured[0].scale,
                                        torch.Generator().manual_seed(2))
    torch.testing.assert_close(maps.phi_k.w_o, expected.phi_k.w_o)
    assert float(maps.phi_k.sq_norm[0]) == pytest.approx(captured[0].scale / 2)


@pytest.mark.parametrize("fields, named", [
    ({"init": "pca"}, "init"),
    ({"margin": -1.0}, "margin"),
    ({"margin": math.nan}, "margin"),
    ({"d_phi": 0}, "d_phi"),
    ({"init": "prf", "d_phi": 7}, "even"),
])
def test_calibration_config_rejects_bad_init_settings(fields, named):
    with pytest.raises(ValueError, match=named):
        CalibrationConfig(**fields)


def test_probe_init_rejects_too_short_sequences_and_too_many_probes():
    short = CapturedLayer(torch.randn(1, 4, 12, 16), torch.randn(1, 2, 12, 16), 0.25)
    with pytest.raises(ValueError, match="too short|no middle"):
        probe_feature_maps(short, 2, SINKS, TAIL)
    with pytest.raises(ValueError, match="d_phi 1000"):
        probe_feature_maps(_synthetic_layer(), 1000, SINKS, TAIL)
    with pytest.raises(ValueError, match="margin"):
        probe_feature_maps(_synthetic_layer(), 2, SINKS, TAIL, margin=-0.5)
