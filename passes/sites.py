"""Find attention sites in a post-grad FX graph and normalise each into an ``AttentionSite``.

The aten SDPA variants have different schemas (``attn_mask`` vs ``attn_bias``, tuple outputs);
everything downstream reads the normalised record instead.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from macopt.passes._compat import SDPA_TARGETS, module_ids_in_stack, normalize_function
from macopt.passes.graph_utils import (
    RESHAPE_OPS,
    aten,
    fake,
    is_call,
    static_int,
    statically_equals,
)

# Which output of each op holds the attention result (aten.sdpa returns a bare tensor).
_TUPLE_OUTPUT = {t for t in SDPA_TARGETS if t != aten.scaled_dot_product_attention.default}


@dataclass
class AttentionSite:
    """One SDPA call (or eager softmax attention, ``eager_sites``), normalised. Shapes follow
    SDPA: ``q[B,Hq,S,D]``, ``k/v[B,H,N,D]``."""

    node: Node
    output: Node | None  # the node whose users read the attention output
    extra_outputs_used: bool  # lse or debug outputs read downstream (cannot rewrite)
    q: Node
    k: Node  # un-repeated KV tensor [B,Hkv,N,D]
    v: Node
    attn_mask: Node | None
    scale: float | None
    is_causal: bool
    dropout: float
    gqa_form: str  # "none", "enable_gqa", "repeat_kv" or "native" (the op groups heads)
    group: int | None
    query_len: int | torch.SymInt
    head_dim: int | None
    module_path: str
    module_id: int | None
    module_class: type | None
    unsupported: str | None = None  # why the pattern can never be rewritten (eager sites)
    label: str | None = None  # the op name reports show, when not the node's target

    @property
    def op_name(self) -> str:
        return self.label or self.node.target.name()


def find_attention_sites(graph: Graph) -> list[AttentionSite]:
    """Every SDPA site in ``graph``, in graph order.

    >>> find_attention_sites(torch.fx.Graph())
    []
    """
    return [attention_site(n) for n in graph.nodes if is_call(n, SDPA_TARGETS)]


def attention_site(node: Node) -> AttentionSite:
    """Normalise one SDPA node (any aten variant) into an ``AttentionSite``."""
    bound = normalize_function(
        node.target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True
    ).kwargs
    mask = _unbroadcast(bound.get("attn_mask", bound.get("attn_bias")))
    q, k, v = bound["query"], bound["key"], bound["value"]
    k_base, k_group = unrepeat_kv(k)
    v_base, v_group = unrepeat_kv(v)
    if bound.get("enable_gqa"):
        gqa_form, k_base, v_base = "enable_gqa", k, v
    elif k_group is not None and k_group == v_group and k_group > 1:
        gqa_form = "repeat_kv"
    else:  # the op broadcasts kv heads itself (CPU flash) or there is no grouping
        k_base, v_base = k, v
        gqa_form = "native" if _group(fake(q), fake(k)) not in (None, 1) else "none"
    output, extra_used = _attention_output(node)
    q_val, k_val = fake(q), fake(k_base)
    if "nn_module_stack" not in node.meta:
        # Inductor's attention fusion turns eager softmax patterns (GPT-J's) into SDPA nodes
        # that carry no module stack: take the attention module's from where q, k or v is made.
        made = [n.meta["nn_module_stack"] for n in (q, k, v) if n.meta.get("nn_module_stack")]
        if made:
            node.meta["nn_module_stack"] = made[0]
    stack = module_ids_in_stack(node)
    module_id, module_path, module_class = stack[-1] if stack else (None, "", None)
    return AttentionSite(
        node=node,
        output=output,
        extra_outputs_used=extra_used,
        q=q,
        k=k_base,
        v=v_base,
        attn_mask=mask,
        scale=bound.get("scale"),
        is_causal=bool(bound.get("is_causal", False)),
        dropout=float(bound.get("dropout_p", 0.0)),
        gqa_form=gqa_form,
        group=_group(q_val, k_val),
        query_len=q_val.shape[-2] if q_val is not None else -1,
        head_dim=static_int(q_val.shape[-1]) if q_val is not None else None,
        module_path=module_path,
        module_id=module_id,
        module_class=module_class,
    )


def _unbroadcast(mask: Node | None) -> Node | None:
    """The mask before the broadcasts SDPA's dispatch adds for its fused kernels: on CUDA the
    memory-efficient kernel receives ``expand(mask, [B, H, S, N])`` (per head), and a key axis
    not a multiple of 16 padded and sliced back. Both keep every (row, query, key) value, so
    the site means the same with the mask before them."""
    while isinstance(mask, Node):
        if is_call(mask, aten.expand.default):
            mask = mask.args[0]
        elif _is_unpad(mask):
            mask = mask.args[0].args[0]
        else:
            return mask
    return mask


def _is_unpad(node: Node) -> bool:
    """``slice(constant_pad_nd(x, [0, p]), -1, 0, len(x))``: x's last axis padded, cut back."""
    if not (is_call(node, aten.slice.Tensor)
            and is_call(node.args[0], aten.constant_pad_nd.default)):
        return False
    padded = node.args[0]
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
    x = fake(padded.args[0])
    if x is None or len(padded.args[1]) != 2 or padded.args[1][0] != 0:
        return False
    length = static_int(x.shape[-1])
    return (dim in (-1, x.dim() - 1) and start in (0, None) and step == 1
            and end is not None and static_int(end) is not None and static_int(end) == length)


def unrepeat_kv(node: Node) -> tuple[Node, int | None]:
    """Undo Hugging Face ``repeat_kv``: ``reshape(clone(expand(unsqueeze(x, 2))))``.

    Returns ``(x, group)``, or ``(node, None)`` when ``node`` is not a repeat.
    """
    reshaped = node
    if not is_call(reshaped, RESHAPE_OPS):
        return node, None
    expanded = reshaped.args[0]
    if is_call(expanded, aten.clone.default):
        expanded = expanded.args[0]
    if not is_call(expanded, aten.expand.default):
        return node, None
    unsqueezed = _whole_slice_input(expanded.args[0])
    if not is_call(unsqueezed, aten.unsqueeze.default) or unsqueezed.args[1] not in (2, -3):
        return node, None
    base = unsqueezed.args[0]
    sizes = list(expanded.args[1])
    base_val, out_val = fake(base), fake(node)
    if base_val is None or out_val is None or base_val.dim() != 4 or len(sizes) != 5:
        return node, None
    group = static_int(sizes[2])
    if group is None or static_int(out_val.shape[1]) != static_int(base_val.shape[1]) * group:
        return node, None
    return base, group


def _whole_slice_input(node: Node) -> Node:
    """The input of ``node`` when it slices nothing off (``x[:, :, None, :, :]`` with a
    symbolic key length keeps a ``slice(x, 3, 0, end)`` that static shapes elide), else
    ``node``."""
    if not is_call(node, aten.slice.Tensor) or fake(node) is None:
        return node
    before, after = fake(node.args[0]).shape, fake(node).shape
    same = len(before) == len(after) and all(
        statically_equals(a - b, 0) for a, b in zip(before, after, strict=True))
    return node.args[0] if same else node


def _group(q_val: torch.Tensor | None, k_val: torch.Tensor | None) -> int | None:
    if q_val is None or k_val is None:
        return None
    hq, hk = static_int(q_val.shape[1]), static_int(k_val.shape[1])
    if hq is None or not hk or hq % hk:
        return None
    return hq // hk


def _attention_output(node: Node) -> tuple[Node | None, bool]:
    """The node carrying the attention output, and whether any other output is read."""
    if node.target not in _TUPLE_OUTPUT:
        return node, False
    output, extra_used = None, False
    for user in node.users:
        if is_call(user, operator.getitem) and user.args[1] == 0:
            output = user
        elif user.users or not is_call(user, operator.getitem):
            extra_used = True
    return output, extra_used
