"""Random Top-K + phi decode problems shared by the reference and kernel tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from macopt.kernels import topk_phi_reference as ref
from macopt.kernels.feature_maps import FeatureMaps, positive_random_features

Tensor = torch.Tensor


@dataclass
class Problem:
    """One decode step: cache, per-row ranges (left padding, generated tokens), feature maps."""

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    starts: Tensor
    prefill_ends: Tensor
    ends: Tensor
    mid_start: Tensor
    mid_end: Tensor
    maps: FeatureMaps

    def log_phi(self) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return self.maps.phi_q(self.q), self.maps.phi_k(self.k)

    def summary(self) -> ref.PhiSummary:
        return ref.build_summary(self.v, self.log_phi()[1], self.mid_start, self.mid_end,
                                 compute_dtype=torch.float64)


def make_problem(
    batch: int = 2, n_q_heads: int = 4, n_kv_heads: int = 2, n_keys: int = 96,
    head_dim: int = 16, d_phi: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32,
    n_sink: int = 4, n_tail: int = 8, n_generated: int = 3, lengths: list[int] | None = None,
    device: torch.device | str = "cpu",
) -> Problem:
    """Rows are left padded to ``n_keys``: row b's prompt is ``lengths[b]`` keys long, followed
    by ``n_generated`` decoded keys (the last of which is the current one).

    Everything is drawn on the CPU from one seeded generator, then moved to ``device``: the
    same seed gives the same problem on every device."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_q_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, n_kv_heads, n_keys, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, n_kv_heads, n_keys, head_dim, generator=gen).to(dtype)
    if lengths is None:
        lengths = [n_keys - n_generated - 7 * b for b in range(batch)]
    ends = torch.full((batch,), n_keys, dtype=torch.int32)
    starts = ends - n_generated - torch.tensor(lengths, dtype=torch.int32)
    prefill_ends = ends - n_generated
    mid_start, mid_end = ref.mid_range(starts, prefill_ends, n_sink, n_tail)
    scale = head_dim**-0.5
    maps = positive_random_features(n_q_heads, n_kv_heads, head_dim, d_phi, scale, gen)
    q, k, v, starts, prefill_ends, ends, mid_start, mid_end = (
        x.to(device) for x in (q, k, v, starts, prefill_ends, ends, mid_start, mid_end))
    return Problem(q, k, v, scale, starts, prefill_ends, ends, mid_start, mid_end, maps.to(device))
