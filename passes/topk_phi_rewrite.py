"""The ``topk_phi`` rewrites: Top-K + phi decode (``macopt::topk_phi_site_decode``) and its
prefill summary builder (``macopt::topk_phi_site_prefill``), keyed by the site id.

Row key ranges come from the key mask in the graph (:mod:`.key_range`); the layer index (for
per-layer completion switches and the calibrated maps' site names) from the module.
"""

from __future__ import annotations

import re

import torch
from torch.fx import Graph, Node

from macopt.passes import scope
from macopt.passes.decode_rewrite import DecodeInputs, call, register_decode_rewrite, size_arg
from macopt.passes.graph_utils import aten, fake
from macopt.passes.key_range import key_range
from macopt.passes.prefill_rewrite import PrefillInputs, register_prefill_rewrite
from macopt.passes.sites import AttentionSite


@register_decode_rewrite("topk_phi")
def rewrite_topk_phi(graph: Graph, site: AttentionSite, inputs: DecodeInputs,
                     config: object) -> Node:
    """Approximate (Top-K + phi): sinks, tail, generated and the budget's retrieved keys are
    attended exactly; the rest of the prompt comes from the prefill's feature summary."""
    batch, n_keys = size_arg(graph, site.k, 0, site), size_arg(graph, site.k, 2, site)
    first, last = key_range(graph, site, inputs.key_mask, batch, n_keys)
    ends = call(graph, aten.add.Tensor, (last, 1), site)
    layer = layer_index(site)
    budget, fraction = config.budget_args()  # a fraction: resolved by the op (any cache length)
    args = (inputs.q, inputs.k, inputs.v, first, ends, inputs.scale, inputs.site_id, layer,
            budget, config.page_size, config.selector_spec(), config.d_phi or 0,
            list(config.completion_for(layer, fake(site.q).shape[1])),
            config.feature_maps or "", config.seed, config.summary_in_budget, fraction)
    return call(graph, torch.ops.macopt.topk_phi_site_decode.default, args, site)


@register_prefill_rewrite("topk_phi")
def rewrite_topk_phi_prefill(graph: Graph, site: AttentionSite, inputs: PrefillInputs,
                             config: object) -> Node:
    """Exact (attention unchanged); also rebuilds the site's feature summary of each row's
    prompt middle (and the selector's page bounds), resetting it for the new sequences."""
    layer = layer_index(site)
    args = (inputs.out, inputs.k, inputs.v, inputs.key_starts, inputs.ends, inputs.site_id,
            layer, config.sinks, config.tail, config.page_size, config.selector == "page",
            config.d_phi or 0, list(config.completion_for(layer, fake(site.q).shape[1])),
            config.feature_maps or "", config.seed, config.selector == "sketch")
    return call(graph, torch.ops.macopt.topk_phi_site_prefill.default, args, site)


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

