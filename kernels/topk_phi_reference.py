"""Top-K + phi retrieval with feature-map completion, in plain PyTorch (docs/ALGORITHMS.md,
section 2).

The oracle the Triton kernels of :mod:`macopt.kernels.topk_phi` are tested against. Shapes and
conventions as in :mod:`macopt.kernels.reference`: ``q[B, Hq, D]``, ``k, v[B, Hkv, N, D]``,
query head ``h`` reads KV head ``h // g``; states ``(o, lse)`` fp32, natural log, empty state
``(0, -inf)``; feature maps enter as ``log phi`` (``F = d_phi`` features).

Regions of row ``b``: prefill keys ``[starts[b], prefill_ends[b])``; the mid region is
``[mid_start[b], mid_end[b]) = [starts + n_sink, prefill_ends - n_tail)`` (empty when the prompt
is short); the current keys are ``[starts[b], ends[b])``. Every current key outside the mid
region (sinks, tail, generated tokens) is attended exactly, and so are the retrieved mid keys;
the rest of the mid region comes from the summary.

Selections are token indices ``selected[B, Hsel, K]`` with ``Hsel`` = Hq (per query head) or
Hkv (per KV head, shared by the group). Indices outside the row's mid region are ignored, so
padding with any out-of-range value (or a page running past the mid region) is harmless;
indices must not repeat within a head.

>>> mid_start, mid_end = mid_range(starts, prefill_ends, n_sink=4, n_tail=16)
>>> summary = build_summary(v, log_phi_k, mid_start, mid_end)
>>> selected = exact_topk(q, k, scale, mid_start, mid_end, top_k=64, per_kv_head=True)
>>> o, lse = topk_phi_decode_state(q, k, v, scale, starts, ends, summary, selected,
...                                log_phi_q, log_phi_k)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from macopt.kernels.reference import merge_state

Tensor = torch.Tensor
NEG_INF = float("-inf")


class PhiSummary(NamedTuple):
    """Max-shifted feature summary of the mid region, per (batch row, KV head).

    ``m[B, Hkv, F]`` (max log phi_k over the mid keys; -inf when the region is empty),
    ``u[B, Hkv, F]`` (sum of ``exp(log phi_k - m)``), ``t[B, Hkv, F, D]`` (the same weights
    times ``v``), ``mid_start[B]``, ``mid_end[B]`` (int, ``mid_end >= mid_start``).
    """

    m: Tensor
    u: Tensor
    t: Tensor
    mid_start: Tensor
    mid_end: Tensor


class PageBounds(NamedTuple):
    """Elementwise min / max of the mid keys of each page, ``[B, Hkv, n_pages, D]``.

    Page ``j`` covers key positions ``[j * page_size, (j + 1) * page_size)``; a page without
    mid keys holds zeros (its score is -inf anyway).
    """

    kmin: Tensor
    kmax: Tensor


class GroupCounts(NamedTuple):
    """How many pages (or tokens) each KV group keeps, in the form the Top-K + phi summary
    switch gives them: ``with_summary`` for a group any of whose query heads has completion on
    (``completion[Hq]``, bool or uint8; query head ``h`` is in group ``h // g``), ``plain`` for
    a group whose heads are all off. The page-select kernel reads it as is (no per-step torch
    launches); :meth:`tensor` spells it out for the reference and the exact selectors.

    >>> GroupCounts(torch.tensor([True, False, False, False]), 2, 3).tensor(2).tolist()
    [2, 3]
    """

    completion: Tensor
    with_summary: int
    plain: int

    def tensor(self, n_kv_heads: int) -> Tensor:
        """``[Hkv]`` int32 counts."""
        reads_summary = self.completion.bool().view(n_kv_heads, -1).any(dim=-1)
        return torch.where(reads_summary, self.with_summary, self.plain).to(torch.int32)


def mid_range(starts: Tensor, prefill_ends: Tensor, n_sink: int, n_tail: int
              ) -> tuple[Tensor, Tensor]:
    """``(mid_start, mid_end)`` per row; the region is empty when the prompt is too short."""
    mid_start = starts + n_sink
    mid_end = torch.maximum(prefill_ends - n_tail, mid_start)
    return mid_start, mid_end


def positions_in(lo: Tensor, hi: Tensor, n_keys: int) -> Tensor:
    """Boolean ``[B, N]``: key positions inside ``[lo[b], hi[b])``."""
    pos = torch.arange(n_keys, device=lo.device)
    return (pos[None, :] >= lo[:, None]) & (pos[None, :] < hi[:, None])


def build_summary(
    v: Tensor, log_phi_k: Tensor, mid_start: Tensor, mid_end: Tensor,
    key_mask: Tensor | None = None, compute_dtype: torch.dtype = torch.float32,
) -> PhiSummary:
    """Summary ``(m, u~, T~)`` of the mid keys (``log_phi_k[B, Hkv, N, F]``, ``v[B, Hkv, N, D]``).

    ``key_mask[B, Hkv, N]`` (True = include) further restricts the keys, for tests.
    """
    batch, n_kv_heads, n_keys, _ = v.shape
    inside = positions_in(mid_start, mid_end, n_keys)[:, None, :].expand(batch, n_kv_heads, -1)
    if key_mask is not None:
        inside = inside & key_mask
    log_w = log_phi_k.to(compute_dtype).masked_fill(~inside[..., None], NEG_INF)
    m = log_w.amax(dim=2)  # [B, Hkv, F]
    weights = torch.exp(log_w - _finite_or_zero(m)[:, :, None, :])  # 0 outside the region
    u = weights.sum(dim=2)
    t = torch.einsum("bhnf,bhnd->bhfd", weights, v.to(compute_dtype))
    return PhiSummary(m, u, t, mid_start, mid_end)


def build_page_bounds(k: Tensor, mid_start: Tensor, mid_end: Tensor, page_size: int
                      ) -> PageBounds:
    """Per-page elementwise key min / max over each page's mid keys (Quest-style metadata)."""
    batch, n_kv_heads, n_keys, head_dim = k.shape
    n_pages = -(-n_keys // page_size)
    pad = n_pages * page_size - n_keys
    inside = positions_in(mid_start, mid_end, n_pages * page_size)[:, None, :, None]
    padded = torch.nn.functional.pad(k, (0, 0, 0, pad))
    pages = lambda x: x.view(batch, n_kv_heads, n_pages, page_size, head_dim)  # noqa: E731
    kmin = pages(padded.masked_fill(~inside, float("inf"))).amin(dim=3)
    kmax = pages(padded.masked_fill(~inside, NEG_INF)).amax(dim=3)
    empty = torch.isinf(kmin)
    return PageBounds(kmin.masked_fill(empty, 0), kmax.masked_fill(empty, 0))


def page_scores(q: Tensor, bounds: PageBounds, mid_start: Tensor, mid_end: Tensor,
                page_size: int, scale: float) -> Tensor:
    """Upper bound of ``scale * q.k`` over each page's mid keys: ``[B, Hq, n_pages]`` fp32.

    Pages without mid keys score -inf.
    """
    n_kv_heads, n_pages = bounds.kmin.shape[1], bounds.kmin.shape[2]
    group = q.shape[1] // n_kv_heads
    qf = q.float().view(q.shape[0], n_kv_heads, group, -1)
    upper = (torch.einsum("bhgd,bhpd->bhgp", qf.clamp(min=0), bounds.kmax.float())
             + torch.einsum("bhgd,bhpd->bhgp", qf.clamp(max=0), bounds.kmin.float())) * scale
    first = torch.arange(n_pages, device=q.device) * page_size
    has_mid = ((first[None, :] + page_size > mid_start[:, None])
               & (first[None, :] < mid_end[:, None]))
    upper = upper.masked_fill(~has_mid[:, None, None, :], NEG_INF)
    return upper.reshape(q.shape[0], q.shape[1], n_pages)


def select_pages(scores: Tensor, n_kv_heads: int, n_selected: int,
                 counts: Tensor | None = None) -> Tensor:
    """Top pages per KV head, sorted ascending: ``[B, Hkv, min(n_selected, n_pages)]`` int32.

    Each query head's bounds are shifted so that its best page scores 0, then the group takes
    the max: a page is kept when it is near the top for any head of the group, whatever the
    heads' query norms. ``counts[B, Hkv]`` (optional): each group keeps only its best
    ``counts`` pages, the rest of its row -1.
    """
    batch, n_q_heads, n_pages = scores.shape
    best = _finite_or_zero(scores.amax(dim=-1, keepdim=True))
    relative = (scores - best).view(batch, n_kv_heads, n_q_heads // n_kv_heads, n_pages)
    group_score = relative.amax(dim=2)
    return top_indices(group_score, min(n_selected, n_pages), counts)


def pages_to_tokens(pages: Tensor, page_size: int) -> Tensor:
    """Token indices of the selected pages: ``[..., P]`` -> ``[..., P * page_size]`` int32;
    a page -1 (none) gives tokens -1."""
    offsets = torch.arange(page_size, device=pages.device, dtype=pages.dtype)
    tokens = pages[..., None] * page_size + offsets
    return torch.where(pages[..., None] >= 0, tokens, -1).flatten(-2)


def top_indices(scores: Tensor, width: int, counts: Tensor | None = None) -> Tensor:
    """Indices of the ``width`` best ``scores[B, H, n]`` per row, ascending, int32. With
    ``counts[B, H]``: only the best ``counts`` of them, the rest of the row -1 (the width, a
    shape, stays; -1 sorts first and every consumer ignores it).

    >>> top_indices(torch.tensor([[[0.1, 0.9, 0.5, 0.7]]]), 3, torch.tensor([[2]])).tolist()
    [[[-1, 1, 3]]]
    """
    if counts is None:
        top = torch.topk(scores, width, dim=-1, sorted=False).indices
    else:
        top = torch.topk(scores, width, dim=-1, sorted=True).indices
        rank = torch.arange(width, device=scores.device)
        top = torch.where(rank < counts[..., None].to(scores.device), top, -1)
    return top.sort(dim=-1).values.to(torch.int32)


def exact_topk(q: Tensor, k: Tensor, scale: float, mid_start: Tensor, mid_end: Tensor,
               top_k: int, per_kv_head: bool = True, counts: Tensor | None = None) -> Tensor:
    """The oracle selector: the ``top_k`` mid keys by exact score, int32 indices.

    Per query head -> ``[B, Hq, K]``; per KV head -> ``[B, Hkv, K]``, ranking each key by the
    largest softmax probability (over the mid region) any head of the group gives it.
    ``K = min(top_k, N)``; rows with a short mid region get indices outside it (ignored).
    ``counts[B, H]`` (optional): row ``(b, h)`` keeps only its best ``counts[b, h]`` keys, the
    rest of it -1 (:func:`top_indices`).
    """
    batch, n_q_heads, _ = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    qf = q.float().view(batch, n_kv_heads, group, -1)
    scores = torch.einsum("bhgd,bhnd->bhgn", qf, k.float()) * scale
    inside = positions_in(mid_start, mid_end, n_keys)[:, None, None, :]
    scores = scores.masked_fill(~inside, NEG_INF)
    if per_kv_head:
        lse = _finite_or_zero(torch.logsumexp(scores, dim=-1, keepdim=True))
        scores = (scores - lse).amax(dim=2)
    else:
        scores = scores.reshape(batch, n_q_heads, n_keys)
    return top_indices(scores, min(top_k, n_keys), counts)


def selection_mask(selected: Tensor, n_q_heads: int, mid_start: Tensor, mid_end: Tensor,
                   n_keys: int) -> Tensor:
    """Boolean ``[B, Hq, N]``: the retrieved mid keys of each query head."""
    group = n_q_heads // selected.shape[1]
    per_head = selected.long().repeat_interleave(group, dim=1)
    in_range = (per_head >= 0) & (per_head < n_keys)
    mask = torch.zeros(*per_head.shape[:2], n_keys + 1, dtype=torch.bool, device=selected.device)
    mask.scatter_(2, torch.where(in_range, per_head, n_keys), True)  # slot N collects the rest
    return mask[..., :n_keys] & positions_in(mid_start, mid_end, n_keys)[:, None, :]


def subtract_retrieved(summary: PhiSummary, v: Tensor, log_phi_k: Tensor, retrieved: Tensor,
                       eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``(u~_R[B, Hq, F], T~_R[B, Hq, F, D])``: the summary minus the retrieved keys' share.

    ``retrieved[B, Hq, N]`` is a :func:`selection_mask`; the stored summary is not modified.
    ``u~_R`` is clamped to ``eps`` (rounding can push an emptied feature below 0).
    """
    n_q_heads = retrieved.shape[1]
    group = n_q_heads // v.shape[1]
    dtype = summary.u.dtype
    shift = _finite_or_zero(summary.m)[:, :, None, :]
    weights = torch.exp(log_phi_k.to(dtype) - shift).repeat_interleave(group, dim=1)
    weights = torch.where(retrieved[..., None], weights, 0.0)  # [B, Hq, N, F]; not 0 * inf
    vq = v.to(dtype).repeat_interleave(group, dim=1)
    u_r = summary.u.repeat_interleave(group, dim=1) - weights.sum(dim=2)
    t_r = summary.t.repeat_interleave(group, dim=1) - torch.einsum("bhnf,bhnd->bhfd", weights, vq)
    return u_r.clamp(min=eps), t_r


def completion_state(log_phi_q: Tensor, m: Tensor, u_r: Tensor, t_r: Tensor
                     ) -> tuple[Tensor, Tensor]:
    """State ``(y_R[B, Hq, D], log Z_R[B, Hq])`` of the unretrieved mid keys, from features.

    ``a_f = log phi_q[f] + m[f] + log u~_R[f]``, ``log Z_R = logsumexp_f a_f``,
    ``y_R = sum_f softmax(a)_f T~_R[f] / u~_R[f]``; ``m[B, Hq, F]`` (per query head).
    An empty mid region (``m = -inf``) gives the empty state.
    """
    a = log_phi_q.to(u_r.dtype) + m + torch.log(u_r)
    log_z = torch.logsumexp(a, dim=-1)
    probs = torch.exp(a - _finite_or_zero(log_z)[..., None])  # all 0 when log_z = -inf
    y = torch.einsum("bhf,bhfd->bhd", probs / u_r, t_r)
    return y, log_z


def exact_state(q: Tensor, k: Tensor, v: Tensor, scale: float, attend: Tensor,
                compute_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """State of each query head over its own key set ``attend[B, Hq, N]`` (GQA aware)."""
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    group = n_q_heads // n_kv_heads
    qf = q.to(compute_dtype).view(batch, n_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bhnd->bhgn", qf, k.to(compute_dtype)) * scale
    scores = scores.reshape(batch, n_q_heads, -1).masked_fill(~attend, NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - _finite_or_zero(lse)[..., None])
    vq = v.to(compute_dtype).repeat_interleave(group, dim=1)
    return torch.einsum("bhn,bhnd->bhd", weights, vq), lse


def topk_phi_decode_state(
    q: Tensor, k: Tensor, v: Tensor, scale: float, starts: Tensor, ends: Tensor,
    summary: PhiSummary, selected: Tensor, log_phi_q: Tensor, log_phi_k: Tensor,
    completion: Tensor | None = None, eps: float = 1e-6,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Top-K + phi decode state ``(o[B, Hq, D], lse[B, Hq])``.

    ``merge(exact state over sinks + tail + generated + retrieved, completion state)``.
    ``log_phi_q[B, Hq, F]``; ``log_phi_k[B, Hkv, N, F]`` (only the retrieved keys are read);
    ``completion[Hq]`` bool (default all on): off gives Top-K-only renormalised attention.
    """
    n_q_heads, n_keys = q.shape[1], k.shape[2]
    group = n_q_heads // k.shape[1]
    retrieved = selection_mask(selected, n_q_heads, summary.mid_start, summary.mid_end, n_keys)
    current = positions_in(starts, ends, n_keys)[:, None, :]
    mid = positions_in(summary.mid_start, summary.mid_end, n_keys)[:, None, :]
    attend = (current & ~mid) | (retrieved & current)
    o_exact, lse_exact = exact_state(q, k, v, scale, attend, compute_dtype)

    cast = lambda x: x.to(compute_dtype)  # noqa: E731
    summary = PhiSummary(cast(summary.m), cast(summary.u), cast(summary.t), *summary[3:])
    u_r, t_r = subtract_retrieved(summary, v, log_phi_k, retrieved, eps)
    m_q = summary.m.repeat_interleave(group, dim=1)
    y, log_z = completion_state(log_phi_q, m_q, u_r, t_r)
    if completion is not None:
        log_z = log_z.masked_fill(~completion.bool()[None, :], NEG_INF)
        y = y * completion.bool()[None, :, None]
    return merge_state(o_exact, lse_exact, y, log_z)


def topk_phi_decode(*args, **kwargs) -> Tensor:
    """:func:`topk_phi_decode_state`'s output in ``q``'s dtype (same arguments)."""
    q = args[0] if args else kwargs["q"]
    return topk_phi_decode_state(*args, **kwargs)[0].to(q.dtype)


def _finite_or_zero(x: Tensor) -> Tensor:
    """Max shifts: an all -inf slice shifts by 0 so that it stays -inf instead of NaN."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))
