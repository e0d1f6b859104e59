"""Prefill graphs (query length > 1) keep their attention and gain the method's state builder.

A stateful method (MAC: ring entries for the last prompt positions; Top-K+phi: summaries)
has a prefill rewrite (``MethodRewrites.prefill``, found by config type: :mod:`.methods`). It
receives the graph, the site and the :class:`PrefillInputs` built here and returns a node
holding a tensor equal to the attention output, which replaces the output for its users. Returning a
fresh tensor that the graph uses, rather than nothing, keeps dead-code elimination (FX's and
Inductor's) from dropping the op: its effect on the per-site state is invisible to them.
The attention values are untouched, so a prefill rewrite is exact. A float mask fed to the
graph is checked at run time as at decode sites (:mod:`.masks`): rows that fail come out NaN
where asserts are compiled out, rather than build state from a mask that is not a key mask.
"""

from __future__ import annotations

import math

import torch
from torch.fx import Graph, Node

from macopt.config import MethodConfig
from macopt.passes.graph_insert import call, size_arg
from macopt.passes.graph_utils import aten, fake, is_call, static_int, statically_equals
from macopt.passes.key_range import key_range
from macopt.passes.masks import checked_key_mask, key_mask_source
from macopt.passes.method_rewrites import MethodRewrites, PrefillInputs
from macopt.passes.rope import RopeMatch
from macopt.passes.site_checks import kernel_skip_reason, method_skip_reason
from macopt.passes.sites import AttentionSite


def prefill_skip_reason(site: AttentionSite, rope: RopeMatch | None,
                        config: MethodConfig) -> str | None:
    """Why a prefill site cannot gain ``config``'s state builder, or None when it can."""
    if site.output is None:
        return "the site's attention output is not read"
    reason = kernel_skip_reason(site) or method_skip_reason(site, rope, config)
    if reason:
        return reason
    _, reason = _last_query_mask(site)
    return reason


def rewrite_prefill_site(
    graph: Graph, site: AttentionSite, rope: RopeMatch | None, config: MethodConfig,
    rewrites: MethodRewrites, site_id: int,
) -> Node:
    """Feed ``site``'s output through the state builder of ``config``'s method (checked by
    :func:`prefill_skip_reason`); the builder's result replaces the output for its users."""
    users = list(site.output.users)
    with graph.inserting_before(site.output.next):
        inputs = _prefill_inputs(graph, site, rope, site_id)
        out = rewrites.prefill(graph, site, inputs, config)
        if inputs.valid_rows is not None:  # NaN where the mask check failed (masks.py: why)
            rows = call(graph, aten.unsqueeze.default, (inputs.valid_rows, -1), site)
            out = call(graph, aten.where.ScalarOther, (rows, out, math.nan), site)
    for user in users:
        user.replace_input_with(site.output, out)
    return out


def _last_query_mask(site: AttentionSite) -> tuple[Node | None, str | None]:
    """``(mask [Bm,1,Nq,Nk] or boolean [Nq,Nk], or None, None)``, or ``(None, reason)``:
    boolean, or a float graph input to check at run time (:func:`.masks.key_mask_source`). No
    mask is fine only for a causal site with as many queries as keys (SDPA aligns is_causal
    top-left)."""
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
    if val.dim() == 2 and val.dtype == torch.bool:
        # [Nq, Nk], the same for every row and head: what SDPA's math backend builds for
        # is_causal (fp32 on CUDA, e.g.), a broadcast of [1, 1, Nq, Nk].
        return source, None
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
        last_row = call(graph, aten.select.int, (mask, fake(mask).dim() - 2, -1), site)
        flat = call(graph, aten.reshape.default, (last_row, [-1, n_keys]), site)
        row_mask = call(graph, aten.expand.default, (flat, [batch, n_keys]), site)
    first, last = key_range(graph, site, row_mask, batch, n_keys)
    return PrefillInputs(
        out=site.output,
        q=site.q,
        k=_whole_cache(site.k),
        v=_whole_cache(site.v),
        key_starts=first,
        ends=call(graph, aten.add.Tensor, (last, 1), site),
        scale=site.scale if site.scale is not None else 1.0 / math.sqrt(site.head_dim),
        rope=rope,
        site_id=site_id,
        valid_rows=valid_rows,
    )


def _whole_cache(kv: Node) -> Node:
    """The cache behind ``kv[:, :, :C]``: transformers cuts a prompt's keys to its own length
    when it passes SDPA no mask (a prompt into an empty static cache, :mod:`macopt.prompt_mask`).
    The state builders take the whole cache, as with a mask: the key range still ends at the
    prompt's end, and a Top-K + phi state stays sized by the cache, so another prompt length
    does not reallocate it (which CUDA graphs recorded over it would not survive)."""
    if (is_call(kv, aten.slice.Tensor) and len(kv.args) >= 4 and kv.args[1] in (2, -2)
            and kv.args[2] == 0 and (len(kv.args) < 5 or kv.args[4] == 1)
            and fake(kv.args[0]) is not None and fake(kv.args[0]).dim() == 4):
        return kv.args[0]
    return kv
