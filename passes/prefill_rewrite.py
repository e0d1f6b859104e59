"""Prefill graphs (query length > 1) keep their attention and gain the method's state builder.

A stateful method (MAC: ring entries for the last prompt positions; Top-K+phi: summaries)
plugs in by registering a function under its name in :data:`PREFILL_REWRITES`. It receives
the graph, the site and the :class:`PrefillInputs` built here and returns a node holding a
tensor equal to the attention output, which replaces the output for its users. Returning a
fresh tensor that the graph uses, rather than nothing, keeps dead-code elimination (FX's and
Inductor's) from dropping the op: its effect on the per-site state is invisible to them.
The attention values are untouched, so a prefill rewrite is exact. A float mask fed to the
graph is checked at run time as at decode sites (:mod:`.masks`): rows that fail come out NaN
where asserts are compiled out, rather than build state from a mask that is not a key mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch.fx import Graph, Node

from macopt.kernels.limits import MAX_GQA_GROUP, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
from macopt.passes.decode_rewrite import call, size_arg
from macopt.passes.graph_utils import aten, fake, static_int, statically_equals
from macopt.passes.key_range import key_range
from macopt.passes.masks import checked_key_mask, key_mask_source
from macopt.passes.rope import RopeMatch, pre_rope_heads_dim
from macopt.passes.sites import AttentionSite


@dataclass(frozen=True)
class PrefillInputs:
    """Graph nodes (or Python numbers) for a prefill state builder's arguments."""

    out: Node  # the attention output [B,Hq,N,D]
    q: Node  # post-RoPE queries [B,Hq,N,D]
    k: Node  # un-repeated keys [B,Hkv,Nk,D] (the cache)
    v: Node
    key_starts: Node  # [B] int32: each row's first prompt key (left padding)
    ends: Node  # [B] int32: one past each row's last prompt key
    scale: float
    rope: RopeMatch | None
    site_id: int
    valid_rows: Node | None = None  # [B or 1,1,1]: rows whose float mask passed a run-time check


PrefillRewrite = Callable[[Graph, AttentionSite, PrefillInputs, object], Node]
PREFILL_REWRITES: dict[str, PrefillRewrite] = {}


def register_prefill_rewrite(method: str) -> Callable[[PrefillRewrite], PrefillRewrite]:
    """Register the prefill state builder of ``method`` (a ``MethodConfig.method`` name)."""

    def register(fn: PrefillRewrite) -> PrefillRewrite:
        PREFILL_REWRITES[method] = fn
        return fn

    return register


def prefill_skip_reason(site: AttentionSite, rope: RopeMatch | None, config: object) -> str | None:
    """Why a prefill site cannot gain ``config``'s state builder, or None when it can."""
    q_val, k_val = fake(site.q), fake(site.k)
    if site.output is None:
        return "the site's attention output is not read"
    if site.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head dim {site.head_dim} is not one of {SUPPORTED_HEAD_DIMS}"
    if q_val is None or k_val is None or q_val.dtype not in SUPPORTED_DTYPES:
        return f"dtype {getattr(q_val, 'dtype', None)} is not one of {SUPPORTED_DTYPES}"
    if site.group is None or site.group > MAX_GQA_GROUP:
        return f"GQA group {site.group} (q heads / kv heads) is not supported"
    if config.needs_pre_rope_query and rope is None:
        return f"no RoPE found; method {config.method!r} needs the pre-RoPE query"
    if config.needs_pre_rope_query and pre_rope_heads_dim(rope, site.q) is None:
        return "the pre-RoPE query is neither [B,Hq,S,D] nor [B,S,Hq,D]"
    _, reason = _last_query_mask(site)
    return reason


def rewrite_prefill_site(
    graph: Graph, site: AttentionSite, rope: RopeMatch | None, config: object, site_id: int
) -> Node:
    """Feed ``site``'s output through the method's state builder (checked by
    :func:`prefill_skip_reason`); the builder's result replaces the output for its users."""
    users = list(site.output.users)
    with graph.inserting_before(site.output.next):
        inputs = _prefill_inputs(graph, site, rope, site_id)
        out = PREFILL_REWRITES[config.method](graph, site, inputs, config)
        if inputs.valid_rows is not None:  # NaN where the mask check failed (masks.py: why)
            rows = call(graph, aten.unsqueeze.default, (inputs.valid_rows, -1), site)
            out = call(graph, aten.where.ScalarOther, (rows, out, math.nan), site)
    for user in users:
        user.replace_input_with(site.output, out)
    return out


def _last_query_mask(site: AttentionSite) -> tuple[Node | None, str | None]:
    """``(mask [Bm,1,Nq,Nk] or None, None)``, or ``(None, reason)``: boolean, or a float graph
    input to check at run time (:func:`.masks.key_mask_source`). No mask is fine only for a
    causal site with as many queries as keys (SDPA aligns is_causal top-left)."""
    if site.attn_mask is None:
        q_len, n_keys = fake(site.q).shape[2], fake(site.k).shape[2]
        if site.is_causal and statically_equals(q_len - n_keys, 0):
            return None, None
        if site.is_causal:
            return None, "is_causal with fewer queries than keys (SDPA aligns it top-left)"
        return None, "no attention mask and not causal: not a causal prompt"
    source, reason = key_mask_source(site)
    if source is None:
        return None, reason
    val = fake(source)
    if val.dim() != 4 or static_int(val.shape[1]) != 1:
        return None, f"attention mask of shape {tuple(val.shape)} (expected [B,1,Nq,Nk])"
    if static_int(val.shape[0]) not in (1, static_int(fake(site.q).shape[0])):
        return None, f"attention mask of shape {tuple(val.shape)}: batch differs from q"
    return source, None


def _prefill_inputs(
    graph: Graph, site: AttentionSite, rope: RopeMatch | None, site_id: int
) -> PrefillInputs:
    batch, n_keys = size_arg(graph, site.k, 0, site), size_arg(graph, site.k, 2, site)
    source, _ = _last_query_mask(site)
    mask, valid_rows = checked_key_mask(graph, site, source)
    row_mask = None
    if mask is not None:
        # The last prompt query attends the row's whole prompt: [s0, end).
        last_row = call(graph, aten.select.int, (mask, 2, -1), site)
        flat = call(graph, aten.reshape.default, (last_row, [-1, n_keys]), site)
        row_mask = call(graph, aten.expand.default, (flat, [batch, n_keys]), site)
    first, last = key_range(graph, site, row_mask, batch, n_keys)
    return PrefillInputs(
        out=site.output,
        q=site.q,
        k=site.k,
        v=site.v,
        key_starts=first,
        ends=call(graph, aten.add.Tensor, (last, 1), site),
        scale=site.scale if site.scale is not None else 1.0 / math.sqrt(site.head_dim),
        rope=rope,
        site_id=site_id,
        valid_rows=valid_rows,
    )
