"""The ``mac_topk_phi`` rewrites: MAC whose misses take a Top-K + phi prefix state
(``macopt::mac_topk_phi_decode``) and its prefill state builder
(``macopt::mac_topk_phi_prefill``), keyed by the site id baked into the graph.

Built from the parts of the two methods' rewrites: MAC's row positions, key starts and pre-RoPE
query lift (:mod:`.mac_rewrite`), Top-K + phi's layer index (:mod:`.topk_phi_rewrite`). A
fractional budget goes to the op as it is, which resolves it against each step's cache length.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

from macopt.passes.decode_rewrite import DecodeInputs, call, register_decode_rewrite, size_arg
from macopt.passes.graph_utils import fake
from macopt.passes.key_range import key_range
from macopt.passes.mac_rewrite import pre_rope_query
from macopt.passes.prefill_rewrite import PrefillInputs, register_prefill_rewrite
from macopt.passes.sites import AttentionSite
from macopt.passes.topk_phi_rewrite import layer_index


@register_decode_rewrite("mac_topk_phi")
def rewrite_mac_topk_phi(graph: Graph, site: AttentionSite, inputs: DecodeInputs,
                         config: object) -> Node:
    """Approximate (MAC + Top-K + phi): a hit reuses a recent query's attention as in MAC; a
    miss takes its prefix from Top-K + phi (sinks, retrieved and recent prompt keys exact, the
    rest of the prompt from the feature summary) instead of attending it exactly.

    Row positions and key starts are read from the key mask in the graph; the site's ring and
    summary are found by its site id (a graph constant).
    """
    mac, topk = config.mac, config.topk_phi
    budget, fraction = topk.budget_args()  # a fraction: resolved by the op (any cache length)
    batch, n_keys = size_arg(graph, site.k, 0, site), size_arg(graph, site.k, 2, site)
    key_starts, positions = key_range(graph, site, inputs.key_mask, batch, n_keys)
    q_pre = pre_rope_query(graph, site, inputs.rope, decode=True,
                           relative=mac.radius == "relative")
    args = (inputs.q, q_pre, inputs.k, inputs.v, positions, key_starts, inputs.scale,
            inputs.site_id, mac.ring_size, mac.offset, mac.tau, mac.t_min, mac.max_chain_depth,
            mac.batch_capacity or 0, budget, topk.page_size, topk.selector_spec(), fraction)
    return call(graph, torch.ops.macopt.mac_topk_phi_decode.default, args, site)


@register_prefill_rewrite("mac_topk_phi")
def rewrite_mac_topk_phi_prefill(graph: Graph, site: AttentionSite, inputs: PrefillInputs,
                                 config: object) -> Node:
    """Exact (attention unchanged); also writes the site's MAC ring entries and the Top-K + phi
    summary of each row's prompt middle (ending at least S keys before the prompt's end),
    resetting both for the new sequences."""
    mac, topk = config.mac, config.topk_phi
    layer = layer_index(site)
    q_pre = pre_rope_query(graph, site, inputs.rope, decode=False,
                           relative=mac.radius == "relative")
    args = (inputs.out, inputs.q, q_pre, inputs.k, inputs.v, inputs.key_starts, inputs.ends,
            inputs.scale, inputs.site_id, layer, mac.ring_size, mac.offset,
            mac.batch_capacity or 0, topk.sinks, config.summary_tail, topk.page_size,
            topk.selector == "page", topk.d_phi or 0,
            list(topk.completion_for(layer, fake(site.q).shape[1])), topk.feature_maps or "",
            topk.seed, topk.selector == "sketch")
    return call(graph, torch.ops.macopt.mac_topk_phi_prefill.default, args, site)
