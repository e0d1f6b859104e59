"""The ``exact`` rewrite: decode attention through macopt's split-KV kernel
(``macopt::decode_attention``, :mod:`macopt.exact_ops`). Stateless: prefill graphs are left
alone.
"""

from __future__ import annotations

from torch.fx import Graph, Node

from macopt import exact_ops
from macopt.config import ExactConfig
from macopt.passes.graph_insert import call, size_arg
from macopt.passes.graph_utils import aten
from macopt.passes.key_range import key_range
from macopt.passes.method_rewrites import DecodeInputs, MethodRewrites
from macopt.passes.sites import AttentionSite


def rewrite_exact(graph: Graph, site: AttentionSite, inputs: DecodeInputs,
                  config: ExactConfig) -> Node:
    """Exact by construction: same keys, scale and GQA head map.

    SDPA's mask becomes ``key_mask``, its scale is passed through, and query head h reads KV
    head h // g, as repeat_kv does. With a mask, each row's keys are also bounded by its first
    and last attended key: every attended key lies between them, so the result is the same,
    and the kernel visits the row's context instead of the whole (static) cache.
    """
    starts, ends = inputs.starts, inputs.ends
    if inputs.key_mask is not None:
        n_keys = size_arg(graph, site.k, 2, site)
        batch = size_arg(graph, site.k, 0, site)
        starts, last = key_range(graph, site, inputs.key_mask, batch, n_keys)
        ends = call(graph, aten.add.Tensor, (last, 1), site)
    args = (inputs.q, inputs.k, inputs.v, starts, ends, inputs.key_mask)
    return call(graph, exact_ops.DECODE_ATTENTION, (*args, inputs.scale), site)


REWRITES = MethodRewrites(decode=rewrite_exact, honours_mask_holes=True)
