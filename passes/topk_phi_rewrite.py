"""The ``topk_phi`` rewrites: Top-K + phi decode (``macopt::topk_phi_site_decode``) and its
prefill summary builder (``macopt::topk_phi_site_prefill``), keyed by the site id.

Row key ranges come from the key mask in the graph (:mod:`.key_range`); the layer index (for
per-layer completion switches and the calibrated maps' site names) from the module.
"""

from __future__ import annotations

import re

from torch.fx import Graph, Node

from macopt.config import TopKPhiConfig
from macopt.passes import scope
from macopt.passes.graph_insert import call, size_arg
from macopt.passes.graph_utils import aten, fake
from macopt.passes.key_range import key_range
from macopt.passes.method_rewrites import DecodeInputs, MethodRewrites, PrefillInputs
from macopt.passes.sites import AttentionSite
from macopt.topk_phi_ops import (
    TopKPhiDecodeParams,
    TopKPhiPrefillParams,
    topk_phi_site_decode,
    topk_phi_site_prefill,
)


def rewrite_topk_phi(graph: Graph, site: AttentionSite, inputs: DecodeInputs,
                     config: TopKPhiConfig) -> Node:
    """Approximate (Top-K + phi): sinks, tail, generated and the budget's retrieved keys are
    attended exactly; the rest of the prompt comes from the prefill's feature summary."""
    batch, n_keys = size_arg(graph, site.k, 0, site), size_arg(graph, site.k, 2, site)
    first, last = key_range(graph, site, inputs.key_mask, batch, n_keys)
    ends = call(graph, aten.add.Tensor, (last, 1), site)
    layer = layer_index(site)
    params = TopKPhiDecodeParams.from_config(config, layer, fake(site.q).shape[1])
    args = (inputs.q, inputs.k, inputs.v, first, ends, inputs.scale, inputs.site_id, layer,
            *params.op_args())
    return call(graph, topk_phi_site_decode.overload, args, site)


def rewrite_topk_phi_prefill(graph: Graph, site: AttentionSite, inputs: PrefillInputs,
                             config: TopKPhiConfig) -> Node:
    """Exact (attention unchanged); also rebuilds the site's feature summary of each row's
    prompt middle (and the selector's page bounds), resetting it for the new sequences."""
    layer = layer_index(site)
    params = TopKPhiPrefillParams.from_config(config, layer, fake(site.q).shape[1])
    args = (inputs.out, inputs.k, inputs.v, inputs.key_starts, inputs.ends, inputs.site_id,
            layer, *params.op_args())
    return call(graph, topk_phi_site_prefill.overload, args, site)


def layer_index(site: AttentionSite) -> int:
    """The attention module's ``layer_idx`` (Hugging Face), else the last number of its
    qualified name, else 0."""
    found = scope.scope_of(site.node)
    if found is not None:
        module, tag = found
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int):
            return index
        numbers = re.findall(r"\d+", tag.qualname)
        if numbers:
            return int(numbers[-1])
    return 0


REWRITES = MethodRewrites(decode=rewrite_topk_phi, prefill=rewrite_topk_phi_prefill)
