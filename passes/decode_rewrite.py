"""Rewrite decode attention sites (query length statically 1) to a method's decode op.

A method plugs in by registering a function under its name in :data:`DECODE_REWRITES`; it
receives the graph, the site and the :class:`DecodeInputs` this module builds (query
``[B,Hq,D]``, un-repeated ``k/v``, ``starts/ends``, ``key_mask``, scale, the lifted RoPE and
the site id that keys per-site state) and returns the node holding ``o[B,Hq,D]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from macopt.kernels.limits import MAX_GQA_GROUP, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
from macopt.passes.graph_utils import (
    INSERTED,
    aten,
    fake,
    is_call,
    static_int,
    statically_equals,
)
from macopt.passes.masks import boolean_key_mask, decode_key_mask
from macopt.passes.rope import RopeMatch, pre_rope_heads_dim
from macopt.passes.sites import AttentionSite


@dataclass(frozen=True)
class DecodeInputs:
    """Graph nodes (or Python numbers) for a decode op's arguments."""

    q: Node
    k: Node
    v: Node
    starts: Node
    ends: Node
    key_mask: Node | None
    scale: float
    rope: RopeMatch | None
    site_id: int | None = None  # a graph constant: keys per-site state (stateful methods)
    valid_rows: Node | None = None  # [B or 1,1,1]: rows whose float mask passed a run-time check


DecodeRewrite = Callable[[Graph, AttentionSite, DecodeInputs, object], Node]
DECODE_REWRITES: dict[str, DecodeRewrite] = {}
# Methods whose op reads the whole key mask. The others read each row's keys as one range, so
# their rows with holes in the mask are given exact attention (:mod:`.mask_holes`).
HONOURS_MASK_HOLES: set[str] = set()


def register_decode_rewrite(method: str, honours_mask_holes: bool = False
                            ) -> Callable[[DecodeRewrite], DecodeRewrite]:
    """Register the decode rewrite of ``method`` (a ``MethodConfig.method`` name);
    ``honours_mask_holes``: its op takes the key mask, not only each row's key range."""

    def register(fn: DecodeRewrite) -> DecodeRewrite:
        DECODE_REWRITES[method] = fn
        if honours_mask_holes:
            HONOURS_MASK_HOLES.add(method)
        return fn

    return register


@register_decode_rewrite("exact", honours_mask_holes=True)
def rewrite_exact(graph: Graph, site: AttentionSite, inputs: DecodeInputs, config: object) -> Node:
    """Exact by construction: same keys, scale and GQA head map.

    SDPA's mask becomes ``key_mask``, its scale is passed through, and query head h reads KV
    head h // g, as repeat_kv does. With a mask, each row's keys are also bounded by its first
    and last attended key: every attended key lies between them, so the result is the same,
    and the kernel visits the row's context instead of the whole (static) cache.
    """
    from macopt.passes.key_range import key_range  # built on this module's helpers

    starts, ends = inputs.starts, inputs.ends
    if inputs.key_mask is not None:
        n_keys = size_arg(graph, site.k, 2, site)
        batch = size_arg(graph, site.k, 0, site)
        starts, last = key_range(graph, site, inputs.key_mask, batch, n_keys)
        ends = call(graph, aten.add.Tensor, (last, 1), site)
    args = (inputs.q, inputs.k, inputs.v, starts, ends, inputs.key_mask)
    return call(graph, torch.ops.macopt.decode_attention.default, (*args, inputs.scale), site)


def is_decode(site: AttentionSite) -> bool:
    """Whether the query length is provably 1 (from the graph's symbolic shapes)."""
    return statically_equals(site.query_len, 1)


def decode_skip_reason(site: AttentionSite, rope: RopeMatch | None, config: object) -> str | None:
    """Why a decode site cannot be rewritten for ``config``, or None when it can."""
    q_val, k_val = fake(site.q), fake(site.k)
    if site.output is None or site.extra_outputs_used:
        return "the site's log-sum-exp or debug outputs are read downstream"
    if site.dropout:
        return f"attention dropout {site.dropout}"
    if site.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head dim {site.head_dim} is not one of {SUPPORTED_HEAD_DIMS}"
    if q_val is None or k_val is None or q_val.dtype not in SUPPORTED_DTYPES:
        return f"dtype {getattr(q_val, 'dtype', None)} is not one of {SUPPORTED_DTYPES}"
    if k_val.dtype != q_val.dtype or fake(site.v) is None or fake(site.v).shape != k_val.shape:
        return "k/v dtype or shape differ from q"
    if site.is_causal and not statically_equals(k_val.shape[2], 1):
        # SDPA aligns is_causal top-left: one query then sees key 0 only. Models never mean
        # that in decode, so leave the site as written rather than guess.
        return "is_causal with one query and several keys (SDPA: key 0 only)"
    if site.group is None or site.group > MAX_GQA_GROUP:
        return f"GQA group {site.group} (q heads / kv heads) is not supported"
    if config.needs_pre_rope_query and rope is None:
        return f"no RoPE found; method {config.method!r} needs the pre-RoPE query"
    if config.needs_pre_rope_query and pre_rope_heads_dim(rope, site.q) is None:
        return "the pre-RoPE query is neither [B,Hq,S,D] nor [B,S,Hq,D]"
    if config.method not in DECODE_REWRITES:
        return f"no decode rewrite registered for method {config.method!r}"
    _, mask_reason = boolean_key_mask(site)
    return mask_reason


def rewrite_decode_site(
    graph: Graph, site: AttentionSite, rope: RopeMatch | None, config: object,
    site_id: int | None = None,
) -> Node:
    """Replace ``site`` (already checked by :func:`decode_skip_reason`) with the method's op."""
    with graph.inserting_before(site.node):
        inputs = _decode_inputs(graph, site, rope, site_id)
        out = DECODE_REWRITES[config.method](graph, site, inputs, config)
        checked = out
        if config.method not in HONOURS_MASK_HOLES:
            from macopt.passes.mask_holes import exact_where_holes  # imports this module

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


def size_arg(graph: Graph, node: Node, dim: int, site: AttentionSite) -> int | Node:
    """A size of ``node`` as an int when static, else a ``sym_size`` node (no recompiles)."""
    size = fake(node).shape[dim]
    static = static_int(size)
    if static is not None:
        return static
    return call(graph, aten.sym_size.int, (node, dim), site)


def call(
    graph: Graph, target: object, args: tuple, site: AttentionSite, kwargs: dict | None = None
) -> Node:
    """Insert ``target(*args)`` with ``meta["val"]`` from fake-tensor propagation."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    node.meta[INSERTED] = True
    fake_mode = fake(site.q).fake_mode

    def val(a: object) -> object:
        return a.meta["val"] if isinstance(a, Node) else a

    vals = torch.fx.node.map_aggregate(args, val)
    kw_vals = torch.fx.node.map_aggregate(kwargs, val)
    with fake_mode:
        node.meta["val"] = target(*vals, **kw_vals)
    for key in ("nn_module_stack", "stack_trace"):
        if key in site.node.meta:
            node.meta[key] = site.node.meta[key]
    return node


def is_rewritten(node: Node) -> bool:
    return is_call(node, torch.ops.macopt.decode_attention.default)
