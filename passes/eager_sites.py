"""Find eager softmax attention, ``softmax(q @ k^T * scale + mask) @ v``, in post-grad graphs.

Models that write attention by hand (transformers' ``attn_implementation="eager"``, GPT-J,
plain PyTorch) reach a post-grad graph as decomposed ops: each matmul is a ``bmm`` between
``[B*H, ...]`` reshapes of ``[B, H, ...]`` tensors (with no-op expands and clones), softmax is
``amax/sub/exp/sum/div`` along the last dim (fp32 upcasts around it), ``repeat_kv`` is
expand+clone+reshape, the scale a ``mul``/``div`` by a number on q, on k or on the scores, and
the mask an ``add`` or a ``where`` on the scores.

Each match becomes the same :class:`AttentionSite` an SDPA call gives, so the decode and prefill
rewrites apply unchanged: q ``[B,Hq,S,D]``, un-repeated k/v, the mask in SDPA's convention (an
additive float tensor, or a boolean one where True attends), the scale as a number. Casts are
peeled (they round, they do not change the function) as long as q, k, v and the output end up
in one dtype. A match holding anything macopt cannot prove equivalent (a softcap or any other
op on the scores, a second added term such as an ALiBi bias, a scale that is a tensor, dropout
on the probabilities, ...) is still returned, with ``unsupported`` saying why, so that it is
reported and left untouched.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from macopt.passes._compat import module_ids_in_stack
from macopt.passes.graph_utils import (
    CAST_OPS,
    RESHAPE_OPS,
    aten,
    fake,
    is_call,
    normalized_dim,
    prims,
    static_int,
    statically_equals,
)

# One rule for what masks a key, shared with SDPA masks (fill at or below fp16's minimum).
from macopt.passes.masks import _MASKING_FILL, _scalar
from macopt.passes.sites import AttentionSite, unrepeat_kv

LABEL = "eager_softmax"
_SCALES = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
_COPIES = {aten.clone.default, aten.contiguous.default, aten.alias.default} | CAST_OPS
# Ops dropout leaves in a graph (Inductor registers its random prims only once imported).
_RANDOM = {getattr(ns, name).default for ns, name in (
    (aten, "native_dropout"), (aten, "bernoulli"), (aten, "rand"), (aten, "rand_like"),
    (prims, "inductor_random"), (prims, "inductor_seeds")) if hasattr(ns, name)}
_WHERES = {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf}
_NEGATIONS = {aten.logical_not.default, aten.bitwise_not.default}
_MAX_HOPS = 8  # softmax to the value matmul, and scores back to their matmul


def find_eager_attention_sites(graph: Graph) -> list[AttentionSite]:
    """Every eager softmax attention in ``graph``, in graph order (refused ones included).

    >>> find_eager_attention_sites(torch.fx.Graph())
    []
    """
    sites = []
    for node in graph.nodes:
        scores = softmax_input(node)
        value_matmul = _value_matmul(node) if scores is not None else None
        if value_matmul is not None:
            site = eager_attention_site(node, scores, value_matmul)
            if site is not None:
                sites.append(site)
    return sites


def softmax_input(node: Node) -> Node | None:
    """``x`` when ``node`` is ``softmax(x)`` over the last dim (fused or decomposed), else None."""
    if is_call(node, (aten._softmax.default, aten.softmax.int)):
        x = node.args[0]
        return x if _is_last_dim(x, node.args[1]) else None
    if not is_call(node, aten.div.Tensor) or len(node.args) != 2:
        return None
    exp, total = node.args
    if not (is_call(exp, aten.exp.default) and is_call(total, aten.sum.dim_IntList)):
        return None
    if total.args[0] is not exp or not _keeps_last_dim(total):
        return None
    shifted = exp.args[0]
    if not is_call(shifted, aten.sub.Tensor) or len(shifted.args) != 2:
        return None
    x, peak = shifted.args
    if not is_call(peak, aten.amax.default) or peak.args[0] is not x or not _keeps_last_dim(peak):
        return None
    return x


def _keeps_last_dim(reduction: Node) -> bool:
    """A reduction over exactly the last dim with ``keepdim=True``."""
    dims, keep = reduction.args[1], reduction.args[2] if len(reduction.args) > 2 else False
    keep = reduction.kwargs.get("keepdim", keep)
    return keep and len(dims) == 1 and _is_last_dim(reduction.args[0], dims[0])


def _is_last_dim(x: Node, dim: int) -> bool:
    val = fake(x)
    return val is not None and normalized_dim(dim, val.dim()) == val.dim() - 1


def _value_matmul(probs: Node) -> Node | None:
    """The nearest ``bmm`` downstream of ``probs`` whose first operand derives from them."""
    queue, seen = deque([(probs, 0)]), {probs}
    while queue:
        node, hops = queue.popleft()
        for user in node.users:
            if is_call(user, aten.bmm.default) and user.args[0] is node:
                return user
            if user not in seen and hops < _MAX_HOPS and user.op == "call_function":
                seen.add(user)
                queue.append((user, hops + 1))
    return None


@dataclass
class _Scores:
    """What the walk from the softmax input back to ``q @ k^T`` found."""

    matmul: Node  # the bmm computing q @ k^T
    heads: Node  # its [B, H, S, N] view
    scale: float
    mask: Node | None  # in SDPA's convention: additive float, or boolean (True attends)
    reason: str | None


def eager_attention_site(probs: Node, scores: Node, value_matmul: Node) -> AttentionSite | None:
    """Normalise the eager attention around ``probs = softmax(scores)`` into an AttentionSite;
    None when ``scores`` do not come from a ``q @ k^T`` matmul (not attention)."""
    found = _read_scores(scores)
    if found is None:
        return None
    q, q_scale, q_reason = _matmul_operand(found.matmul.args[0], transposed=False)
    k, k_scale, k_reason = _matmul_operand(found.matmul.args[1], transposed=True)
    v, _, v_reason = _matmul_operand(value_matmul.args[1], transposed=False, scaled=False)
    output, out_reason = _output_heads(value_matmul)
    k_base, k_group = unrepeat_kv(k)
    v_base, v_group = unrepeat_kv(v)
    repeated = k_group is not None and k_group == v_group and k_group > 1
    if not repeated:
        k_base, v_base = k, v
    k_base, v_base = _uncast(k_base), _uncast(v_base)
    reason = (found.reason or q_reason or k_reason or v_reason or out_reason
              or _head_dims_reason(q, v)
              or _probs_reason(value_matmul.args[0], probs, scores)
              or _layout_reason(found.heads, probs, q, k, v, output)
              or _dtype_reason(q, k_base, v_base, output))
    scale = found.scale * q_scale * k_scale
    if reason is None and not (math.isfinite(scale) and scale > 0):
        reason = f"attention scale {scale} is not a positive number"
    node = output if output is not None else value_matmul
    q_val, k_val = fake(q), fake(k_base)
    stack = module_ids_in_stack(node)
    module_id, module_path, module_class = stack[-1] if stack else (None, "", None)
    return AttentionSite(
        node=node,
        output=output,
        extra_outputs_used=False,
        q=q,
        k=k_base,
        v=v_base,
        attn_mask=found.mask,
        scale=scale,
        is_causal=False,
        dropout=0.0,
        gqa_form="repeat_kv" if repeated else "none",
        group=_group(q_val, k_val),
        query_len=q_val.shape[-2] if q_val is not None and q_val.dim() == 4 else -1,
        head_dim=static_int(q_val.shape[-1]) if q_val is not None else None,
        module_path=module_path,
        module_id=module_id,
        module_class=module_class,
        unsupported=reason,
        label=LABEL,
    )


def _read_scores(scores: Node) -> _Scores | None:
    """Walk from the softmax input back to the ``[B,H,S,N]`` view of ``q @ k^T`` and judge
    the ops applied to the scores on the way (outermost first): casts, scales, one mask."""
    chain = _chain_to_matmul(scores)
    if chain is None:
        return None
    *ops, (heads, _) = chain
    scale, mask, reasons, masked, scaled_outside = 1.0, None, [], False, False
    for node, operand in ops:
        if is_call(node, CAST_OPS):
            continue
        if is_call(node, _SCALES):
            factor, reason = _scale_factor(node, operand)
            scale *= factor
            reasons.append(reason)
            scaled_outside = scaled_outside or not masked
            continue
        term, reason = _mask_term(node, operand)
        if term is None and reason is None:
            reasons.append(_unsupported_op_reason(node))
        elif masked:
            # Said first: what the terms are (a mask of either form) matters less than a bias.
            reasons.insert(0, "more than one term added to the scores: a bias besides the "
                              "mask (e.g. ALiBi position bias), which the kernels do not add")
        else:
            mask, masked = term, True
            reasons.append(reason or ("the scores are scaled after the mask is applied"
                                      if scaled_outside else None))
    reason = next((r for r in reasons if r), None)
    return _Scores(heads.args[0], heads, scale, mask, reason)


def _scale_factor(node: Node, operand: int) -> tuple[float, str | None]:
    """``(factor, None)`` when ``node`` multiplies (or divides) the path operand by a number."""
    divides = is_call(node, (aten.div.Tensor, aten.div.Scalar))
    if divides and operand != 0:
        return 1.0, "the scores divide a value (not a scale)"
    factor = _scalar(node.args[1 - operand]) if len(node.args) == 2 else None
    if factor is None or factor == 0:
        return 1.0, "the scores are scaled by a tensor (no static scale)"
    return (1 / factor if divides else factor), None


def _chain_to_matmul(start: Node) -> list[tuple[Node, int]] | None:
    """``[(node, index of the operand on the path), ..., (heads view, 0)]`` from ``start``
    back to a ``[B,H,S,N]`` view of a ``bmm``, through at most ``_MAX_HOPS`` ops."""
    queue = deque([(start, [])])
    while queue:
        node, path = queue.popleft()
        if _is_heads_view_of_bmm(node):
            return [*path, (node, 0)]
        if len(path) >= _MAX_HOPS or not isinstance(node, Node) or node.op != "call_function":
            continue
        for index, arg in enumerate(node.args):
            if isinstance(arg, Node) and fake(arg) is not None:
                queue.append((arg, [*path, (node, index)]))
    return None


def _is_heads_view_of_bmm(node: Node) -> bool:
    """``node`` is a ``[B,H,S,N]`` reshape of ``bmm`` output ``[B*H,S,N]``."""
    if not is_call(node, RESHAPE_OPS) or not is_call(node.args[0], aten.bmm.default):
        return False
    out, flat = fake(node), fake(node.args[0])
    return out is not None and flat is not None and out.dim() == 4 and _merges(out, flat)


def _merges(heads: torch.Tensor, flat: torch.Tensor) -> bool:
    """``flat`` is ``heads`` with its first two dims merged: ``[B*H, X, Y]`` from ``[B,H,X,Y]``."""
    if heads.dim() != 4 or flat.dim() != 3:
        return False
    b, h, x, y = heads.shape
    return all(statically_equals(a - e, 0) for a, e in zip(flat.shape, (b * h, x, y), strict=True))


def _mask_term(node: Node, operand: int) -> tuple[Node | None, str | None]:
    """The mask ``node`` applies to the scores at ``node.args[operand]``: ``(mask, None)`` in
    SDPA's convention, ``(None, reason)`` for a mask it cannot use, ``(None, None)`` when
    ``node`` is not a mask at all."""
    if is_call(node, aten.add.Tensor) and len(node.args) == 2 and not node.kwargs.get("alpha"):
        term = node.args[1 - operand]
        if not isinstance(term, Node):
            return None, "a constant is added to the scores"
        return _float_source(term), None
    if is_call(node, _WHERES) and operand in (1, 2):
        cond, fill = node.args[0], node.args[3 - operand]
        return _where_mask(cond, fill, drop_where_true=operand == 2)
    if is_call(node, aten.masked_fill.Scalar) and operand == 0:
        return _where_mask(node.args[1], node.args[2], drop_where_true=True)
    return None, None


def _float_source(term: Node) -> Node:
    """``term`` with float-to-float casts peeled: a 0/-inf mask stays one in any float dtype."""
    while is_call(term, CAST_OPS) and getattr(fake(term.args[0]), "is_floating_point",
                                              lambda: False)():
        term = term.args[0]
    return term


def _where_mask(cond: Node, fill: object, drop_where_true: bool) -> tuple[Node | None, str | None]:
    """The boolean keep-mask of ``where(cond, scores, fill)`` (or of ``where(cond, fill,
    scores)`` when ``drop_where_true``), if ``fill`` masks a key."""
    value = _scalar(fill)
    if value is None or value > _MASKING_FILL:
        return None, f"the scores are replaced by {value if value is not None else 'a tensor'} " \
                     "where masked (not a masking value such as -inf)"
    if fake(cond) is None or fake(cond).dtype != torch.bool:
        return None, "the mask condition is not a boolean tensor"
    if not drop_where_true:
        return cond, None
    keep = _negated(cond)
    if keep is None:
        return None, "the mask marks the keys to drop and the graph holds no keep-mask to use"
    return keep, None


def _negated(cond: Node) -> Node | None:
    """A boolean node equal to ``~cond`` that the graph already computes, or None."""
    negates = is_call(cond, _NEGATIONS) or (
        is_call(cond, (aten.eq.Scalar, aten.eq.Tensor)) and _scalar(cond.args[1]) == 0)
    source = cond.args[0] if negates else None
    return source if getattr(fake(source), "dtype", None) == torch.bool else None


def _unsupported_op_reason(node: Node) -> str:
    if is_call(node, aten.tanh.default):
        return "attention logit softcap (tanh on the scores)"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{name} applied to the attention scores"


def _matmul_operand(node: Node, transposed: bool, scaled: bool = True
                    ) -> tuple[Node, float, str | None]:
    """``(x, scale, None)`` when the bmm operand ``node`` is ``reshape(x * scale)`` to
    ``[B*H, ...]`` (``x`` transposed in its last two dims when ``transposed``), through no-op
    expands, clones and casts; ``(node, 1.0, reason)`` otherwise."""
    heads = node.args[0] if is_call(node, RESHAPE_OPS) else None
    if heads is None or fake(heads) is None or not _merges(fake(heads), fake(node)):
        return node, 1.0, "a matmul operand is not a [batch, heads, ...] tensor"
    scale, flips = 1.0, 0
    while isinstance(heads, Node):
        if is_call(heads, _COPIES) or _is_noop_expand(heads):
            heads = heads.args[0]
        elif _swaps_last_two(heads):
            heads, flips = heads.args[0], flips + 1
        elif scaled and is_call(heads, _SCALES) and _scalar(heads.args[1]) not in (None, 0):
            factor = _scalar(heads.args[1])
            scale *= factor if is_call(heads, (aten.mul.Tensor, aten.mul.Scalar)) else 1 / factor
            heads = heads.args[0]
        else:
            break
    if flips % 2 != transposed:
        return heads, scale, "the key matmul operand is not a transposed [B,H,N,D] tensor"
    return heads, scale, None


def _is_noop_expand(node: Node) -> bool:
    if not is_call(node, aten.expand.default):
        return False
    src = fake(node.args[0])
    return src is not None and _same_sizes(fake(node).shape, src.shape)


def _swaps_last_two(node: Node) -> bool:
    """A transpose of dims 2 and 3 of a 4-D tensor (``transpose`` or ``permute``)."""
    val = fake(node)
    if val is None or val.dim() != 4:
        return False
    if is_call(node, aten.transpose.int):
        return {normalized_dim(d, 4) for d in node.args[1:3]} == {2, 3}
    if is_call(node, aten.permute.default):
        return [normalized_dim(d, 4) for d in node.args[1]] == [0, 1, 3, 2]
    return False


def _uncast(node: Node) -> Node:
    while is_call(node, CAST_OPS):
        node = node.args[0]
    return node


def _output_heads(value_matmul: Node) -> tuple[Node | None, str | None]:
    """The ``[B,H,S,D]`` view of ``probs @ v`` that the model reads, or a reason."""
    users = list(value_matmul.users)
    if len(users) == 1 and is_call(users[0], RESHAPE_OPS):
        out = fake(users[0])
        if out is not None and out.dim() == 4 and _merges(out, fake(value_matmul)):
            return users[0], None
    return None, "the attention output is not read as [batch, heads, query, dim]"


def _head_dims_reason(q: Node | None, v: Node | None) -> str | None:
    """Multi-head latent attention (MLA) reads v with a head dim other than q/k's: said
    before anything else between the softmax and the value matmul (which follows from it)."""
    q_val, v_val = fake(q), fake(v)
    if q_val is None or v_val is None or q_val.shape[-1] == v_val.shape[-1]:
        return None
    return (f"v head dim {v_val.shape[-1]} differs from the q/k head dim {q_val.shape[-1]} "
            "(the decode kernels need one head dim for q, k and v)")


def _probs_reason(operand: Node, probs: Node, scores: Node) -> str | None:
    """Why the value matmul does not read exactly ``probs``, or None when it does."""
    node = operand.args[0] if is_call(operand, RESHAPE_OPS) else operand
    while is_call(node, _COPIES) or _is_noop_expand(node):
        node = node.args[0]
    if _zeroes_masked_rows(node, probs, scores):
        node = probs
    if node is probs and is_call(operand, RESHAPE_OPS) and _merges(fake(node), fake(operand)):
        return None
    if _touches_random(operand, probs):
        return "attention dropout (training mode) on the probabilities"
    name = getattr(node.target, "__name__", str(node.target)) if isinstance(node, Node) else node
    return f"{name} between the softmax and the value matmul"


def _zeroes_masked_rows(node: Node, probs: Node, scores: Node) -> bool:
    """``node`` is ``where(every score of the row is -inf, 0, probs)``: PyTorch's safe softmax
    (``aten._safe_softmax``, what SDPA's math backend runs, e.g. for fp32 on CUDA), which gives
    0 instead of NaN for a query that may attend no key. That is SDPA's own result for such a
    row, and the one macopt's kernels give, so the match stays exact."""
    if not (is_call(node, aten.where.self) and node.args[2] is probs):
        return False
    zero = node.args[1]
    if is_call(zero, aten.full.default):  # zeros of the probabilities' shape
        zero = zero.args[1]
    if not (is_call(zero, aten.zeros_like.default) or _scalar(zero) == 0):
        return False
    return _all_minus_inf(node.args[0], scores)


def _all_minus_inf(cond: Node, scores: Node) -> bool:
    """``cond`` is "every entry of the row of ``scores`` is -inf" (keepdim, over the last dim):
    ``all(eq(scores, -inf))`` or its decomposition ``not(any(not(eq(scores, -inf))))``."""
    if is_call(cond, aten.all.dim):
        reduced, inner_negated = cond, False
    elif is_call(cond, _NEGATIONS) and is_call(cond.args[0], aten.any.dim):
        reduced, inner_negated = cond.args[0], True
    else:
        return False
    dim = reduced.args[1] if len(reduced.args) > 1 else None
    dim = dim[0] if isinstance(dim, list | tuple) and len(dim) == 1 else dim
    keep = reduced.kwargs.get("keepdim", reduced.args[2] if len(reduced.args) > 2 else False)
    if not (isinstance(dim, int) and keep and _is_last_dim(reduced.args[0], dim)):
        return False
    eq = reduced.args[0]
    if inner_negated:
        if not is_call(eq, _NEGATIONS):
            return False
        eq = eq.args[0]
    return (is_call(eq, aten.eq.Scalar) and _uncast(eq.args[0]) is _uncast(scores)
            and _scalar(eq.args[1]) == float("-inf"))


def _touches_random(start: Node, stop: Node) -> bool:
    """Whether a random op feeds ``start`` within a few hops (not looking past ``stop``)."""
    queue, seen = deque([(start, 0)]), {start}
    while queue:
        node, hops = queue.popleft()
        if is_call(node, _RANDOM):
            return True
        for arg in node.all_input_nodes if node is not stop else ():
            if arg not in seen and hops < _MAX_HOPS:
                seen.add(arg)
                queue.append((arg, hops + 1))
    return False


def _layout_reason(heads: Node, probs: Node, q: Node, k: Node, v: Node, output: Node | None
                   ) -> str | None:
    """Why q, k, v, the probabilities and the output do not line up position by position
    with the ``[B,H,S,N]`` scores (same first two dims, 4-D), or None when they do."""
    vals = [fake(n) for n in (heads, probs, q, k, v)]
    if any(val is None or val.dim() != 4 for val in vals):
        return "q, k or v is not a 4-D [batch, heads, length, dim] tensor"
    scores, probs_val, *rest = vals
    if not _same_sizes(probs_val.shape, scores.shape):
        return "the mask broadcasts the scores to another shape"
    for val in (*rest, fake(output) if output is not None else scores):
        if not _same_sizes(val.shape[:2], scores.shape[:2]):
            return "q, k, v and the scores disagree on batch or heads"
    return None


def _same_sizes(a: torch.Size, b: torch.Size) -> bool:
    return len(a) == len(b) and all(statically_equals(x - y, 0) for x, y in zip(a, b,
                                                                               strict=True))


def _dtype_reason(q: Node, k: Node, v: Node, output: Node | None) -> str | None:
    dtypes = [getattr(fake(n), "dtype", None) for n in (q, k, v, output) if n is not None]
    if len(set(dtypes)) > 1:
        return f"q, k, v and the output differ in dtype ({', '.join(map(str, dtypes))})"
    return None


def _group(q_val: torch.Tensor | None, k_val: torch.Tensor | None) -> int | None:
    if q_val is None or k_val is None or q_val.dim() != 4 or k_val.dim() != 4:
        return None
    hq, hk = static_int(q_val.shape[1]), static_int(k_val.shape[1])
    if hq is None or not hk or hq % hk:
        return None
    return hq // hk
