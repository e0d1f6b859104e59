"""Each row's attended key range ``[first, last]`` as graph tensors, read from its key mask.

Stateful methods need a row's current position ``t`` (its last attended key: the key of the
token being decoded) and its key start ``s0`` (left padding). Both come from the mask with
aten ops inserted in the graph, so they are device tensors of every step, never Python ints
(an int would be baked into the graph and recompile it every token). The methods assume the
attended keys are contiguous, ``[s0, t]``: a causal mask with left padding (sliding-window
modules are left untouched before this). Rows whose mask has holes (right padding) are given
exact attention by the decode rewrite instead (:mod:`.mask_holes`).
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

from macopt.passes.graph_insert import call
from macopt.passes.graph_utils import aten, fake, prims
from macopt.passes.sites import AttentionSite


def key_range(
    graph: Graph, site: AttentionSite, key_mask: Node | None, batch: int | Node,
    n_keys: int | Node,
) -> tuple[Node, Node]:
    """``(first[B], last[B])`` int32 nodes: the first and last True of ``key_mask[B, N]``, or
    ``(0, N - 1)`` for every row when there is no mask (every key attended)."""
    int_kwargs = {"dtype": torch.int32, "device": fake(site.q).device}
    if key_mask is None:
        first = call(graph, aten.full.default, ([batch], 0), site, int_kwargs)
        last = call(graph, aten.full.default, ([batch], n_keys), site, int_kwargs)
        return first, call(graph, aten.sub.Tensor, (last, 1), site)
    # prims.iota: what arange decomposes to (Inductor lowers it; aten.arange it refuses).
    iota_kwargs = dict(int_kwargs, start=0, step=1, requires_grad=False)
    index = call(graph, prims.iota.default, (n_keys,), site, iota_kwargs)
    # The reductions run on fp32 positions (exact below 2^24 keys): on integer positions
    # Inductor's Triton code mixes the int64 index with an int32 accumulator under dynamic
    # lengths, which fails to compile on the GPU ("loop-carried variable ... int32 ... int64").
    index = call(graph, prims.convert_element_type.default, (index, torch.float32), site)
    before_all = call(graph, aten.where.ScalarOther, (key_mask, index, -1.0), site)
    # n_keys as a tensor: Inductor cannot lower where.ScalarOther whose scalar is a symbol
    # (a dynamic cache length), which crashed compiled forwards without a cache.
    past_end = call(graph, aten.full.default, ([], n_keys), site,
                    dict(int_kwargs, dtype=torch.float32))
    after_all = call(graph, aten.where.self, (key_mask, index, past_end), site)
    last, first = (call(graph, prims.convert_element_type.default, (
        call(graph, reduce, (x, [-1]), site), torch.int32), site)
        for reduce, x in ((aten.amax.default, before_all), (aten.amin.default, after_all)))
    return first, last
