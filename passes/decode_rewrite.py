"""Rewrite decode attention sites (query length statically 1) to a method's decode op.

The method's decode rewrite (found by config type, :mod:`.methods`) receives the graph, the
site and the :class:`DecodeInputs` this module builds (query ``[B,Hq,D]``, un-repeated
``k/v``, ``starts/ends``, ``key_mask``, scale, the lifted RoPE and the site id that keys
per-site state) and returns the node holding ``o[B,Hq,D]``.
"""

from __future__ import annotations

import math

import torch
from torch.fx import Graph, Node

from macopt import exact_ops
from macopt.config import MethodConfig
from macopt.passes.graph_insert import call, size_arg
from macopt.passes.graph_utils import aten, fake, is_call, statically_equals
from macopt.passes.mask_holes import exact_where_holes
from macopt.passes.masks import boolean_key_mask, decode_key_mask
from macopt.passes.method_rewrites import DecodeInputs, MethodRewrites
from macopt.passes.rope import RopeMatch
from macopt.passes.site_checks import kernel_skip_reason, method_skip_reason
from macopt.passes.sites import AttentionSite


def is_decode(site: AttentionSite) -> bool:
    """Whether the query length is provably 1 (from the graph's symbolic shapes)."""
    return statically_equals(site.query_len, 1)


def decode_skip_reason(site: AttentionSite, rope: RopeMatch | None,
                       config: MethodConfig) -> str | None:
    """Why a decode site cannot be rewritten for ``config``, or None when it can."""
    q_val, k_val = fake(site.q), fake(site.k)
    if site.output is None or site.extra_outputs_used:
        return "the site's log-sum-exp or debug outputs are read downstream"
    if site.dropout:
        return f"attention dropout {site.dropout}"
    reason = kernel_skip_reason(site)
    if reason:
        return reason
    if k_val.dtype != q_val.dtype or fake(site.v) is None or fake(site.v).shape != k_val.shape:
        return "k/v dtype or shape differ from q"
    if site.is_causal and not statically_equals(k_val.shape[2], 1):
        # SDPA aligns is_causal top-left: one query then sees key 0 only. Models never mean
        # that in decode, so leave the site as written rather than guess.
        return "is_causal with one query and several keys (SDPA: key 0 only)"
    reason = method_skip_reason(site, rope, config)
    if reason:
        return reason
    _, mask_reason = boolean_key_mask(site)
    return mask_reason


def rewrite_decode_site(
    graph: Graph, site: AttentionSite, rope: RopeMatch | None, config: MethodConfig,
    rewrites: MethodRewrites, site_id: int | None = None,
) -> Node:
    """Replace ``site`` (already checked by :func:`decode_skip_reason`) with the op of
    ``config``'s method, whose ``rewrites`` the registry (:mod:`.methods`) found."""
    with graph.inserting_before(site.node):
        inputs = _decode_inputs(graph, site, rope, site_id)
        out = rewrites.decode(graph, site, inputs, config)
        checked = out
        if not rewrites.honours_mask_holes:
            checked = exact_where_holes(graph, site, inputs, out)
        if inputs.valid_rows is not None:  # NaN where the mask check failed (masks.py: why)
            checked = call(graph, aten.where.ScalarOther, (inputs.valid_rows, checked, math.nan),
                           site)
        out4 = call(graph, aten.unsqueeze.default, (checked, 2), site)
    site.output.replace_all_uses_with(out4)
    if site.output is not site.node:
        graph.erase_node(site.output)
    for user in list(site.node.users):  # unused getitems of the other outputs
        graph.erase_node(user)
    graph.erase_node(site.node)
    return out


def _decode_inputs(
    graph: Graph, site: AttentionSite, rope: RopeMatch | None, site_id: int | None
) -> DecodeInputs:
    q_val = fake(site.q)
    batch, n_keys = size_arg(graph, site.k, 0, site), size_arg(graph, site.k, 2, site)
    device = q_val.device
    mask_source, valid_rows = decode_key_mask(graph, site)
    key_mask = None
    if mask_source is not None:
        flat = call(graph, aten.reshape.default, (mask_source, [-1, n_keys]), site)
        key_mask = call(graph, aten.expand.default, (flat, [batch, n_keys]), site)
    int_kwargs = {"dtype": torch.int32, "device": device}
    return DecodeInputs(
        q=call(graph, aten.squeeze.dim, (site.q, 2), site),
        k=site.k,
        v=site.v,
        starts=call(graph, aten.full.default, ([batch], 0), site, int_kwargs),
        ends=call(graph, aten.full.default, ([batch], n_keys), site, int_kwargs),
        key_mask=key_mask,
        scale=site.scale if site.scale is not None else 1.0 / math.sqrt(site.head_dim),
        rope=rope,
        site_id=site_id,
        valid_rows=valid_rows,
    )


def is_rewritten(node: Node) -> bool:
    return is_call(node, exact_ops.DECODE_ATTENTION)
