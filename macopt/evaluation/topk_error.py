"""Top-K (+ phi) attention-output error per layer and query head, on a model's real queries.

Outside the compiled path: one exact forward over a text chunk records every layer's post-RoPE
queries, keys and values (:class:`~macopt.evaluation.capture.AttentionTap`); the chunk's first
``prefill`` tokens are the prompt and each later position ``p`` a decode query over keys
``[0, p]``, as in the harness's perplexity runs. Per layer the site state is built once from
the prompt (:func:`macopt.topk_phi_state.prefill`, the op the compiled prefill runs) and every
decode query goes through :func:`macopt.topk_phi_state.decode` (on CPU: the reference of
:mod:`macopt.kernels.topk_phi_reference`). The error of head ``h`` is the relative L1 of its
outputs against exact attention, ``sum |o - o_exact| / sum |o_exact|`` over queries and dims.

>>> captured = capture(model, chunk_ids)                                   # doctest: +SKIP
>>> output_errors(captured, TopKPhiConfig(budget=0.02), prefill=960, n_keys=1024)
... # doctest: +SKIP
{'mean': 0.03, 'layers': [[0.01, ...], ...]}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from macopt.config import TopKPhiConfig
from macopt.evaluation.capture import AttentionCall, AttentionTap

Tensor = torch.Tensor


@torch.no_grad()
def capture(model: torch.nn.Module, ids: Sequence[int]) -> list[AttentionCall]:
    """Every layer's attention inputs for one exact forward over ``ids`` (no cache)."""
    device = next(model.parameters()).device
    with AttentionTap(model) as tap:
        model(torch.tensor([list(ids)], device=device), use_cache=False)
    return sorted(tap.calls, key=lambda c: c.layer)


def _padded(x: Tensor, n_keys: int) -> Tensor:
    """``x[1, H, N, D]`` zero-padded to ``n_keys`` keys (the harness's cache capacity, which a
    fractional budget is a share of)."""
    return torch.nn.functional.pad(x, (0, 0, 0, max(n_keys - x.shape[2], 0)))


@torch.no_grad()
def output_errors(calls: Sequence[AttentionCall], config: TopKPhiConfig, prefill: int,
                  n_keys: int, queries: int = 16) -> dict:
    """Relative L1 error per layer and query head of ``config``'s decode output against exact
    attention, over ``queries`` decode positions spread over ``[prefill, chunk length)``."""
    from macopt.topk_phi_state import TopKPhiState, decode
    from macopt.topk_phi_state import prefill as build

    layers = []
    for call in calls:
        _, q_heads, length, head_dim = call.q.shape
        k, v = _padded(call.k, n_keys), _padded(call.v, n_keys)
        picks = torch.linspace(prefill, length - 1, min(queries, length - prefill)).round()
        positions = sorted({int(p) for p in picks})
        maps = _site_maps(config, call.layer)
        state = TopKPhiState.allocate(
            1, q_heads, k.shape[1], n_keys, head_dim, k.dtype, k.device, d_phi=config.d_phi,
            page_size=config.page_size if config.selector == "page" else None, maps=maps,
            completion=config.completion_for(call.layer, q_heads), seed=config.seed,
            sketch=config.selector == "sketch")
        start = torch.zeros(1, dtype=torch.int32, device=k.device)
        build(state, k, v, start, start + prefill, config)
        diff = torch.zeros(q_heads)
        norm = torch.zeros(q_heads)
        for p in positions:
            q = call.q[:, :, p]
            end = start + p + 1
            out = decode(state, q, k, v, start, end, call.scale, config).float()
            exact = _exact(q, call.k[:, :, :p + 1], call.v[:, :, :p + 1], call.scale)
            diff += (out - exact).abs().sum(dim=(0, 2)).cpu()
            norm += exact.abs().sum(dim=(0, 2)).cpu()
        layers.append((diff / norm.clamp_min(1e-30)).tolist())
    flat = [e for layer in layers for e in layer]
    return {"mean": sum(flat) / len(flat) if flat else float("nan"), "layers": layers,
            "queries": len(positions) if calls else 0}


@torch.no_grad()
def head_entropy(calls: Sequence[AttentionCall], prefill: int, queries: int = 16) -> list:
    """Mean entropy (nats) of each query head's exact attention, per layer, over the same
    decode positions :func:`output_errors` scores: how spread a head's mass is, which is where
    a Top-K selection leaves the most mass out and a completion has the most to add."""
    layers = []
    for call in calls:
        length = call.q.shape[2]
        picks = torch.linspace(prefill, length - 1, min(queries, length - prefill)).round()
        total = torch.zeros(call.q.shape[1])
        positions = sorted({int(p) for p in picks})
        group = call.q.shape[1] // call.k.shape[1]
        for p in positions:
            k = call.k[:, :, :p + 1].float().repeat_interleave(group, dim=1)
            logits = torch.einsum("bhd,bhnd->bhn", call.q[:, :, p].float(), k) * call.scale
            logp = torch.log_softmax(logits, dim=-1)
            total += -(logp.exp() * logp).sum(-1)[0].cpu()
        layers.append((total / max(len(positions), 1)).tolist())
    return layers


def _exact(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Full attention of ``q[1, Hq, D]`` over ``k, v[1, Hkv, N, D]`` (fp32)."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    weights = torch.softmax(torch.einsum("bhd,bhnd->bhn", q.float(), kf) * scale, dim=-1)
    return torch.einsum("bhn,bhnd->bhd", weights, v.float().repeat_interleave(group, dim=1))


def _site_maps(config: TopKPhiConfig, layer: int):
    """The maps the compiled site would use: the calibrated file's, else None (random
    features seeded by ``config.seed``, which ``TopKPhiState.allocate`` builds)."""
    if not config.feature_maps:
        return None
    from macopt.kernels.feature_maps import load_feature_maps
    from macopt.phi_files import site_name

    return load_feature_maps(config.feature_maps)[site_name(layer)]
