"""Layer 3, ops: the custom op the rewrite inserts, taking the site's typed params."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from macopt.site_params import SiteParams, site_op

from .config import ToyConfig
from .kernels import window_attention

CALLS: list = []  # the ToyParams each decode step received (the test reads them)


@dataclass(frozen=True)
class ToyParams(SiteParams):
    window: int

    @classmethod
    def from_config(cls, config: ToyConfig) -> ToyParams:
        return cls(config.window)


@site_op("macopt_toy::window_decode", ToyParams)
def window_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
                  ends: torch.Tensor, key_mask: torch.Tensor | None, scale: float,
                  params: ToyParams) -> torch.Tensor:
    CALLS.append(params)
    return window_attention(q, k, v, starts, ends, key_mask, scale, params.window).to(q.dtype)


@window_decode.register_fake
def _(q, k, v, starts, ends, key_mask, scale, params):
    return torch.empty_like(q)
