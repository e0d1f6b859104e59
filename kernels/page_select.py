"""Top-K page selection from page scores, as token indices, in one Triton launch.

:func:`select_page_tokens` is ``pages_to_tokens(select_pages(scores, n_kv_heads, n_selected),
page_size)`` of :mod:`macopt.kernels.topk_phi_reference` without the torch reductions, topk and
sort launches. Per (row, KV head), one program:

1. shifts each query head's scores by its best page (finite, else 0) and takes the group max;
2. finds the K-th best group score exactly, by bisection on the order-preserving int32 image of
   its float bits (32 counting passes over the row's pages);
3. keeps, in ascending page order, the pages above it and the lowest-index pages equal to it
   until K are kept, and writes their token indices.

The pages are those of ``torch.topk`` whenever the K-th and (K+1)-th best group scores differ;
on a tie at the K-th score the lowest indices win, which is still a top K.

>>> scores = page_scores(q, bounds, mid_start, mid_end, page_size=32, scale=scale)
>>> tokens = select_page_tokens(scores, n_kv_heads=8, n_selected=80, page_size=32)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from macopt.kernels.topk_phi_reference import GroupCounts

Tensor = torch.Tensor

# Every output and workspace buffer comes from here; tests swap in a sentinel-filling allocator
# to prove that the kernel writes every element.
_new_empty = torch.empty

_MAX_BLOCK_P = 1024
_MAX_BLOCK_T = 2048


@triton.jit
def _order_key(x):
    """int32 that orders like the float32 ``x``: flip the magnitude bits of negatives so that
    larger magnitudes sort lower (-inf lowest; -0.0 just below +0.0, as in CUDA torch.topk)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _count_at_least(keys_ptr, candidate, n_pages, BLOCK_P: tl.constexpr):
    """How many of the row's ``n_pages`` keys are ``>= candidate``."""
    offsets = tl.arange(0, BLOCK_P)
    counts = tl.zeros([BLOCK_P], tl.int32)
    for start in range(0, n_pages, BLOCK_P):
        pages = start + offsets
        page_ok = pages < n_pages
        key = tl.load(keys_ptr + pages, mask=page_ok, other=0)
        counts += ((key >= candidate) & page_ok).to(tl.int32)
    return tl.sum(counts, axis=0)


@triton.jit
def _select_page_tokens_kernel(
    scores_ptr, keys_ptr, pages_ptr, tokens_ptr,
    n_pages, group, n_keep,
    PAGE_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_T: tl.constexpr, skip_ptr=None, HAS_SKIP: tl.constexpr = False,
    completion_ptr=None, keep_with_summary=0, keep_plain=0, n_kv_heads=1,
    HAS_COUNTS: tl.constexpr = False,
):
    # One program per (row, KV head): the group's [g, n_pages] scores are read twice in
    # [BLOCK_G, BLOCK_P] tiles, then the row's int32 keys (a few KB, cache resident) 33 times.
    kv_pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < group
    offsets = tl.arange(0, BLOCK_P)
    head_scores = scores_ptr + (kv_pid * group + rows[:, None]) * n_pages
    keys_ptr += kv_pid * n_pages
    pages_ptr += kv_pid * n_keep
    tokens_ptr += kv_pid * n_keep * PAGE_SIZE
    n_width = n_keep  # the row's width in pages (a group's own count may be smaller)
    if HAS_SKIP:  # a skipped group ranks no page and writes tokens -1 (ignored downstream)
        skipped = tl.load(skip_ptr + kv_pid) != 0
        n_pages = tl.where(skipped, 0, n_pages)
    if HAS_COUNTS:  # this group's own page count (<= n_keep; GroupCounts): slots past it -1
        flags = tl.load(completion_ptr + (kv_pid % n_kv_heads) * group + tl.arange(0, BLOCK_G),
                        mask=tl.arange(0, BLOCK_G) < group, other=0)
        own = tl.where(tl.max(flags.to(tl.int32), axis=0) > 0, keep_with_summary, keep_plain)
        n_keep = tl.minimum(tl.maximum(own, 0), n_keep)

    # Elementwise max across tiles, one reduction after the loop (a reduction accumulated
    # inside the loop and read twice after it crashes Triton 3.6's thread-locality pass).
    best_tile = tl.full([BLOCK_G, BLOCK_P], float("-inf"), tl.float32)
    for start in range(0, n_pages, BLOCK_P):
        pages = start + offsets
        tile = tl.load(head_scores + pages[None, :],
                       mask=row_ok[:, None] & (pages < n_pages)[None, :], other=float("-inf"))
        best_tile = tl.maximum(best_tile, tile)
    best = tl.max(best_tile, axis=1)
    shift = tl.where(tl.abs(best) < float("inf"), best, 0.0)  # padded heads: -inf - 0 = -inf
    for start in range(0, n_pages, BLOCK_P):
        pages = start + offsets
        page_ok = pages < n_pages
        tile = tl.load(head_scores + pages[None, :], mask=row_ok[:, None] & page_ok[None, :],
                       other=float("-inf"))
        group_score = tl.max(tile - shift[:, None], axis=0)
        tl.store(keys_ptr + pages, _order_key(group_score), mask=page_ok)
    tl.debug_barrier()  # other threads of this program read these keys back

    # The K-th largest key: at least K keys are >= lo, fewer than K are >= hi + 1. The int32
    # range halves each pass (int64 bounds: no overflow), so 32 passes leave lo == hi.
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    n_above = tl.zeros([], tl.int32)  # keys >= hi + 1 (none while hi is the int32 max)
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        count = _count_at_least(keys_ptr, mid.to(tl.int32), n_pages, BLOCK_P)
        enough = count >= n_keep
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
        n_above = tl.where(enough, n_above, count)
    threshold = lo.to(tl.int32)

    # Ascending compaction: every key above the threshold, and ties in page order until K.
    ties_wanted = n_keep - n_above
    n_taken = tl.zeros([], tl.int32)
    n_ties = tl.zeros([], tl.int32)
    for start in range(0, n_pages, BLOCK_P):
        pages = start + offsets
        page_ok = pages < n_pages
        key = tl.load(keys_ptr + pages, mask=page_ok, other=0)
        tie = ((key == threshold) & page_ok).to(tl.int32)
        tie_rank = n_ties + tl.cumsum(tie, axis=0) - tie
        chosen = (((key > threshold) & page_ok) | ((tie != 0) & (tie_rank < ties_wanted)))
        chosen = chosen.to(tl.int32)
        slot = n_taken + tl.cumsum(chosen, axis=0) - 1
        tl.store(pages_ptr + slot, pages, mask=chosen != 0)
        n_taken += tl.sum(chosen, axis=0)
        n_ties += tl.sum(tie, axis=0)
    tl.debug_barrier()  # as for the keys: the page list is read back by other threads

    # Token expansion: contiguous, coalesced stores of page * PAGE_SIZE + offset.
    n_tokens = n_width * PAGE_SIZE
    for start in range(0, n_tokens, BLOCK_T):
        slots = start + tl.arange(0, BLOCK_T)
        slot_ok = slots < n_tokens
        if HAS_COUNTS:  # slots past the group's count: -1 (ignored downstream)
            keep = slot_ok & (slots < n_keep * PAGE_SIZE)
            page = tl.load(pages_ptr + slots // PAGE_SIZE, mask=keep, other=0)
            token = tl.where(keep, page * PAGE_SIZE + slots % PAGE_SIZE, -1)
            if HAS_SKIP:
                token = tl.where(tl.load(skip_ptr + kv_pid + slots * 0) == 0, token, -1)
        elif HAS_SKIP:  # (the flag per slot: a scalar bool in a mask trips the interpreter)
            keep = slot_ok & (tl.load(skip_ptr + kv_pid + slots * 0) == 0)
            page = tl.load(pages_ptr + slots // PAGE_SIZE, mask=keep, other=0)
            token = tl.where(keep, page * PAGE_SIZE + slots % PAGE_SIZE, -1)
        else:
            page = tl.load(pages_ptr + slots // PAGE_SIZE, mask=slot_ok, other=0)
            token = page * PAGE_SIZE + slots % PAGE_SIZE
        tl.store(tokens_ptr + slots, token, mask=slot_ok)


def select_page_tokens(scores: Tensor, n_kv_heads: int, n_selected: int, page_size: int,
                       skip: Tensor | None = None, counts: GroupCounts | None = None) -> Tensor:
    """Token indices of the best pages per KV head, ascending:
    ``[B, Hkv, min(n_selected, n_pages) * page_size]`` int32.

    ``scores[B, Hq, n_pages]`` fp32 (-inf for pages to skip); query head ``h`` belongs to KV
    head ``h // (Hq // Hkv)``. Pages are ranked as in
    :func:`macopt.kernels.topk_phi_reference.select_pages` (each head shifted by its best page,
    then the group max); ties at the K-th score go to the lowest page indices. One launch, no
    host sync. ``skip[B, Hkv]`` (uint8 or bool, optional): groups that rank nothing and get
    tokens -1. ``counts`` (:class:`GroupCounts`, optional): pages each group keeps, its best
    ones (at most ``min(n_selected, n_pages)``: the width stays), ascending, then -1 in the
    slots past them.

    >>> tokens = select_page_tokens(scores, n_kv_heads=8, n_selected=80, page_size=32)
    """
    batch, n_q_heads, n_pages = scores.shape
    if scores.dtype != torch.float32:
        raise ValueError(f"scores: expected float32 page scores, got {scores.dtype}")
    if n_q_heads % n_kv_heads:
        raise ValueError(f"scores: {n_q_heads} query heads do not split into {n_kv_heads} "
                         f"KV head groups; pass the KV head count of the cache")
    n_keep = min(n_selected, n_pages)
    device = scores.device
    tokens = _new_empty((batch, n_kv_heads, n_keep * page_size), dtype=torch.int32,
                        device=device)
    if tokens.numel() == 0:
        return tokens
    keys = _new_empty((batch, n_kv_heads, n_pages), dtype=torch.int32, device=device)
    pages = _new_empty((batch, n_kv_heads, n_keep), dtype=torch.int32, device=device)
    group = n_q_heads // n_kv_heads
    _select_page_tokens_kernel[(batch * n_kv_heads,)](
        scores.contiguous(), keys, pages, tokens, n_pages, group, n_keep,
        PAGE_SIZE=page_size, BLOCK_G=triton.next_power_of_2(group),
        BLOCK_P=min(_MAX_BLOCK_P, triton.next_power_of_2(n_pages)),
        BLOCK_T=min(_MAX_BLOCK_T, triton.next_power_of_2(n_keep * page_size)), num_warps=8,
        **({"HAS_SKIP": False} if skip is None else
           {"skip_ptr": skip.contiguous().view(torch.uint8), "HAS_SKIP": True}),
        **({"HAS_COUNTS": False} if counts is None else _count_args(counts, n_q_heads,
                                                                      n_kv_heads)),
    )
    return tokens


def _count_args(counts: GroupCounts, n_q_heads: int, n_kv_heads: int) -> dict:
    completion = counts.completion
    if completion.shape != (n_q_heads,) or completion.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"counts.completion: expected a bool or uint8 [{n_q_heads}] tensor, got "
                         f"{completion.dtype} {tuple(completion.shape)}")
    return {"completion_ptr": completion.contiguous().view(torch.uint8),
            "keep_with_summary": counts.with_summary, "keep_plain": counts.plain,
            "n_kv_heads": n_kv_heads, "HAS_COUNTS": True}
