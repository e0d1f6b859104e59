"""Lift the pre-RoPE query: walk back from an attention site's query through its RoPE.

One small matcher per RoPE form, all on decomposed (post-grad) aten graphs:

- ``half``: ``x*cos + cat(-x[..., D/2:], x[..., :D/2])*sin`` (Llama, Qwen, Mistral, ...)
- ``interleaved``: ``x*cos + flatten(stack(-x[..., 1::2], x[..., ::2]))*sin`` (GPT-J)
- ``complex``: ``view_as_real(view_as_complex(x) * freqs)`` (Meta Llama reference code)
- ``partial-<form>``: one of the above on ``x[..., :r]``, concatenated with ``x[..., r:]``
  (GPT-NeoX, Phi)

Add and mul are matched in either operand order; casts (``_to_copy``) and layout ops are
peeled. A q-norm before RoPE (Qwen3, Gemma3) needs nothing special: the walk stops at the
rotation's input, which is the normed query.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node

from macopt.passes.graph_utils import (
    CAST_OPS,
    LAYOUT_OPS,
    RESHAPE_OPS,
    aten,
    fake,
    is_call,
    peel,
    statically_equals,
)
from macopt.passes.graph_utils import static_int as _int

_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class RopeMatch:
    """The RoPE found at a query: its form, the query before it, and how many dims rotate."""

    form: str
    pre_rope_query: Node
    rotary_dims: int


def lift_pre_rope_query(q: Node) -> tuple[RopeMatch | None, str]:
    """``(RopeMatch, "")`` when the query is RoPE-rotated, else ``(None, reason)``."""
    node = peel(q)
    for matcher in (_match_rotation, _match_complex, _match_partial):
        match = matcher(node)
        if match is not None:
            return match, ""
    return None, f"no RoPE pattern at the query (it comes from {_describe(node)})"


def _strip(node: object) -> object:
    """Peel dtype casts only: they do not change which tensor a value is."""
    return peel(node, CAST_OPS) if isinstance(node, Node) else node


def _last_dim_slice(node: object) -> tuple[Node, int, int, int] | None:
    """``(source, start, end, step)`` of a slice along the last dim, ends clamped."""
    if not is_call(node, aten.slice.Tensor):
        return None
    defaults = (None, 0, None, None, 1)  # aten.slice.Tensor(self, dim, start, end, step)
    src, dim, start, end, step = (*node.args, *defaults[len(node.args):])
    src_val = fake(src)
    size = _int(src_val.shape[-1]) if src_val is not None else None
    if size is None or dim not in (-1, src_val.dim() - 1):
        return None
    end = size if end is None or end >= _INT64_MAX else min(end, size)
    return _strip(src), start or 0, end, step


def _half_rotate_source(node: object) -> Node | None:
    """``x`` when ``node`` is ``cat(-x[..., h:], x[..., :h])`` (rotate_half), else None."""
    if not is_call(node, aten.cat.default) or len(node.args[0]) != 2:
        return None
    first, second = node.args[0]
    if not is_call(_strip(first), aten.neg.default):
        return None
    hi, lo = _last_dim_slice(_strip(_strip(first).args[0])), _last_dim_slice(_strip(second))
    if hi is None or lo is None or hi[0] is not lo[0] or hi[3] != 1 or lo[3] != 1:
        return None
    size = _int(fake(hi[0]).shape[-1])
    half = size // 2
    if (lo[1], lo[2], hi[1], hi[2]) != (0, half, half, size):
        return None
    return hi[0]


def _interleave_source(node: object) -> Node | None:
    """``x`` when ``node`` is ``flatten(stack(-x[..., 1::2], x[..., ::2]), -2)`` (GPT-J)."""
    if not is_call(node, RESHAPE_OPS):
        return None
    stacked = node.args[0]
    if not is_call(stacked, aten.cat.default) or len(stacked.args[0]) != 2:
        return None
    parts = [_strip(p) for p in stacked.args[0]]
    if not all(is_call(p, aten.unsqueeze.default) for p in parts):
        return None
    neg, even = (_strip(p.args[0]) for p in parts)
    if not is_call(neg, aten.neg.default):
        return None
    odd, even = _last_dim_slice(_strip(neg.args[0])), _last_dim_slice(even)
    if odd is None or even is None or odd[0] is not even[0]:
        return None
    if (odd[1], odd[3], even[1], even[3]) != (1, 2, 0, 2):
        return None
    return odd[0]


_ROTATIONS = (("half", _half_rotate_source), ("interleaved", _interleave_source))


def _match_rotation(node: Node) -> RopeMatch | None:
    """``x*cos + rotate(x)*sin`` in any operand order, rotate being half or interleaved."""
    if not is_call(node, aten.add.Tensor) or len(node.args) != 2 or node.kwargs.get("alpha"):
        return None
    for plain, rotated in (node.args, node.args[::-1]):
        plain, rotated = _strip(plain), _strip(rotated)
        if not (is_call(plain, aten.mul.Tensor) and is_call(rotated, aten.mul.Tensor)):
            continue
        for operand in rotated.args:
            for form, source in _ROTATIONS:
                x = source(_strip(operand))
                if x is not None and any(_strip(a) is x for a in plain.args):
                    return RopeMatch(form, x, _int(fake(x).shape[-1]))
    return None


def _match_complex(node: Node) -> RopeMatch | None:
    """``view_as_real(view_as_complex(reshape(x)) * freqs)``, flattened back."""
    real = peel(node, RESHAPE_OPS | CAST_OPS)
    if not is_call(real, aten.view_as_real.default):
        return None
    product = real.args[0]
    if not is_call(product, aten.mul.Tensor):
        return None
    for operand in product.args:
        if is_call(operand, aten.view_as_complex.default):
            x = peel(operand.args[0], RESHAPE_OPS | CAST_OPS)
            return RopeMatch("complex", x, _int(fake(x).shape[-1]))
    return None


def _match_partial(node: Node) -> RopeMatch | None:
    """``cat(rope(x[..., :r]), x[..., r:])``: RoPE on the first r dims only."""
    if not is_call(node, aten.cat.default) or len(node.args[0]) != 2:
        return None
    if (node.args[1] if len(node.args) > 1 else 0) not in (-1, fake(node).dim() - 1):
        return None
    rotated, rest = peel(node.args[0][0]), _last_dim_slice(_strip(node.args[0][1]))
    inner = _match_rotation(rotated) or _match_complex(rotated)
    head = _last_dim_slice(inner.pre_rope_query) if inner is not None else None
    if head is None or rest is None or head[0] is not rest[0]:
        return None
    r = inner.rotary_dims
    size = _int(fake(rest[0]).shape[-1])
    if (head[1], head[2], head[3], rest[1], rest[2], rest[3]) != (0, r, 1, r, size, 1):
        return None
    return RopeMatch(f"partial-{inner.form}", rest[0], r)


def _describe(node: Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.name}"


def pre_rope_heads_dim(match: RopeMatch, q: Node) -> int | None:
    """Where the pre-RoPE query keeps its heads: 1 when it is laid out like the site's query
    ``[B, Hq, S, D]``, 2 for ``[B, S, Hq, D]`` (RoPE applied before the head transpose), None
    for any other layout (the site is then left alone). When the shapes cannot tell (Hq = S),
    a head transpose between the rotation and the site decides."""
    pre, post = fake(match.pre_rope_query), fake(q)
    if pre is None or post is None or pre.dim() != 4 or post.dim() != 4:
        return None
    batch, heads, length, dim = post.shape
    as_site = _same_shape(pre.shape, (batch, heads, length, dim))
    swapped = _same_shape(pre.shape, (batch, length, heads, dim))
    if as_site and swapped:
        return 2 if _swaps_heads(q) else 1
    return 1 if as_site else 2 if swapped else None


def _same_shape(shape: tuple, expected: tuple) -> bool:
    return all(statically_equals(a - b, 0) for a, b in zip(shape, expected, strict=True))


def _swaps_heads(q: Node) -> bool:
    """Whether the layout ops between the RoPE output and ``q`` swap dims 1 and 2 (odd count)."""
    swaps, node = 0, q
    while is_call(node, LAYOUT_OPS | CAST_OPS) and isinstance(node.args[0], Node):
        if is_call(node, aten.transpose.int) and {d % 4 for d in node.args[1:3]} == {1, 2}:
            swaps += 1
        if is_call(node, aten.permute.default) and [d % 4 for d in node.args[1]] == [0, 2, 1, 3]:
            swaps += 1
        node = node.args[0]
    return swaps % 2 == 1
