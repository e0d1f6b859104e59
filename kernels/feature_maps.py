"""Positive feature maps phi_q, phi_k for the Top-K + phi completion (docs/ALGORITHMS.md,
section 2).

For every head ``h`` of a layer site, with input ``x`` (a post-RoPE query or key, ``[D]``)::

    g0 = W_s x + b_s
    g1 = g0 + alpha * (W2 GELU(W1 g0 + b1) + b2)
    log phi(x) = W_o g1 + b_o - c ||x||^2

Everything downstream works with ``log phi`` (positive by construction, never underflowing
before the max shift). The ``- c ||x||^2`` term extends the paper's form: an MLP cannot
express a squared norm exactly, and positive random features need it (``c`` is learnable and
may be trained to 0).

Parameter-free initialisation (:func:`positive_random_features`): positive random features for
``exp(s q.k)``. With ``w_f ~ N(0, I_D)`` shared by a query head and its KV head,

    log phi(x)[f] = sqrt(s) w_f.x - s ||x||^2 / 2 - log(d_phi) / 2

gives ``E_w <phi_q(q), phi_k(k)> = exp(s q.k)``, the absolute scale the merge needs. The
features come in antithetic pairs ``(w, -w)`` (still unbiased, lower variance). In MLP form:
``W_s = I``, ``b_s = 0``, ``alpha = 0``, ``W_o = sqrt(s) [w_f]``, ``b_o = -log(d_phi)/2``,
``c = s/2``; ``W1``, ``W2`` start small and random so that training can switch alpha on.

Kernels use the :class:`FoldedFeatureMap` form (``W_s`` folded into the other layers), which
is algebraically the same map::

    log phi(x) = A x + a + C GELU(B x + b_in) - c ||x||^2

>>> maps = positive_random_features(n_q_heads=8, n_kv_heads=2, head_dim=64, d_phi=64)
>>> log_phi_q = maps.phi_q(torch.randn(1, 8, 64))        # [B, Hq, d_phi]
>>> log_phi_k = maps.phi_k(torch.randn(1, 2, 100, 64))   # [B, Hkv, N, d_phi]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

Tensor = torch.Tensor


class FoldedFeatureMap(NamedTuple):
    """``log phi(x) = lin_w x + lin_b + out_w GELU(in_w x + in_b) - sq_norm ||x||^2`` per head.

    Shapes (H heads, F = d_phi, E = MLP width, D = head dim): ``lin_w[H, F, D]``,
    ``lin_b[H, F]``, ``in_w[H, E, D]``, ``in_b[H, E]``, ``out_w[H, F, E]`` (alpha folded in),
    ``sq_norm[H]``. ``has_mlp`` is False when every alpha is 0 (kernels then skip the MLP).
    """

    lin_w: Tensor
    lin_b: Tensor
    in_w: Tensor
    in_b: Tensor
    out_w: Tensor
    sq_norm: Tensor
    has_mlp: bool


class FeatureMap(nn.Module):
    """Per-head positive feature maps, batched: parameters are ``[H, ...]`` tensors.

    ``forward(x)`` takes ``x[B, H, *, D]`` (head axis 1, any middle axes) and returns
    ``log phi(x)[B, H, *, d_phi]`` in fp32.
    """

    def __init__(self, n_heads: int, head_dim: int, d_phi: int, width: int | None = None,
                 hidden: int | None = None) -> None:
        super().__init__()
        width = head_dim if width is None else width
        hidden = width if hidden is None else hidden
        self.n_heads, self.head_dim, self.d_phi = n_heads, head_dim, d_phi
        self.w_s = nn.Parameter(torch.zeros(n_heads, width, head_dim))
        self.b_s = nn.Parameter(torch.zeros(n_heads, width))
        self.w_1 = nn.Parameter(torch.zeros(n_heads, hidden, width))
        self.b_1 = nn.Parameter(torch.zeros(n_heads, hidden))
        self.w_2 = nn.Parameter(torch.zeros(n_heads, width, hidden))
        self.b_2 = nn.Parameter(torch.zeros(n_heads, width))
        self.alpha = nn.Parameter(torch.zeros(n_heads))
        self.w_o = nn.Parameter(torch.zeros(n_heads, d_phi, width))
        self.b_o = nn.Parameter(torch.zeros(n_heads, d_phi))
        self.sq_norm = nn.Parameter(torch.zeros(n_heads))

    def forward(self, x: Tensor) -> Tensor:
        """``log phi(x)``: ``x[B, H, *, D]`` -> ``[B, H, *, d_phi]`` (fp32)."""
        if x.dim() < 3 or x.shape[1] != self.n_heads or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"x: expected [batch, {self.n_heads}, ..., {self.head_dim}], got {tuple(x.shape)}"
            )
        flat = x.to(self.w_s.dtype).reshape(x.shape[0], self.n_heads, -1, self.head_dim)
        g0 = _per_head_linear(flat, self.w_s, self.b_s)
        hidden = nn.functional.gelu(_per_head_linear(g0, self.w_1, self.b_1))
        g1 = g0 + self.alpha[None, :, None, None] * _per_head_linear(hidden, self.w_2, self.b_2)
        log_phi = _per_head_linear(g1, self.w_o, self.b_o)
        log_phi = log_phi - self.sq_norm[None, :, None, None] * flat.square().sum(-1, True)
        return log_phi.reshape(*x.shape[:-1], self.d_phi)

    @torch.no_grad()
    def folded(self) -> FoldedFeatureMap:
        """The same map with ``W_s`` folded into the next layers (what the kernels read).

        Reads ``alpha`` on the host: call once after loading, not per decode step.
        """
        alpha = self.alpha[:, None, None]
        w_out = alpha * self.w_o @ self.w_2  # [H, F, E]
        return FoldedFeatureMap(
            lin_w=(self.w_o @ self.w_s).contiguous(),
            lin_b=_matvec(self.w_o, self.b_s + self.alpha[:, None] * self.b_2) + self.b_o,
            in_w=(self.w_1 @ self.w_s).contiguous(),
            in_b=_matvec(self.w_1, self.b_s) + self.b_1,
            out_w=w_out.contiguous(),
            sq_norm=self.sq_norm.detach().clone(),
            has_mlp=bool((self.alpha != 0).any()),
        )


def _per_head_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``x[B, H, M, I] @ weight[H, O, I]^T + bias[H, O]`` -> ``[B, H, M, O]``."""
    return torch.einsum("bhmi,hoi->bhmo", x, weight) + bias[None, :, None, :]


def _matvec(weight: Tensor, vec: Tensor) -> Tensor:
    return torch.einsum("hoi,hi->ho", weight, vec)


def log_features(x: Tensor, folded: FoldedFeatureMap) -> Tensor:
    """``log phi(x)`` from the folded form: ``x[B, H, *, D]`` -> ``[B, H, *, d_phi]`` (fp32)."""
    flat = x.float().reshape(x.shape[0], x.shape[1], -1, x.shape[-1])
    out = _per_head_linear(flat, folded.lin_w, folded.lin_b)
    if folded.has_mlp:
        hidden = nn.functional.gelu(_per_head_linear(flat, folded.in_w, folded.in_b))
        out = out + torch.einsum("bhme,hfe->bhmf", hidden, folded.out_w)
    out = out - folded.sq_norm[None, :, None, None] * flat.square().sum(-1, True)
    return out.reshape(*x.shape[:-1], folded.lin_w.shape[1])


class FeatureMaps(nn.Module):
    """phi_q (one per query head) and phi_k (one per KV head) of one attention site."""

    def __init__(self, n_q_heads: int, n_kv_heads: int, head_dim: int, d_phi: int,
                 width: int | None = None, hidden: int | None = None) -> None:
        super().__init__()
        if n_q_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads {n_kv_heads} must divide n_q_heads {n_q_heads}")
        self.phi_q = FeatureMap(n_q_heads, head_dim, d_phi, width, hidden)
        self.phi_k = FeatureMap(n_kv_heads, head_dim, d_phi, width, hidden)


@torch.no_grad()
def positive_random_features(
    n_q_heads: int, n_kv_heads: int, head_dim: int, d_phi: int, scale: float | None = None,
    generator: torch.Generator | None = None, width: int | None = None,
    hidden: int | None = None,
) -> FeatureMaps:
    """Feature maps initialised so that ``E <phi_q(q), phi_k(k)> = exp(scale q.k)`` (unbiased).

    Query head ``h`` shares its random directions with KV head ``h // g``. ``d_phi`` must be
    even (antithetic pairs). ``width`` must be ``head_dim`` (the default) for this init.
    """
    if d_phi % 2:
        raise ValueError(f"d_phi must be even for antithetic random features, got {d_phi}")
    if width not in (None, head_dim):
        raise ValueError(f"width must equal head_dim ({head_dim}) for this init, got {width}")
    scale = head_dim**-0.5 if scale is None else scale
    maps = FeatureMaps(n_q_heads, n_kv_heads, head_dim, d_phi, width, hidden)
    half = torch.randn(n_kv_heads, d_phi // 2, head_dim, generator=generator)
    directions = torch.cat([half, -half], dim=1) * math.sqrt(scale)
    group = n_q_heads // n_kv_heads
    _init_random_feature_map(maps.phi_k, directions, scale, generator)
    _init_random_feature_map(maps.phi_q, directions.repeat_interleave(group, 0), scale, generator)
    return maps


def _init_random_feature_map(phi: FeatureMap, w_o: Tensor, scale: float,
                             generator: torch.Generator | None) -> None:
    bias = torch.full(phi.b_o.shape, -0.5 * math.log(phi.d_phi))
    set_linear_map(phi, w_o, bias, torch.full(phi.sq_norm.shape, scale / 2), generator)


@torch.no_grad()
def set_linear_map(phi: FeatureMap, weight: Tensor, bias: Tensor, sq_norm: Tensor,
                   generator: torch.Generator | None = None) -> None:
    """Make ``phi`` the map ``log phi(x) = weight x + bias - sq_norm ||x||^2`` (MLP off).

    ``weight[H, d_phi, D]``, ``bias[H, d_phi]``, ``sq_norm[H]``; ``W_s = I`` (``width`` must
    be the head dim). ``alpha = 0`` keeps the MLP off; small random ``W1``/``W2`` give alpha a
    gradient once training starts.
    """
    width, hidden = phi.w_s.shape[1], phi.w_1.shape[1]
    if width != phi.head_dim:
        raise ValueError(f"width must equal head_dim ({phi.head_dim}) for a linear map, "
                         f"got {width}")
    expected = (phi.n_heads, phi.d_phi, phi.head_dim)
    if tuple(weight.shape) != expected or tuple(bias.shape) != expected[:2] or tuple(
            sq_norm.shape) != expected[:1]:
        raise ValueError(f"expected weight {expected}, bias {expected[:2]}, sq_norm "
                         f"{expected[:1]}; got {tuple(weight.shape)}, {tuple(bias.shape)}, "
                         f"{tuple(sq_norm.shape)}")
    phi.w_s.copy_(torch.eye(width).expand_as(phi.w_s))
    phi.b_s.zero_()
    phi.w_1.copy_(torch.randn(phi.w_1.shape, generator=generator) * width**-0.5)
    phi.b_1.zero_()
    phi.w_2.copy_(torch.randn(phi.w_2.shape, generator=generator) * 0.01 * hidden**-0.5)
    phi.b_2.zero_()
    phi.alpha.zero_()
    phi.w_o.copy_(weight)
    phi.b_o.copy_(bias)
    phi.sq_norm.copy_(sq_norm)


def save_feature_maps(maps: dict[str, FeatureMaps], path: str | Path,
                      extra: dict[str, str] | None = None) -> None:
    """Save several sites' maps (keyed by site name) to one safetensors file; ``extra``:
    more string metadata (keys not ending in ``.shape``), e.g. how the maps were made."""
    tensors = {f"{site}.{name}": p.detach().contiguous().cpu()
               for site, m in maps.items() for name, p in m.state_dict().items()}
    metadata = {f"{site}.shape": _shape_tag(m) for site, m in maps.items()}
    save_file(tensors, str(path), metadata={**(extra or {}), **metadata})


def load_feature_maps(path: str | Path, device: torch.device | str = "cpu"
                      ) -> dict[str, FeatureMaps]:
    """Inverse of :func:`save_feature_maps`: rebuilds each site's module from stored shapes."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    tensors = load_file(str(path), device=str(device))
    maps = {}
    for key, tag in metadata.items():
        if not key.endswith(".shape"):  # other metadata (save_feature_maps' extra)
            continue
        site = key.removesuffix(".shape")
        n_q, n_kv, head_dim, d_phi, width, hidden = (int(t) for t in tag.split(","))
        module = FeatureMaps(n_q, n_kv, head_dim, d_phi, width, hidden).to(device)
        prefix = site + "."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                if k.startswith(prefix)})
        maps[site] = module
    return maps


def _shape_tag(maps: FeatureMaps) -> str:
    q, k = maps.phi_q, maps.phi_k
    dims = (q.n_heads, k.n_heads, q.head_dim, q.d_phi, q.w_s.shape[1], q.w_1.shape[1])
    return ",".join(str(d) for d in dims)
