"""Inserting nodes into post-grad FX graphs: ``call`` (with fake-tensor ``meta["val"]``) and
``size_arg`` (a size as an int when static, else a ``sym_size`` node). Every rewrite builds
its nodes with these; they depend on nothing else in the passes, so any pass may import them.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

from macopt.passes.graph_utils import INSERTED, aten, fake, static_int
from macopt.passes.sites import AttentionSite


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


def size_arg(graph: Graph, node: Node, dim: int, site: AttentionSite) -> int | Node:
    """A size of ``node`` as an int when static, else a ``sym_size`` node (no recompiles)."""
    size = fake(node).shape[dim]
    static = static_int(size)
    if static is not None:
        return static
    return call(graph, aten.sym_size.int, (node, dim), site)
