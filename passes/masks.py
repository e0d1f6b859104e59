"""Turn an SDPA attention mask into a boolean key mask ``[B or 1, N]`` (True = attend).

Only masks that select keys are accepted: boolean masks, float masks built as ``where(bool, 0,
-inf or a huge negative)`` (what aten does to boolean masks on CPU, and what Hugging Face
builds), and float masks that enter the graph as an input at transformers attention modules,
whose values are then checked at run time (:func:`checked_key_mask`), at decode and prefill
sites alike. Any other additive mask could shift scores, so the site is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.fx import Graph, Node

from macopt.passes.graph_insert import call
from macopt.passes.graph_utils import CAST_OPS, LAYOUT_OPS, aten, fake, is_call, peel, static_int
from macopt.passes.sites import AttentionSite

# A fill at or below fp16's most negative value (finfo(fp16).min, the least any framework
# uses; -inf included) makes exp(score + fill - max) exactly 0 for any realistic score,
# unless a whole row is masked (which a decode row never is: it attends its own key).
_MASKING_FILL = -65504.0

# Float masks checked at run time. Which values drop a key: key j gets weight exactly 0 in
# softmax(s + m) when exp(s_j + m_j - max_i(s_i + m_i)) underflows, i.e. (an fp32 softmax, as
# every model here computes it) s_j + m_j - max < -104. -inf does that for any finite scores;
# no finite value does for arbitrary finite scores (fp32 scores can be 6.8e38 apart), so no
# threshold is safe in general. The check accepts exactly 0, -inf and finfo(mask dtype).min,
# the value transformers writes (anything at or below it is one of the last two). With those
# the rewrite computes what transformers' boolean (SDPA) path computes for the same mask, and
# what its eager path computes whenever that path's own mask masks (kept and dropped scores
# less than |finfo.min| - 104 apart: 3.4e38 for fp32/bf16 masks, 65400 for fp16). Values are
# read before any float cast: an fp16 mask's -65504 widened to fp32 is still transformers'
# fp16 fill, and a narrowing cast maps 0 to 0 and both fills to -inf. A batch row whose last
# query keeps no key fails too: at decode (the only query) it would average all keys (finite
# fill) or give NaN (-inf) where the rewrite attends none, and a prefill state builder reads
# the row's keys from its last query; that query is a real token, which attends itself. Other
# prefill queries may mask every key: transformers does so for a left-padded row's pad queries,
# whose attention the model computes itself (a prefill rewrite keeps it).
#
# A failing check: aten._assert_async raises, with no host sync (eager CPU: RuntimeError;
# Inductor CPU: a C++ throw, which aborts the process where Inductor put it in a parallel
# region; CUDA: a device-side assert, an ordinary kernel inside a CUDA graph, reported at the
# next sync and fatal to the CUDA context; not run on a GPU here). Inductor compiles Triton
# without debug, dropping device asserts, under assert_indirect_indexing=False and on ROCm,
# so the rewrite also returns NaN for the failing rows: never silently wrong numbers.
CHECK_MESSAGE = (
    "macopt: a float attention mask holds a value other than 0 and a masking value "
    "(-inf or the dtype minimum), or masks every key of the last query of a row; macopt "
    "rewrote this attention assuming a key mask. Leave the module out of macopt.optimize "
    "(filter_fn) if its mask carries a bias"
)  # no quotes or backslashes: Inductor's C++ codegen pastes it into a string literal
_CHECK_ROLE = "macopt_mask_check"  # node meta key: the nodes of a run-time mask check
_CHECK_CHAIN = ("keep", "last query", "attends", "valid rows")  # each a user of the one before
# Ops between a graph input and the mask that move values without computing new ones.
_MOVES = LAYOUT_OPS | CAST_OPS | {aten.slice.Tensor}


def key_mask_source(site: AttentionSite) -> tuple[Node | None, str | None]:
    """``(node the mask selects keys by, None)``, ``(None, None)`` without a mask, or ``(None,
    reason)`` when the mask may do more than select keys. The node is boolean (True = attend),
    or a float graph input that :func:`checked_key_mask` checks at run time."""
    mask = site.attn_mask
    if mask is None:
        return None, None
    source = boolean_source(mask)
    if source is None and _checkable_at_run_time(site, mask):
        source = _float_values(mask)
    if source is None:
        return None, "additive float attention mask not provably 0/-inf (e.g. ALiBi or bias)"
    return source, None


def boolean_key_mask(site: AttentionSite) -> tuple[Node | None, str | None]:
    """:func:`key_mask_source` for a decode site: ``(mask node [Bm,1,1,N] or None, None)``, or
    ``(None, reason)`` when unusable (float input masks are checked at run time for every
    method)."""
    source, reason = key_mask_source(site)
    if source is None:
        return None, reason
    val, q_val = fake(source), fake(site.q)
    if val.dim() != 4:
        return None, f"attention mask of rank {val.dim()} (expected [B,1,1,N])"
    heads, rows = static_int(val.shape[1]), static_int(val.shape[2])
    batch = static_int(val.shape[0])
    if heads != 1 or rows != 1 or batch not in (1, static_int(q_val.shape[0])):
        return None, f"attention mask of shape {tuple(val.shape)} is per head or per query"
    return source, None


def decode_key_mask(graph: Graph, site: AttentionSite) -> tuple[Node | None, Node | None]:
    """:func:`checked_key_mask` of a decode site that :func:`boolean_key_mask` accepts:
    ``keep`` is ``[Bm,1,1,N]``."""
    source, _ = boolean_key_mask(site)
    return checked_key_mask(graph, site, source)


def checked_key_mask(graph: Graph, site: AttentionSite, source: Node | None
                     ) -> tuple[Node | None, Node | None]:
    """``(keep, valid_rows)`` for a ``source`` ``[Bm,1,R,N]`` from :func:`key_mask_source`:
    ``keep`` boolean (True = attend), None without a mask; ``valid_rows[Bm,1,1]`` (the batch
    rows that passed) for a float mask checked at run time, else None. The check goes before
    the mask's first use, one per mask node, shared by every site reading it."""
    if source is None or not fake(source).dtype.is_floating_point:
        return source, None
    return _existing_check(source) or _insert_check(graph, site, source)


def _checkable_at_run_time(site: AttentionSite, mask: Node) -> bool:
    """Whether a float ``mask`` that no graph op proves 0/-inf is a key mask to check at run
    time: a graph input (through value-moving ops only) at a transformers attention module.

    transformers builds every float mask as ``where(keep, 0, finfo(dtype).min)``
    (``masking_utils.eager_mask``); ``generate()`` with a static cache builds it before the
    compiled step, so it arrives as an input. Elsewhere a float input may as well be a bias
    (ALiBi, relative positions): those sites stay skipped rather than fail the check.
    """
    cls_module = getattr(site.module_class, "__module__", "") or ""
    from_transformers = cls_module.split(".")[0] in ("transformers", "transformers_modules")
    return from_transformers and peel(mask, _MOVES).op == "placeholder"


def _float_values(mask: Node) -> Node:
    """``mask`` with float-to-float casts peeled: the check reads the values before them."""
    while is_call(mask, CAST_OPS) and fake(mask.args[0]).dtype.is_floating_point:
        mask = mask.args[0]
    return mask


def _insert_check(graph: Graph, site: AttentionSite, mask: Node) -> tuple[Node, Node]:
    """Insert ``keep = mask == 0`` and the check that every entry of ``mask[Bm,1,R,N]`` is 0
    or drops its key and each batch row's last query keeps a key (see the comment above
    ``CHECK_MESSAGE``); ``(keep, valid_rows)``."""
    def op(target: object, *args: object) -> Node:
        return call(graph, target, args, site)

    with graph.inserting_before(next(n for n in graph.nodes if n in mask.users)):
        keep = op(aten.eq.Scalar, mask, 0)
        dropped = op(aten.le.Scalar, mask, torch.finfo(fake(mask).dtype).min)  # -inf too, not NaN
        known = op(aten.logical_or.default, keep, dropped)
        last_query = op(aten.slice.Tensor, keep, 2, -1)
        attends = op(aten.any.dim, last_query, -1)
        # all(x) as not(any(not(x))): Inductor lowers any; all it decomposes before our pass.
        unknown = op(aten.any.dim, op(aten.logical_not.default, known), -1)
        all_known = op(aten.logical_not.default, op(aten.any.dim, unknown, -1, True))
        valid_rows = op(aten.logical_and.default, attends, all_known)
        every_row = op(aten.logical_not.default,
                       op(aten.any.default, op(aten.logical_not.default, valid_rows)))
        op(aten._assert_async.msg, every_row, CHECK_MESSAGE)
    for role, node in zip(_CHECK_CHAIN, (keep, last_query, attends, valid_rows), strict=True):
        node.meta[_CHECK_ROLE] = role
    return keep, valid_rows


def _existing_check(mask: Node) -> tuple[Node, Node] | None:
    """``(keep, valid_rows)`` of a check :func:`_insert_check` already made for ``mask``."""
    chain, node = [], mask
    for role in _CHECK_CHAIN:
        found = _with_role(node.users, role)
        if not found:
            return None
        node = found[0]
        chain.append(node)
    return chain[0], chain[-1]


def _with_role(nodes: Iterable[Node], role: str) -> list[Node]:
    return [node for node in nodes if node.meta.get(_CHECK_ROLE) == role]


def boolean_source(mask: Node) -> Node | None:
    """The boolean tensor ``mask`` selects keys by (True = attend): ``mask`` itself when it is
    boolean, ``cond`` when it is ``where(cond, 0, -inf)``, else None."""
    return _where_source(mask) if fake(mask).dtype.is_floating_point else mask


def _where_source(mask: Node) -> Node | None:
    """``cond`` when ``mask`` is ``where(cond, 0, fill)`` with a masking fill, else None."""
    if not is_call(mask, aten.where.self):
        return None
    cond, keep, drop = mask.args
    if fake(cond) is None or fake(cond).dtype != torch.bool:
        return None
    if _scalar(keep) != 0.0 or (_scalar(drop) is None or _scalar(drop) > _MASKING_FILL):
        return None
    return cond


def _scalar(value: object) -> float | None:
    """A constant scalar: a Python number or a ``full([], c)`` node."""
    if isinstance(value, (int, float)):
        return float(value)
    if is_call(value, aten.full.default) and list(value.args[0]) == []:
        return float(value.args[1])
    if is_call(value, aten.scalar_tensor.default):
        return float(value.args[0])
    return None
