"""Small helpers for reading post-grad FX graphs: targets, shapes, peeling layout ops."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.fx import Node

from macopt.passes._compat import statically_known_true

aten = torch.ops.aten
prims = torch.ops.prims

# Ops that move or relabel data without changing values (for walking back to a source).
LAYOUT_OPS = frozenset(
    op
    for op in (
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.permute.default,
        aten.transpose.int,
        aten.t.default,
        aten.clone.default,
        aten.contiguous.default,
        aten.unsqueeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.squeeze.default,
        aten.expand.default,
        aten.alias.default,
    )
)
CAST_OPS = frozenset((aten._to_copy.default, prims.convert_element_type.default))
RESHAPE_OPS = frozenset((aten.view.default, aten.reshape.default, aten._unsafe_view.default))


INSERTED = "macopt_inserted"  # meta flag on every node the passes insert (graph_insert.call)


def hoist(node: Node) -> None:
    """Move ``node`` as early as it may run: right after its latest input, never above a node
    that may write memory (a mutable schema, a module or method call). Inputs the passes
    inserted (:data:`INSERTED`) are hoisted first, so a chain of them moves together; the
    model's own nodes never move. Reads only move earlier past nodes that write nothing, so
    every value read is the one read before."""
    for arg in node.all_input_nodes:
        if arg.meta.get(INSERTED):
            hoist(arg)
    inputs = set(node.all_input_nodes)
    above = node.prev
    while above.op != "root" and above not in inputs and not _may_write(above):
        above = above.prev
    if above is not node.prev:
        above.append(node)


def _may_write(node: Node) -> bool:
    if node.op != "call_function":
        return node.op != "get_attr"  # placeholders, outputs, module and method calls
    schema = getattr(node.target, "_schema", None)  # aten, prims and custom ops
    if schema is not None:
        return schema.is_mutable
    return getattr(node.target, "__module__", None) != "_operator"  # getitem, SymInt math


def is_call(node: object, targets: Iterable[object] | object) -> bool:
    """Whether ``node`` is a call_function node to one of ``targets``."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    if isinstance(targets, (frozenset, set, tuple, list)):
        return node.target in targets
    return node.target == targets


def fake(node: object) -> torch.Tensor | None:
    """The FakeTensor a node produces (``meta["val"]``), or None."""
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def static_int(value: object) -> int | None:
    """``value`` as a Python int when it is statically known (SymInts included), else None."""
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        if expr.is_number:
            return int(expr)
    return None


def statically_equals(value: object, target: int) -> bool:
    """Whether a size is provably ``target`` from the graph's shape environment."""
    if isinstance(value, int):
        return value == target
    return bool(statically_known_true(value == target))


def peel(node: Node, ops: frozenset = LAYOUT_OPS | CAST_OPS) -> Node:
    """Walk back through single-input ``ops`` (views, clones, casts) to the first other node."""
    while is_call(node, ops) and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def normalized_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim
