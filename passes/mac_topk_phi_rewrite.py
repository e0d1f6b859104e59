"""The ``mac_topk_phi`` rewrites: MAC whose misses take a Top-K + phi prefix state
(``macopt::mac_topk_phi_decode``) and its prefill state builder
(``macopt::mac_topk_phi_prefill``), keyed by the site id baked into the graph.

Built from the parts of the two methods' rewrites: MAC's row positions, key starts and pre-RoPE
query lift (:mod:`.mac_rewrite`), Top-K + phi's layer index (:mod:`.topk_phi_rewrite`). A
fractional budget goes to the op as it is, which resolves it against each step's cache length.
"""

from __future__ import annotations

from torch.fx import Graph, Node

from macopt.config import MACTopKPhiConfig
from macopt.mac_topk_phi_ops import (
    MACTopKPhiDecodeParams,
    MACTopKPhiPrefillParams,
    mac_topk_phi_decode,
    mac_topk_phi_prefill,
)
from macopt.passes.graph_insert import call, size_arg
from macopt.passes.graph_utils import fake
from macopt.passes.key_range import key_range
from macopt.passes.mac_rewrite import pre_rope_query
from macopt.passes.method_rewrites import DecodeInputs, MethodRewrites, PrefillInputs
from macopt.passes.sites import AttentionSite
from macopt.passes.topk_phi_rewrite import layer_index


def rewrite_mac_topk_phi(graph: Graph, site: AttentionSite, inputs: DecodeInputs,
                         config: MACTopKPhiConfig) -> Node:
    """Approximate (MAC + Top-K + phi): a hit reuses a recent query's attention as in MAC; a
    miss takes its prefix from Top-K + phi (sinks, retrieved and recent prompt keys exact, the
    rest of the prompt from the feature summary) instead of attending it exactly.

    Row positions and key starts are read from the key mask in the graph; the site's ring and
    summary are found by its site id (a graph constant).
    """
    batch, n_keys = size_arg(graph, site.k, 0, site), size_arg(graph, site.k, 2, site)
    key_starts, positions = key_range(graph, site, inputs.key_mask, batch, n_keys)
    q_pre = pre_rope_query(graph, site, inputs.rope, decode=True,
                           relative=config.mac.radius == "relative")
    args = (inputs.q, q_pre, inputs.k, inputs.v, positions, key_starts, inputs.scale,
            inputs.site_id, *MACTopKPhiDecodeParams.from_config(config).op_args())
    return call(graph, mac_topk_phi_decode.overload, args, site)


def rewrite_mac_topk_phi_prefill(graph: Graph, site: AttentionSite, inputs: PrefillInputs,
                                 config: MACTopKPhiConfig) -> Node:
    """Exact (attention unchanged); also writes the site's MAC ring entries and the Top-K + phi
    summary of each row's prompt middle (ending at least S keys before the prompt's end),
    resetting both for the new sequences."""
    layer = layer_index(site)
    q_pre = pre_rope_query(graph, site, inputs.rope, decode=False,
                           relative=config.mac.radius == "relative")
    params = MACTopKPhiPrefillParams.from_config(config, layer, fake(site.q).shape[1])
    args = (inputs.out, inputs.q, q_pre, inputs.k, inputs.v, inputs.key_starts, inputs.ends,
            inputs.scale, inputs.site_id, layer, *params.op_args())
    return call(graph, mac_topk_phi_prefill.overload, args, site)


REWRITES = MethodRewrites(decode=rewrite_mac_topk_phi, prefill=rewrite_mac_topk_phi_prefill)
