"""The ``mac`` rewrites: MAC-Attention decode (``macopt::mac_match`` then
``macopt::mac_decode_matched``) and its prefill ring builder (``macopt::mac_prefill``), keyed by
the site id baked into the graph.

The decode ops need each row's position ``t`` and key start ``s0`` (from the key mask:
:mod:`.key_range`) and the pre-RoPE query the RoPE lift found, in the site's head layout. The
match is hoisted to right after the pre-RoPE query (with the nodes computing its inputs): it
runs on a side stream on CUDA, beside the layer's K/V projections and RoPE
(:mod:`macopt.side_stream`).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

from macopt.config import MACConfig
from macopt.mac_ops import MACParams, mac_decode_matched, mac_match, mac_prefill
from macopt.passes.graph_insert import call, size_arg
from macopt.passes.graph_utils import aten, fake, hoist, prims
from macopt.passes.key_range import key_range, row_ranges
from macopt.passes.method_rewrites import DecodeInputs, MethodRewrites, PrefillInputs
from macopt.passes.rope import RopeMatch, pre_rope_heads_dim
from macopt.passes.sites import AttentionSite


def rewrite_mac(graph: Graph, site: AttentionSite, inputs: DecodeInputs,
                config: MACConfig) -> Node:
    """Approximate (MAC-Attention): a query close to a recent one reuses its attention over old
    keys; a miss, and every step when tau = 1.0, is exactly full attention. Rows whose key mask
    has holes (e.g. right padding) miss: exact attention over the mask.

    Row positions and key starts are read from the key mask in the graph; the ring of the site
    is found by its site id (a graph constant).
    """
    batch, n_keys = size_arg(graph, site.k, 0, site), size_arg(graph, site.k, 2, site)
    if inputs.key_mask is None:
        key_starts, positions = key_range(graph, site, None, batch, n_keys)
        mask_args = (None, None)
    else:  # rows with holes in the mask: exact over the mask, in MAC's own launches
        ranges = row_ranges(graph, site, inputs.key_mask, batch, n_keys)
        key_starts, positions = ranges.first, ranges.last
        mask_args = (inputs.key_mask, ranges.holes)
    q_pre = pre_rope_query(graph, site, inputs.rope, decode=True,
                           relative=config.radius == "relative")
    params = MACParams.from_config(config)
    match = call(graph, mac_match.overload, (q_pre, positions, key_starts, inputs.site_id,
                                             *params.match().op_args()), site)
    hoist(match)
    candidates = [call(graph, operator.getitem, (match, index), site) for index in range(3)]
    args = (inputs.q, q_pre, inputs.k, inputs.v, positions, key_starts, *candidates,
            *mask_args, inputs.scale, inputs.site_id, *params.op_args())
    return call(graph, mac_decode_matched.overload, args, site)


def rewrite_mac_prefill(
    graph: Graph, site: AttentionSite, inputs: PrefillInputs, config: MACConfig
) -> Node:
    """Exact (attention unchanged); also writes the site's MAC ring entries for the last
    ring-size prompt positions of each row, resetting the ring for the new sequences."""
    q_pre = pre_rope_query(graph, site, inputs.rope, decode=False,
                           relative=config.radius == "relative")
    args = (inputs.out, inputs.q, q_pre, inputs.k, inputs.v, inputs.key_starts, inputs.ends,
            inputs.scale, inputs.site_id, *MACParams.from_config(config).prefill().op_args())
    return call(graph, mac_prefill.overload, args, site)


# Rows with holes in the key mask take exact attention inside MAC's launches (no fallback op:
# its counter memset and extra launch cost ~5 us a layer, BENCHMARKS.md 13a).
REWRITES = MethodRewrites(decode=rewrite_mac, prefill=rewrite_mac_prefill,
                          honours_mask_holes=True)


def pre_rope_query(graph: Graph, site: AttentionSite, rope: RopeMatch, decode: bool,
                   relative: bool = False) -> Node:
    """The pre-RoPE query as ``[B,Hq,D]`` (decode) or ``[B,Hq,N,D]`` (prefill), in the site's
    query dtype (a q-norm may leave it in fp32: the ring stores the query dtype). ``relative``
    (``MACConfig.radius``): each query scaled to norm ``sqrt(D)``, so that the match compares
    directions and ``tau`` means the same on every model."""
    q_pre = rope.pre_rope_query
    if relative:
        q_pre = _unit_rms(graph, site, q_pre)
    if pre_rope_heads_dim(rope, site.q) == 2:  # [B,S,Hq,D]: RoPE before the head transpose
        # permute, not transpose: post-grad graphs are decomposed, and Inductor refuses an
        # aten.transpose.int there ("both a fallback and a decomp").
        q_pre = call(graph, aten.permute.default, (q_pre, [0, 2, 1, 3]), site)
    if decode:
        q_pre = call(graph, aten.squeeze.dim, (q_pre, 2), site)
    dtype = fake(site.q).dtype
    if fake(q_pre).dtype != dtype:
        q_pre = call(graph, prims.convert_element_type.default, (q_pre, dtype), site)
    return q_pre


def _unit_rms(graph: Graph, site: AttentionSite, q_pre: Node) -> Node:
    """``q * rsqrt(mean(q^2) + eps)`` in fp32 (norm ``sqrt(D)``; eps keeps a zero query 0).
    Post-grad ops only (a cast as ``convert_element_type``, a mean as sum times 1/D): Inductor
    refuses ops it has decompositions for there ("both a fallback and a decomp")."""
    x = call(graph, prims.convert_element_type.default, (q_pre, torch.float32), site)
    sum_sq = call(graph, aten.sum.dim_IntList,
                  (call(graph, aten.mul.Tensor, (x, x), site), [-1], True), site)
    mean_sq = call(graph, aten.mul.Tensor, (sum_sq, 1.0 / fake(x).shape[-1]), site)
    inv = call(graph, aten.rsqrt.default, (call(graph, aten.add.Tensor, (mean_sq, 1e-12), site),),
               site)
    return call(graph, aten.mul.Tensor, (x, inv), site)
