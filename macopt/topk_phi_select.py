"""Top-K + phi selection: which middle keys a decode step reads exactly, and how many.

- :func:`select` runs a selector spec (:func:`parse_selector`, :meth:`TopKPhiConfig.
  selector_spec`): "page" (ranks pages by the key bounds prefill wrote), "exact" (every key's
  score: the paper's oracle, :func:`exact_selection`), "channel" (scores over the dims where
  the queries are largest, then exact re-ranking, :func:`channel_selection`), "sketch" (the
  same from a 4-bit channel-major key sketch prefill wrote, :func:`build_sketch`,
  :func:`sketch_selection`). All on the device, no host sync; ``triton_path`` picks the Triton
  kernels, else torch (the references).
- The budget: when it pays for the summary (``TopKPhiConfig.summary_in_budget``), what each KV
  group retrieves (:func:`summary_counts`, :func:`retrieved_tokens`,
  :func:`summary_budget_tokens`).

The decode op that calls it is :mod:`macopt.topk_phi_state`'s ``topk_phi_decode``.
"""

from __future__ import annotations

import math

import torch

from macopt.config import SELECTORS
from macopt.kernels import topk_phi_reference as ref
from macopt.kernels.topk_phi_reference import GroupCounts

Tensor = torch.Tensor


def n_pages(n_keys: int, page_size: int) -> int:
    """Pages of ``page_size`` keys that hold ``n_keys`` keys."""
    return -(-n_keys // page_size)


# --- selection -------------------------------------------------------------------------------


def summary_counts(completion: Tensor, budget: int, summary_tokens: int,
                   page_size: int | None) -> GroupCounts:
    """What each KV group retrieves when the budget pays for the summary, tokens (``page_size``
    None) or pages: a group reads the summary iff any of its query heads has completion on; it
    then retrieves :func:`retrieved_tokens` of ``budget - summary_tokens``, otherwise of the
    full ``budget``. Symbolic (the flags and two counts): the page selector's kernel reads it
    as is, so a step adds no launch for it."""
    per = (lambda n: n) if page_size is None else (lambda n: n_pages(n, page_size))
    return GroupCounts(completion, per(retrieved_tokens(budget, summary_tokens, None)),
                       per(budget))


def group_counts(completion: Tensor, n_kv_heads: int, budget: int, summary_tokens: int,
                 page_size: int | None) -> Tensor:
    """:func:`summary_counts` as ``[Hkv]`` int32.

    >>> group_counts(torch.tensor([True, False, False, False]), 2, 40, 17, None).tolist()
    [23, 40]
    >>> group_counts(torch.tensor([True, False, False, False]), 2, 40, 17, 16).tolist()
    [2, 3]
    """
    return summary_counts(completion, budget, summary_tokens, page_size).tensor(n_kv_heads)


def select(q: Tensor, k: Tensor, scale: float, mid_start: Tensor, mid_end: Tensor,
           kmin: Tensor | None, kmax: Tensor | None, budget: int, page_size: int,
           selector: str, triton_path: bool, skip: Tensor | None = None,
           counts: GroupCounts | None = None) -> Tensor:
    """Token indices ``[B, Hkv, K']`` to retrieve (per KV head; entries outside the middle
    region are ignored by the decode kernels). All on the device: no host sync. ``skip``: see
    :func:`macopt.topk_phi_state.decode_impl` (the Triton page selector ranks nothing for
    those groups). ``counts`` (optional, :func:`summary_counts`): each group keeps only its best
    tokens (pages for the page selector) up to its count; the rest of its row is -1, so ``K'``
    is the same as without counts."""
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    name, channels, rerank = parse_selector(selector)
    if name == "channel":
        counts = None if counts is None else counts.tensor(n_kv_heads).expand(q.shape[0], -1)
        return channel_selection(q, k, scale, mid_start, mid_end, min(budget, n_keys),
                                 channels, rerank, counts)
    if name == "sketch":
        counts = None if counts is None else counts.tensor(n_kv_heads).expand(q.shape[0], -1)
        return sketch_selection(q, k, kmin, kmax, scale, mid_start, mid_end,
                                min(budget, n_keys), channels, rerank, counts, triton_path)
    if selector == "page" and triton_path:
        from macopt.kernels import topk_phi

        return topk_phi.select_pages(q, ref.PageBounds(kmin, kmax), mid_start, mid_end,
                                     page_size, scale, n_pages(budget, page_size), skip=skip,
                                     counts=counts)
    if counts is not None:  # the torch paths take them spelled out, per row
        counts = counts.tensor(n_kv_heads).expand(q.shape[0], -1)
    if selector == "page":
        n_selected = n_pages(budget, page_size)
        bounds = ref.PageBounds(kmin, kmax)
        scores = ref.page_scores(q, bounds, mid_start, mid_end, page_size, scale)
        return ref.pages_to_tokens(ref.select_pages(scores, n_kv_heads, n_selected, counts),
                                   page_size)
    if triton_path:  # three launches, every key read once (kernels/exact_select.py)
        from macopt.kernels.exact_select import exact_topk

        return exact_topk(q, k, scale, mid_start, mid_end, min(budget, n_keys), counts)
    return ref.exact_topk(q, k, scale, mid_start, mid_end, budget, per_kv_head=True,
                          counts=counts)


def parse_selector(selector: str) -> tuple[str, int, int]:
    """``(name, channels, rerank)`` of a selector spec (:meth:`TopKPhiConfig.selector_spec`):
    "page", "exact", "channel" / "sketch" or "channel:C:R" / "sketch:C:R" (C 0: head dim / 4;
    R: re-rank factor).

    >>> parse_selector("channel:16:2"), parse_selector("sketch"), parse_selector("page")
    (('channel', 16, 2), ('sketch', 0, 2), ('page', 0, 0))
    """
    name, _, rest = selector.partition(":")
    if name not in SELECTORS or (rest and name not in _RANKED):
        raise ValueError(f"selector: expected one of {SELECTORS} (or 'channel:C:R', "
                         f"'sketch:C:R'), got {selector!r}")
    if name not in _RANKED:
        return name, 0, 0
    parts = rest.split(":") if rest else ["0", "2"]
    if len(parts) != 2 or not all(x.isdigit() for x in parts) or int(parts[1]) < 1:
        raise ValueError(f"selector: expected '{name}:C:R' with C >= 0 and R >= 1, "
                         f"got {selector!r}")
    return name, int(parts[0]), int(parts[1])


_RANKED = ("channel", "sketch")  # selectors that rank channels, then re-rank candidates


def _group_rank(scores: Tensor) -> Tensor:
    """``[B, Hkv, g, n]`` scores (-inf: not a candidate) -> ``[B, Hkv, n]``: each key's best
    log-probability over the group's heads (as :func:`exact_selection` ranks)."""
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (scores - lse).amax(dim=2)


def channel_selection(q: Tensor, k: Tensor, scale: float, mid_start: Tensor, mid_end: Tensor,
                      top_k: int, channels: int = 0, rerank: int = 2,
                      counts: Tensor | None = None) -> Tensor:
    """The "channel" selector: ``[B, Hkv, K]`` int32 token indices, ascending (-1: none).

    Per KV group: the ``channels`` dims where the group's queries are largest carry most of
    ``q.k``, so scores over those dims alone rank the middle keys (reading ``channels / D`` of
    each key); the best ``rerank * top_k`` candidates are then scored exactly and the best
    ``top_k`` kept, ranked as :func:`exact_selection` ranks (a key's best probability over the
    group's heads, here normalised over the candidates). A budget that covers the middle keeps
    every middle key, as the exact selector does. ``counts[B, Hkv]``: see :func:`select`."""
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    n_channels = min(channels or max(1, head_dim // 4), head_dim)
    grouped = q.view(batch, n_kv_heads, group, head_dim)
    dims = grouped.float().abs().sum(dim=2).topk(n_channels, dim=-1).indices  # [B, Hkv, C]
    q_part = torch.gather(grouped, 3, dims[:, :, None, :].expand(-1, -1, group, -1))
    k_part = torch.gather(k, 3, dims[:, :, None, :].expand(-1, -1, n_keys, -1))
    inside = ref.positions_in(mid_start, mid_end, n_keys)[:, None, None, :]
    approx = torch.matmul(q_part, k_part.transpose(-1, -2)).float() * scale
    approx = approx.masked_fill(~inside, float("-inf"))
    n_candidates = min(rerank * top_k, n_keys)
    candidates = torch.topk(_group_rank(approx), n_candidates, dim=-1).indices  # [B, Hkv, R]
    return _rerank(grouped, k, scale, mid_start, mid_end, candidates, top_k, counts)


def _rerank(grouped: Tensor, k: Tensor, scale: float, mid_start: Tensor, mid_end: Tensor,
            candidates: Tensor, top_k: int, counts: Tensor | None) -> Tensor:
    """The best ``top_k`` of ``candidates[B, Hkv, R]`` by their exact scores (a key's best
    probability over the group's heads, normalised over the candidates), as ascending int32
    token indices (-1: none); candidates outside the middle never win over ones inside."""
    head_dim = k.shape[3]
    candidates = candidates.long()
    k_cand = torch.gather(k, 2, candidates[..., None].expand(-1, -1, -1, head_dim))
    exact = torch.matmul(grouped, k_cand.transpose(-1, -2)).float() * scale  # [B, Hkv, g, R]
    in_mid = ((candidates >= mid_start[:, None, None]) & (candidates < mid_end[:, None, None]))
    exact = exact.masked_fill(~in_mid[:, :, None, :], float("-inf"))
    best = ref.top_indices(_group_rank(exact), min(top_k, candidates.shape[-1]), counts).long()
    tokens = torch.gather(candidates, 2, best.clamp(min=0))
    tokens = torch.where(best >= 0, tokens, -1)
    return tokens.sort(dim=-1).values.to(torch.int32)


# --- the sketch selector ---------------------------------------------------------------------

SKETCH_LEVELS = 7  # 4-bit symmetric codes: levels -7..7 stored as 1..15 (8 is zero)
_SKETCH_CHUNK = 16384  # tokens quantised per step at prefill (bounds the temporaries)


def sketch_shapes(batch: int, n_kv_heads: int, n_keys: int, head_dim: int
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(codes, scales)`` shapes of the sketch of a ``[batch, n_kv_heads, n_keys, head_dim]``
    cache: ``[B, Hkv, D, ceil(N / 2)]`` uint8 and ``[B, Hkv, D]`` fp32."""
    return (batch, n_kv_heads, head_dim, -(-n_keys // 2)), (batch, n_kv_heads, head_dim)


def build_sketch(k: Tensor, mid_start: Tensor, mid_end: Tensor, codes: Tensor,
                 scales: Tensor) -> None:
    """Write the 4-bit channel-major sketch of ``k[B, Hkv, N, D]`` into ``codes[B, Hkv, D,
    ceil(N / 2)]`` (uint8, token ``2j`` in the low nibble of byte ``j``) and ``scales[B, Hkv,
    D]`` (fp32: the channel's largest magnitude over the middle ``[mid_start, mid_end)`` / 7).
    Codes are ``round(k / scale)`` clamped to [-7, 7], plus 8. Torch ops in token chunks (no
    host sync; prefill work, read back by :func:`sketch_selection` at every decode step)."""
    batch, n_kv_heads, n_keys, head_dim = k.shape
    inside = ref.positions_in(mid_start, mid_end, n_keys)  # [B, N]
    amax = torch.zeros(batch, n_kv_heads, head_dim, dtype=torch.float32, device=k.device)
    for lo in range(0, n_keys, _SKETCH_CHUNK):
        hi = min(lo + _SKETCH_CHUNK, n_keys)
        part = k[:, :, lo:hi].float().abs() * inside[:, None, lo:hi, None]
        amax = torch.maximum(amax, part.amax(dim=2))
    scale = (amax / SKETCH_LEVELS).clamp_min(torch.finfo(torch.float32).tiny)
    scales.copy_(scale)
    inverse = (1.0 / scale)[:, :, None, :]
    for lo in range(0, n_keys, _SKETCH_CHUNK):  # _SKETCH_CHUNK is even: pairs stay whole
        hi = min(lo + _SKETCH_CHUNK, n_keys)
        level = torch.round(k[:, :, lo:hi].float() * inverse).clamp_(-SKETCH_LEVELS,
                                                                    SKETCH_LEVELS)
        level = (level + 8).to(torch.uint8)
        if (hi - lo) % 2:
            level = torch.cat([level, level.new_full(level[:, :, :1].shape, 8)], dim=2)
        packed = level[:, :, 0::2] | (level[:, :, 1::2] << 4)  # [B, Hkv, P, D]
        codes[:, :, :, lo // 2: lo // 2 + packed.shape[2]].copy_(packed.transpose(-1, -2))


def sketch_keys(codes: Tensor, scales: Tensor, n_keys: int) -> Tensor:
    """The sketch dequantised, ``[B, Hkv, n_keys, D]`` fp32 (for references and tests)."""
    low = (codes & 15).to(torch.int16) - 8
    high = (codes >> 4).to(torch.int16) - 8
    level = torch.stack([low, high], dim=-1).flatten(-2)[..., :n_keys]  # [B, Hkv, D, N]
    return (level.float() * scales[..., None]).transpose(-1, -2)


def _sketch_query(q: Tensor, scales: Tensor, scale: float, n_kv_heads: int, channels: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """``(grouped q [B, Hkv, g, D], dims [B, Hkv, C] int32, q_scaled [B, Hkv, g, C] fp32)``:
    the group's ``C`` channels of largest summed |q| and each head's q there times the
    channel's dequantisation scale and the softmax scale."""
    batch, n_q_heads, head_dim = q.shape
    group = n_q_heads // n_kv_heads
    n_channels = min(channels or max(1, head_dim // 4), head_dim)
    grouped = q.view(batch, n_kv_heads, group, head_dim)
    dims = grouped.float().abs().sum(dim=2).topk(n_channels, dim=-1).indices  # [B, Hkv, C]
    q_part = torch.gather(grouped.float(), 3, dims[:, :, None, :].expand(-1, -1, group, -1))
    q_scaled = q_part * torch.gather(scales, 2, dims)[:, :, None, :] * scale
    return grouped, dims.to(torch.int32), q_scaled


def sketch_scores_reference(codes: Tensor, dims: Tensor, q_scaled: Tensor, mid_start: Tensor,
                            mid_end: Tensor, n_keys: int) -> Tensor:
    """:func:`macopt.kernels.sketch_select.sketch_scores` in torch (the query rounded to fp16
    as the kernel rounds it, fp32 sums, fp16 out)."""
    batch, n_kv_heads, head_dim, n_packed = codes.shape
    rows = torch.gather(codes, 2, dims.long()[..., None].expand(-1, -1, -1, n_packed))
    low = (rows & 15).float() - 8
    high = (rows >> 4).float() - 8
    level = torch.stack([low, high], dim=-1).flatten(-2)[..., :n_keys]  # [B, Hkv, C, N]
    scores = torch.matmul(q_scaled.half().float(), level).amax(dim=2)  # [B, Hkv, N]
    inside = ref.positions_in(mid_start, mid_end, n_keys)[:, None, :]
    return scores.masked_fill(~inside, float("-inf")).to(torch.float16)


def sketch_selection(q: Tensor, k: Tensor, codes: Tensor, scales: Tensor, scale: float,
                     mid_start: Tensor, mid_end: Tensor, top_k: int, channels: int = 0,
                     rerank: int = 2, counts: Tensor | None = None,
                     triton_path: bool = False) -> Tensor:
    """The "sketch" selector: ``[B, Hkv, K]`` int32 token indices, ascending (-1: none).
    Approximate by design.

    Per KV group, the ``channels`` dims where the group's queries are largest (0: D / 4) score
    every middle token from the 4-bit channel-major sketch that prefill wrote
    (:func:`build_sketch`; reads ``channels / (4 D)`` of the bf16 key bytes), the token's group
    score being its best head's; the best ``rerank * top_k`` tokens (fp16 scores, ties to the
    lowest indices) are then scored exactly from the cache and the best ``top_k`` kept, as
    :func:`channel_selection` keeps them. A budget covering the middle keeps every middle key.
    ``triton_path``: the Triton kernels of :mod:`macopt.kernels.sketch_select` (seven
    launches; the tokens come in candidate order, not sorted), else torch (the reference: same
    set up to fp32 summation order, ascending). ``counts``: see :func:`select`.
    """
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    n_keys = min(n_keys, 2 * codes.shape[-1])  # a growing cache: the sketch covers the prompt
    head_dim = q.shape[-1]
    n_channels = min(channels or max(1, head_dim // 4), head_dim)
    n_candidates = min(rerank * top_k, n_keys)
    if triton_path:  # seven launches; the tokens come in candidate order (not sorted)
        from macopt.kernels import sketch_select as kernels

        dims, q_scaled = kernels.sketch_query(q, scales, scale, n_channels)
        approx, maxima = kernels.sketch_scores(codes, dims, q_scaled, mid_start, mid_end,
                                               n_keys, block_max=True)
        candidates = kernels.select_candidates(approx, maxima, n_candidates)
        exact = kernels.candidate_scores(q, k, candidates, mid_start, mid_end, scale)
        return kernels.rerank_select(exact, candidates, min(top_k, n_candidates), counts)
    from macopt.kernels.sketch_select import select_candidates_reference

    grouped, dims, q_scaled = _sketch_query(q, scales, scale, n_kv_heads, channels)
    approx = sketch_scores_reference(codes, dims, q_scaled, mid_start, mid_end, n_keys)
    candidates = select_candidates_reference(approx, n_candidates)
    return _rerank(grouped, k, scale, mid_start, mid_end, candidates, min(top_k, n_keys),
                   counts)


def exact_selection(q: Tensor, k: Tensor, scale: float, mid_start: Tensor, mid_end: Tensor,
                    top_k: int, counts: Tensor | None = None) -> Tensor:
    """:func:`~macopt.kernels.topk_phi_reference.exact_topk` (per KV head) without an fp32
    copy of the keys: scores come from one matmul in ``k.dtype`` (fp32 accumulation), so
    near-ties may rank differently than in fp32. Reads every key: the paper's oracle.
    ``counts[B, Hkv]`` int32 (optional): tokens each group keeps (see :func:`select`)."""
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    grouped = q.view(batch, n_kv_heads, n_q_heads // n_kv_heads, head_dim)
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float() * scale  # [B, Hkv, g, N]
    inside = ref.positions_in(mid_start, mid_end, n_keys)[:, None, None, :]
    scores = scores.masked_fill(~inside, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    ranked = (scores - lse).amax(dim=2)  # a key's best probability over the group's heads
    return ref.top_indices(ranked, top_k, counts)


# --- the budget ------------------------------------------------------------------------------


def summary_token_equivalent(head_dim: int, d_phi: int, itemsize: int) -> float:
    """Bytes of one KV head's summary read per decode step, in cached tokens (K + V rows).

    >>> round(summary_token_equivalent(128, 128, 2), 1)
    130.0
    """
    return 4 * d_phi * (head_dim + 2) / (2 * head_dim * itemsize)


def summary_budget_tokens(head_dim: int, d_phi: int, itemsize: int) -> int:
    """Whole tokens of the budget a summary-reading KV group gives up when
    ``TopKPhiConfig.summary_in_budget`` is set: the summary's token equivalent, rounded up (so
    a group never reads more bytes than the budget allows at token granularity).

    >>> summary_budget_tokens(128, 2, 2), summary_budget_tokens(128, 16, 2)
    (3, 17)
    """
    return math.ceil(summary_token_equivalent(head_dim, d_phi, itemsize))


def retrieved_tokens(budget: int, summary_tokens: int, page_size: int | None) -> int:
    """Middle keys one KV group retrieves from a budget of ``budget`` token equivalents when it
    gives ``summary_tokens`` of them to its summary (0: no summary read). Floored at 0: a group
    whose summary alone fills the budget retrieves nothing (the op's ``budget`` stays >= 1).
    The page selector (``page_size``) rounds up to whole pages, as ``TopKPhiConfig`` does.

    >>> retrieved_tokens(410, 17, None), retrieved_tokens(410, 17, 32), retrieved_tokens(8, 17, 32)
    (393, 416, 0)
    """
    n = max(0, budget - summary_tokens)
    return n if page_size is None else n_pages(n, page_size) * page_size


__all__ = ["build_sketch", "channel_selection", "exact_selection", "group_counts", "n_pages",
           "parse_selector", "retrieved_tokens", "select", "sketch_selection", "sketch_shapes",
           "summary_budget_tokens", "summary_counts", "summary_token_equivalent"]
