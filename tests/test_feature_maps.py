"""Feature maps phi_q / phi_k: shapes, folded form, the random-feature init, safetensors I/O."""

import torch

from macopt.kernels.feature_maps import (
    FeatureMaps,
    load_feature_maps,
    log_features,
    positive_random_features,
    save_feature_maps,
)


def _randomise(maps: FeatureMaps, seed: int) -> FeatureMaps:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in maps.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return maps


def test_log_phi_has_the_input_shape_with_d_phi_features():
    maps = FeatureMaps(n_q_heads=4, n_kv_heads=2, head_dim=8, d_phi=6, hidden=5)
    assert maps.phi_q(torch.randn(3, 4, 8)).shape == (3, 4, 6)
    assert maps.phi_k(torch.randn(3, 2, 11, 8)).shape == (3, 2, 11, 6)


def test_folded_form_equals_the_mlp_form():
    maps = _randomise(FeatureMaps(4, 2, head_dim=8, d_phi=6, width=7, hidden=5), seed=1)
    x = torch.randn(2, 2, 9, 8)
    folded = maps.phi_k.folded()
    assert folded.has_mlp
    torch.testing.assert_close(log_features(x, folded), maps.phi_k(x), rtol=1e-5, atol=1e-5)


def test_folded_form_skips_the_mlp_when_alpha_is_zero():
    maps = positive_random_features(4, 2, head_dim=8, d_phi=6)
    folded = maps.phi_q.folded()
    assert not folded.has_mlp
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(log_features(x, folded), maps.phi_q(x), rtol=1e-5, atol=1e-5)


def test_query_heads_share_random_directions_with_their_kv_head():
    maps = positive_random_features(n_q_heads=8, n_kv_heads=2, head_dim=8, d_phi=6)
    for h in range(8):
        torch.testing.assert_close(maps.phi_q.w_o[h], maps.phi_k.w_o[h // 4])


def _kernel_estimates(maps: FeatureMaps, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per antithetic pair f: phi_q[f] phi_k[f] + phi_q[f'] phi_k[f'], times d_phi / 2."""
    with torch.no_grad():
        prod = torch.exp(maps.phi_q(q[None, None]) + maps.phi_k(k[None, None]))[0, 0]
    half = prod.shape[-1] // 2
    return (prod[:half] + prod[half:]) * half  # i.i.d. samples, each with mean <phi_q, phi_k>


def _z_scores(maps: FeatureMaps, pairs) -> list[float]:
    scores = []
    for q, k in pairs:
        samples = _kernel_estimates(maps, q, k)
        target = torch.exp((q @ k) * 8**-0.5)
        std_err = samples.std() / samples.numel() ** 0.5
        scores.append(float((samples.mean() - target) / std_err))
    return scores


def _pairs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, generator=gen) * 0.7, torch.randn(8, generator=gen) * 0.7)
            for _ in range(6)]


def test_positive_random_features_estimate_exp_scaled_dot_product_unbiasedly():
    gen = torch.Generator().manual_seed(0)
    maps = positive_random_features(1, 1, head_dim=8, d_phi=40_000, generator=gen)
    z = _z_scores(maps, _pairs(seed=1))
    assert max(abs(s) for s in z) < 4.0, z


def test_the_unbiasedness_check_detects_a_missing_norm_term():
    gen = torch.Generator().manual_seed(0)
    maps = positive_random_features(1, 1, head_dim=8, d_phi=40_000, generator=gen)
    with torch.no_grad():
        maps.phi_k.sq_norm.zero_()
    z = _z_scores(maps, _pairs(seed=1))
    assert max(abs(s) for s in z) > 4.0, z


def test_alpha_gets_a_gradient_from_the_initialisation():
    gen = torch.Generator().manual_seed(0)
    maps = positive_random_features(2, 1, head_dim=8, d_phi=4, generator=gen)
    log_phi = maps.phi_q(torch.randn(3, 2, 8, generator=gen))
    # A plain sum cancels over the antithetic (w, -w) feature pairs: weight the features.
    (log_phi * torch.randn(log_phi.shape, generator=gen)).sum().backward()
    assert maps.phi_q.alpha.grad.abs().min() > 1e-6


def test_safetensors_round_trip_restores_every_site(tmp_path):
    sites = {"layers.0.attn": _randomise(FeatureMaps(4, 2, 8, 6, hidden=5), 2),
             "layers.10.attn": _randomise(FeatureMaps(2, 2, 8, 4), 3)}
    path = tmp_path / "phi.safetensors"
    save_feature_maps(sites, path)
    loaded = load_feature_maps(path)
    assert loaded.keys() == sites.keys()
    for name, maps in sites.items():
        for key, value in maps.state_dict().items():
            torch.testing.assert_close(loaded[name].state_dict()[key], value, rtol=0, atol=0)
