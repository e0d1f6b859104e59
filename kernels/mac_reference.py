"""MAC-Attention (Match, Amend, Complete) in plain PyTorch: the oracle for :mod:`.mac`.

Docs: docs/ALGORITHMS.md, section 1. Shapes follow :mod:`macopt.kernels.reference`: a decode query
``q[B, Hq, D]``, a KV cache ``k, v[B, Hkv, N, D]`` (query head ``h`` reads KV head ``h // g``),
fp32 states ``(o, lse)`` with the empty state ``(0, -inf)``.

Positions are cache indices. Row ``b`` decodes position ``t[b]`` (its key is already in the
cache) and its valid keys are ``[s0[b], t[b]]``, ``s0`` being the row's key start (the left
padding). With offset ``S`` and ``F`` sinks (F = 0: none) the keys split into three disjoint parts

    sinks   [s0, min(s0 + F, E(t)))      exact every step, never stored in the ring
    prefix  [s0 + F, E(t))               reused from a ring entry on a hit (plus the band)
    tail    [E(t), t]                    exact every step
    E(p) = max(p + 1 - S, s0)

so a ring entry of position ``p`` holds the state of ``q_p`` over ``[s0 + F, E(p))``; with
F = 0 and s0 = 0 this is the paper's ``[0, E(p))``. Keeping the sinks out of the entries means a
reused entry never double counts them, and they are attended with the current query each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from macopt.kernels.reference import merge_state

Tensor = torch.Tensor


@dataclass
class MACRing:
    """Ring of the last ``M`` decode queries of one attention site, per batch row and query head.

    Entry of position ``p`` lives in slot ``p mod M``. ``q`` keeps the input dtype: the pre-RoPE
    query arrives in that dtype, so storing it is lossless, and it halves the bytes of the match
    step, which reads the whole ring every step (``M * D`` elements per head, as much as the K/V
    an all-hit step reads). Distances are computed in fp32 from it.
    """

    q: Tensor  # [B, Hq, M, D] pre-RoPE queries, input dtype
    o: Tensor  # [B, Hq, M, D] fp32 prefix states
    lse: Tensor  # [B, Hq, M] fp32 (natural log; -inf: empty prefix)
    pos: Tensor  # [B, Hq, M] int32 position of the entry, -1: empty slot
    depth: Tensor  # [B, Hq, M] int32 hits chained to build the entry (0: exact)

    @classmethod
    def empty(
        cls, batch: int, q_heads: int, ring_size: int, head_dim: int,
        dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
    ) -> MACRing:
        """An all-empty ring.

        >>> MACRing.empty(1, 4, 16, 64).pos.shape
        torch.Size([1, 4, 16])
        """
        shape = (batch, q_heads, ring_size)
        ring = cls(
            q=torch.empty(*shape, head_dim, dtype=dtype, device=device),
            o=torch.empty(*shape, head_dim, dtype=torch.float32, device=device),
            lse=torch.empty(shape, dtype=torch.float32, device=device),
            pos=torch.empty(shape, dtype=torch.int32, device=device),
            depth=torch.empty(shape, dtype=torch.int32, device=device),
        )
        return ring.reset_()

    @property
    def size(self) -> int:
        return self.pos.shape[-1]

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(q, o, lse, pos, depth)``: the arguments a custom op mutates."""
        return self.q, self.o, self.lse, self.pos, self.depth

    def reset_(self) -> MACRing:
        """Empty every slot in place (addresses unchanged, so CUDA graphs stay valid)."""
        self.q.zero_()
        self.o.zero_()
        self.lse.fill_(float("-inf"))
        self.pos.fill_(-1)
        self.depth.zero_()
        return self

    def copy_(self, other: MACRing) -> MACRing:
        for mine, theirs in zip(self.tensors(), other.tensors(), strict=True):
            mine.copy_(theirs)
        return self

    def clone(self) -> MACRing:
        return MACRing(*(t.clone() for t in self.tensors()))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def prefix_end(positions: Tensor, key_starts: Tensor, offset: int) -> Tensor:
    """``E(p) = max(p + 1 - S, s0)``: the end of the part of the keys a ring entry may cover."""
    return torch.maximum(positions + 1 - offset, key_starts)


def threshold(head_dim: int, tau: float) -> float:
    """Squared-L2 match radius ``2 D (1 - tau)^2`` (a hit needs a distance strictly below it)."""
    return 2.0 * head_dim * (1.0 - tau) ** 2


def range_state(
    q: Tensor, k: Tensor, v: Tensor, scale: float, attend: Tensor,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """State of queries ``q[B, Hq, L, D]`` over the keys where ``attend[B, Hq, L, N]`` is True."""
    batch, q_heads, n_queries, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    qf = q.to(compute_dtype).view(batch, kv_heads, group, n_queries, head_dim)
    scores = torch.einsum("bhgld,bhnd->bhgln", qf, k.to(compute_dtype)) * scale
    scores = scores.masked_fill(~attend.view(scores.shape), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])  # 0 where masked
    o = torch.einsum("bhgln,bhnd->bhgld", weights, v.to(compute_dtype))
    return o.reshape(batch, q_heads, n_queries, head_dim), lse.reshape(batch, q_heads, n_queries)


def _between(keys: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``lo <= keys < hi`` with ``lo, hi[...]`` broadcast against a trailing key axis."""
    return (keys >= lo[..., None]) & (keys < hi[..., None])


def prefill_entries(
    q_post: Tensor, q_pre: Tensor, k: Tensor, v: Tensor, scale: float, key_starts: Tensor,
    ends: Tensor, ring_size: int, offset: int, sinks: int = 0,
    compute_dtype: torch.dtype = torch.float32,
) -> MACRing:
    """Exact ring entries for the last ``min(M, len)`` prompt positions of each row.

    ``q_post, q_pre[B, Hq, N, D]``: post- and pre-RoPE queries of a prompt chunk, row ``b``'s
    at cache positions ``[ends[b] - N, ends[b])`` (a whole prompt: ``0..N-1``); ``k, v[B, Hkv,
    Nk, D]`` the cache, ``Nk >= ends``; row ``b``'s sequence is ``[key_starts[b], ends[b])``.
    Entry of position ``p`` (slot ``p mod M``): the state of ``q_post_p`` over
    ``[s0 + F, E(p))``, depth 0. Slots no query of the chunk reaches stay empty (a chunk
    shorter than ``M`` after earlier chunks leaves the older positions empty).

    >>> ring = prefill_entries(q, q, k, v, 0.125, starts, ends, ring_size=512, offset=256)
    """
    # Only the chunk's last M queries can reach a slot: the rest are never computed (memory
    # linear in the prompt, not quadratic).
    batch, q_heads, n_chunk, head_dim = q_post.shape
    n_tokens = min(n_chunk, ring_size)
    q_post, q_pre = q_post[:, :, n_chunk - n_tokens:], q_pre[:, :, n_chunk - n_tokens:]
    device = q_post.device
    s0 = key_starts.to(device).long()
    end = ends.to(device).long()
    positions = end[:, None] - n_tokens + torch.arange(n_tokens, device=device)  # [B, M']
    keep = positions >= torch.maximum(end - ring_size, s0)[:, None]
    e_p = prefix_end(positions, s0[:, None], offset)  # [B, M']
    keys = torch.arange(k.shape[2], device=device)
    attend = _between(keys, (s0 + sinks)[:, None].expand(-1, n_tokens), e_p)  # [B, N, Nk]
    attend = attend[:, None].expand(batch, q_heads, n_tokens, k.shape[2])
    o, lse = range_state(q_post, k, v, scale, attend, compute_dtype)

    ring = MACRing.empty(batch, q_heads, ring_size, head_dim, q_pre.dtype, device)
    rows, cols = keep.nonzero(as_tuple=True)
    kept = positions[rows, cols]
    slots = kept % ring_size
    ring.q[rows, :, slots] = q_pre[rows, :, cols]
    ring.o[rows, :, slots] = o[rows, :, cols].float()
    ring.lse[rows, :, slots] = lse[rows, :, cols].float()
    ring.pos[rows, :, slots] = kept.to(torch.int32)[:, None]
    return ring


@dataclass
class Match:
    """The match decision of one step, per ``(b, h)``: ``[B, Hq]`` tensors."""

    hit: Tensor  # bool
    slot: Tensor  # slot of the nearest valid entry j* (meaningful where found)
    start: Tensor  # first prefix key this step attends: E(j*) on a hit, s0 + F on a miss


class MatchCandidates(NamedTuple):
    """What a match found, per (row, query head) and part of the ring, ``[B, Hq, R]``: the
    nearest valid entry's fp32 squared distance, its position (-1: none) and whether it may be
    reused (finite lse, depth below the bound). :func:`decide` gives the same decision for any
    split of the ring into parts, so the Triton match (``R`` parts, a row below ``t_min`` reads
    nothing) and :func:`nearest_entries` (one part) are interchangeable."""

    d: Tensor  # float32
    pos: Tensor  # int32
    ok: Tensor  # uint8


def nearest_entries(q_pre: Tensor, ring: MACRing, t: Tensor, s0: Tensor, *,
                    max_depth: int) -> MatchCandidates:
    """Each head's nearest valid entry (ties: the older) as one-part candidates ``[B, Hq, 1]``.

    Valid entries have positions in ``[max(t - M, s0), t)``."""
    ring_size = ring.size
    t, s0 = t.to(q_pre.device).long(), s0.to(q_pre.device).long()
    dist = ((ring.q.float() - q_pre.float()[:, :, None, :]) ** 2).sum(-1)  # [B, Hq, M]
    pos = ring.pos.long()
    lowest = torch.maximum(t - ring_size, s0)[:, None, None]
    valid = (pos >= lowest) & (pos < t[:, None, None])
    dist = dist.masked_fill(~valid, float("inf"))
    best = dist.min(dim=-1, keepdim=True).values
    nearest = valid & (dist == best)
    j_star = torch.where(nearest, pos, torch.iinfo(torch.int64).max).min(dim=-1).values
    found = nearest.any(dim=-1)
    slot = torch.where(found, j_star, 0) % ring_size
    usable = (torch.isfinite(_gather_slot(ring.lse, slot))
              & (_gather_slot(ring.depth, slot) < max_depth) & found)
    return MatchCandidates(d=best, pos=torch.where(found, j_star, -1).to(torch.int32)[..., None],
                           ok=usable.to(torch.uint8)[..., None])


def decide(
    candidates: MatchCandidates, t: Tensor, s0: Tensor, *, ring_size: int, head_dim: int,
    offset: int, sinks: int, tau: float, t_min: int, stream_misses: bool = True,
) -> Match:
    """The step's decision from match candidates: the nearest entry over all parts (ties: the
    older) hits when it may be reused, its distance is below :func:`threshold` and
    ``t - s0 >= t_min``. ``stream_misses`` False: a miss streams no prefix (its start is
    ``E(t)``; the caller brings the prefix state)."""
    t, s0 = t.to(candidates.d.device).long(), s0.to(candidates.d.device).long()
    dist, pos = candidates.d, candidates.pos.long()
    best = dist.min(dim=-1, keepdim=True).values
    nearest = (dist == best) & (pos >= 0)
    j_star = torch.where(nearest, pos, torch.iinfo(torch.int64).max).min(dim=-1).values
    found = nearest.any(dim=-1)
    reusable = (nearest & (pos == j_star[..., None]) & (candidates.ok != 0)).any(dim=-1)
    j_star = torch.where(found, j_star, 0)
    hit = (found & reusable & (best[..., 0] < threshold(head_dim, tau))
           & ((t - s0) >= t_min)[:, None])
    first_prefix = (s0 + sinks)[:, None]
    miss_start = first_prefix if stream_misses else prefix_end(t, s0, offset)[:, None]
    start = torch.where(hit, torch.maximum(prefix_end(j_star, s0[:, None], offset), first_prefix),
                        miss_start)
    return Match(hit=hit, slot=j_star % ring_size, start=start)


def match(
    q_pre: Tensor, ring: MACRing, t: Tensor, s0: Tensor, *, offset: int, sinks: int, tau: float,
    t_min: int, max_depth: int, stream_misses: bool = True,
) -> Match:
    """Nearest valid entry (ties: the older) and whether it may be reused: :func:`decide` on
    :func:`nearest_entries`.

    Valid entries have positions in ``[max(t - M, s0), t)``. A hit needs the fp32 squared L2
    distance of the pre-RoPE queries below :func:`threshold`, ``t - s0 >= t_min``, a finite
    entry lse and an entry depth below ``max_depth``. ``stream_misses`` False: a miss streams
    no prefix (its start is ``E(t)``; the caller brings the prefix state).
    """
    found = nearest_entries(q_pre, ring, t, s0, max_depth=max_depth)
    return decide(found, t, s0, ring_size=ring.size, head_dim=q_pre.shape[-1], offset=offset,
                  sinks=sinks, tau=tau, t_min=t_min, stream_misses=stream_misses)


def _gather_slot(x: Tensor, slot: Tensor) -> Tensor:
    """``x[b, h, slot[b, h], ...]`` for ``x[B, Hq, M, ...]``."""
    index = slot.view(*slot.shape, 1, *([1] * (x.dim() - 3)))
    index = index.expand(*slot.shape, 1, *x.shape[3:])
    return x.gather(2, index).squeeze(2)


def mac_decode_step(
    q: Tensor, q_pre: Tensor, k: Tensor, v: Tensor, ring: MACRing, positions: Tensor,
    key_starts: Tensor, scale: float, *, offset: int, sinks: int = 0, tau: float,
    t_min: int, max_depth: int, compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None, miss_prefix: tuple[Tensor, Tensor] | None = None,
    candidates: MatchCandidates | None = None, key_mask: Tensor | None = None,
    holes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One MAC decode step; updates ``ring`` in place (slot ``t mod M``).

    ``q, q_pre[B, Hq, D]``: post- and pre-RoPE queries of position ``positions[b]``;
    ``k, v[B, Hkv, N, D]`` already hold its key; row ``b``'s keys are
    ``[key_starts[b], positions[b]]``. Returns ``o[B, Hq, D]`` (``out_dtype``, default
    ``q.dtype``), the hit mask ``[B, Hq]`` and the keys each head read ``[B, Hq]`` (int32).

    ``miss_prefix``: a state ``(o[B, Hq, D], lse[B, Hq])`` per head over its prefix
    ``[s0 + F, E(t))`` computed by another method (e.g. Top-K + phi). A missing head then takes
    it as its prefix state instead of attending the prefix (and writes it to the ring); its
    ``keys_read`` counts only what this step read (tail and sinks). Hits are unchanged.
    ``candidates``: this step's match, when the caller ran it already (:func:`nearest_entries`
    or the Triton match launch); the decision is then taken from them. ``key_mask`` (bool
    ``[B, N]``) with ``holes`` (bool ``[B]``: rows whose mask drops keys inside ``[s0, t]``):
    such a row misses and attends only the keys its mask keeps, so its output is exact
    attention over its mask and its entry that state; ``keys_read`` still counts its ranges
    (the kernel reads them whole).

    >>> o, hit, keys = mac_decode_step(q, q_pre, k, v, ring, t, s0, 0.125, offset=256,
    ...                                tau=0.45, t_min=2048, max_depth=4)
    """
    t = positions.to(q.device).long()
    s0 = key_starts.to(q.device).long()
    if candidates is None:
        candidates = nearest_entries(q_pre, ring, t, s0, max_depth=max_depth)
    found = decide(candidates, t, s0, ring_size=ring.size, head_dim=q_pre.shape[-1],
                   offset=offset, sinks=sinks, tau=tau, t_min=t_min,
                   stream_misses=miss_prefix is None)
    if (key_mask is None) != (holes is None):
        raise ValueError("key_mask and holes: give both or neither")
    if key_mask is not None and miss_prefix is not None:
        raise ValueError("key_mask: not with miss_prefix (a given prefix ignores the mask)")
    keep = None
    if key_mask is not None:  # rows with holes: a miss over the keys the mask keeps
        holes = holes.to(q.device)[:, None]
        found = Match(hit=found.hit & ~holes, slot=found.slot,
                      start=torch.where(holes, (s0 + sinks)[:, None], found.start))
        keep = (key_mask.to(q.device) | ~holes)[:, None, :]  # [B, 1, N]
    e_t = prefix_end(t, s0, offset)[:, None].expand_as(found.start)  # [B, Hq]
    keys = torch.arange(k.shape[2], device=q.device)

    # Amend: the band [E(j*), E(t)) on a hit, the whole prefix [s0 + F, E(t)) on a miss.
    prefix = _between(keys, found.start, e_t)
    o_a, lse_a = range_state(q[:, :, None], k, v, scale, _kept(prefix, keep)[:, :, None],
                             compute_dtype)
    entry_o = _gather_slot(ring.o, found.slot).to(compute_dtype)
    entry_lse = _gather_slot(ring.lse, found.slot).to(compute_dtype)
    if miss_prefix is None:  # a miss reuses nothing
        entry_lse = torch.where(found.hit, entry_lse, float("-inf"))
    else:  # a miss takes the given prefix state as its entry
        given_o, given_lse = (x.to(device=q.device, dtype=compute_dtype) for x in miss_prefix)
        entry_o = torch.where(found.hit[..., None], entry_o, given_o)
        entry_lse = torch.where(found.hit, entry_lse, given_lse)
    o_c, lse_c = merge_state(o_a[:, :, 0], lse_a[:, :, 0], entry_o, entry_lse)

    # Complete: the tail [E(t), t] and the sinks [s0, min(s0 + F, E(t))), exact.
    tail = _between(keys, e_t, (t + 1)[:, None].expand_as(e_t))
    tail |= _between(keys, s0[:, None].expand_as(e_t), torch.minimum(s0[:, None] + sinks, e_t))
    o_t, lse_t = range_state(q[:, :, None], k, v, scale, _kept(tail, keep)[:, :, None],
                             compute_dtype)
    out, _ = merge_state(o_c, lse_c, o_t[:, :, 0], lse_t[:, :, 0])

    depth = torch.where(found.hit, _gather_slot(ring.depth, found.slot) + 1, 0)
    _write_slot(ring, t, q_pre, o_c, lse_c, depth)
    keys_read = (prefix | tail).sum(-1).to(torch.int32)
    return out.to(out_dtype or q.dtype), found.hit, keys_read


def _kept(keys: Tensor, keep: Tensor | None) -> Tensor:
    return keys if keep is None else keys & keep


def _write_slot(ring: MACRing, t: Tensor, q_pre: Tensor, o: Tensor, lse: Tensor,
                depth: Tensor) -> None:
    """Store the entry of position ``t[b]`` in slot ``t mod M`` of every head of row ``b``."""
    rows = torch.arange(t.shape[0], device=t.device)
    slot = t % ring.size
    ring.q[rows, :, slot] = q_pre.to(ring.q.dtype)
    ring.o[rows, :, slot] = o.float()
    ring.lse[rows, :, slot] = lse.float()
    ring.pos[rows, :, slot] = t.to(torch.int32)[:, None]
    ring.depth[rows, :, slot] = depth.to(torch.int32)
