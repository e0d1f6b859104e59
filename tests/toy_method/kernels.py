"""Layer 4, kernels and reference: the math, on tensors only."""

from __future__ import annotations

import torch

from macopt.kernels import reference


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
                     ends: torch.Tensor, key_mask: torch.Tensor | None, scale: float,
                     window: int) -> torch.Tensor:
    """``o[B,Hq,D]`` over row ``b``'s keys ``[max(starts, ends - window), ends)``."""
    if window:
        starts = torch.maximum(starts, ends - window)
    return reference.attention(q, k, v, scale, starts, ends, key_mask)
