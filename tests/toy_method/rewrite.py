"""Layer 2, rewrite: the decode site's inputs -> the method's op."""

from __future__ import annotations

from torch.fx import Graph, Node

from macopt.passes.graph_insert import call
from macopt.passes.method_rewrites import DecodeInputs, MethodRewrites
from macopt.passes.sites import AttentionSite

from .config import ToyConfig
from .ops import ToyParams, window_decode


def rewrite_toy(graph: Graph, site: AttentionSite, inputs: DecodeInputs,
                config: ToyConfig) -> Node:
    """Toy: exact attention over each row's last ``window`` keys."""
    args = (inputs.q, inputs.k, inputs.v, inputs.starts, inputs.ends, inputs.key_mask,
            inputs.scale, *ToyParams.from_config(config).op_args())
    return call(graph, window_decode.overload, args, site)


REWRITES = MethodRewrites(decode=rewrite_toy, honours_mask_holes=True)
