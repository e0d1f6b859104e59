"""Turn an SDPA attention mask into a boolean key mask ``[B or 1, N]`` (True = attend).

Only masks that provably select keys are accepted: boolean masks, and float masks built as
``where(bool, 0, -inf or a huge negative)`` (what aten does to boolean masks on CPU, and what
Hugging Face builds). Any other additive mask could shift scores, so the site is skipped.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from macopt.passes.graph_utils import aten, fake, is_call, static_int
from macopt.passes.sites import AttentionSite

# A fill at or below fp16's most negative value (finfo(fp16).min, the least any framework
# uses; -inf included) makes exp(score + fill - max) exactly 0 for any realistic score,
# unless a whole row is masked (which a decode row never is: it attends its own key).
_MASKING_FILL = -65504.0


def boolean_key_mask(site: AttentionSite) -> tuple[Node | None, str | None]:
    """``(bool mask node [Bm,1,1,N] or None, None)``, or ``(None, reason)`` when unusable."""
    mask = site.attn_mask
    if mask is None:
        return None, None
    source = boolean_source(mask)
    if source is None:
        return None, "additive float attention mask not provably 0/-inf (e.g. ALiBi or bias)"
    val, q_val = fake(source), fake(site.q)
    if val.dim() != 4:
        return None, f"attention mask of rank {val.dim()} (expected [B,1,1,N])"
    heads, rows = static_int(val.shape[1]), static_int(val.shape[2])
    batch = static_int(val.shape[0])
    if heads != 1 or rows != 1 or batch not in (1, static_int(q_val.shape[0])):
        return None, f"attention mask of shape {tuple(val.shape)} is per head or per query"
    return source, None


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

