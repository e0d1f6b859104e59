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

import weakref
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from macopt.passes.graph_insert import call, size_arg
from macopt.passes.graph_utils import aten, fake, is_call, prims, statically_equals
from macopt.passes.sites import AttentionSite

# Per graph, the ranges computed for each shared mask node (kept off node.meta, which
# graph caches may pickle).
_SHARED: weakref.WeakKeyDictionary[Graph, dict[Node, RowRanges]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class RowRanges:
    """Per batch row of a key mask: ``first, last`` (int32, its first and last attended key),
    ``holes`` (bool: it attends fewer keys than ``[first, last]`` holds) and ``hole_ends``
    (``last + 1`` where it has holes, else ``first``: an empty range)."""

    first: Node
    last: Node
    holes: Node
    hole_ends: Node


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
    ranges = row_ranges(graph, site, key_mask, batch, n_keys)
    return ranges.first, ranges.last


def row_ranges(graph: Graph, site: AttentionSite, key_mask: Node, batch: int | Node,
               n_keys: int | Node) -> RowRanges:
    """:class:`RowRanges` of ``key_mask[B, N]`` (a node). A decode site's mask is the model's
    one mask, read by every layer: its ranges are computed once, before the mask's first
    reader, and shared by every site (one reduction a step, not one a layer)."""
    source = _shared_source(key_mask, batch)
    if source is None:
        return _ranges(graph, site, key_mask, n_keys)
    shared = _SHARED.setdefault(graph, {})
    if source not in shared:
        first_reader = next(n for n in graph.nodes if n in source.users)
        with graph.inserting_before(first_reader):
            width = size_arg(graph, source, fake(source).dim() - 1, site)
            flat = call(graph, aten.reshape.default, (source, [-1, width]), site)
            shared[source] = _ranges(graph, site, flat, width)
    return shared[source]


def _shared_source(key_mask: Node, batch: int | Node) -> Node | None:
    """The model's mask node behind a decode site's ``expand(reshape(mask, [-1, N]), [B, N])``
    when its rows are the batch's (``[B, 1, 1, N]``), else None (ranges computed per site)."""
    if not (is_call(key_mask, aten.expand.default)
            and is_call(key_mask.args[0], aten.reshape.default)):
        return None
    source = key_mask.args[0].args[0]
    shape = fake(source).shape
    if len(shape) != 4 or not statically_equals(shape[1] * shape[2], 1):
        return None
    rows = shape[0]
    same_batch = (rows == batch) if isinstance(batch, int) else (
        fake(batch) is not None and statically_equals(rows - fake(batch), 0))
    return source if same_batch else None


def _ranges(graph: Graph, site: AttentionSite, key_mask: Node, n_keys: int | Node
            ) -> RowRanges:
    int_kwargs = {"dtype": torch.int32, "device": fake(site.q).device}
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
    # A row is one range when it attends exactly last - first + 1 keys.
    attended = call(graph, aten.sum.dim_IntList, (key_mask, [-1]), site, {"dtype": torch.int32})
    after_last = call(graph, aten.add.Tensor, (last, 1), site)
    span = call(graph, aten.sub.Tensor, (after_last, first), site)
    holes = call(graph, aten.ne.Tensor, (attended, span), site)
    hole_ends = call(graph, aten.where.self, (holes, after_last, first), site)
    return RowRanges(first, last, holes, hole_ends)
