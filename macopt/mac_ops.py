"""MAC-Attention ops (``torch.ops.macopt.mac_match`` + ``mac_decode_matched``,
``mac_prefill``): what the ``mac`` rewrites insert. CPU runs the reference
(:mod:`macopt.kernels.mac_reference`), CUDA the Triton step (:mod:`macopt.kernels.mac`);
``MACOPT_CPU_KERNELS=triton`` as in :mod:`macopt.exact_ops`.

Every op keeps hidden state: the ring of the attention site named by ``site_id`` (a graph
constant, see :mod:`macopt.state`). They are declared functional (``mutates_args=()``) because
the ring is not a graph value; what keeps compilers from dropping or merging them is that each
returns a fresh tensor the graph uses, and that no two calls share arguments (site ids
differ). ``batch_capacity`` 0 means: the batch of the first call.

The decode step comes in two ops: ``mac_match`` (the match, which needs only the pre-RoPE
query: the pass puts it right after the query projection, and on CUDA it runs on a side
stream, :mod:`macopt.side_stream`) and ``mac_decode_matched`` (the rest of the step, from the
match's candidates).

A site's constants travel as one :class:`MACParams` (built from a :class:`MACConfig` by
:meth:`MACParams.from_config`); the ops' schemas list its fields flat
(:mod:`macopt.site_params`).

>>> found = torch.ops.macopt.mac_match(q_pre, t, s0, 0, 512, 0, 16, 0)  # doctest: +SKIP
>>> o = torch.ops.macopt.mac_decode_matched(q, q_pre, k, v, t, s0, *found, None, None, 0.125,
...                                         0, 512, 256, 0, 0.45, 2048, 16, 0)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from macopt import mac_guard, mac_state, side_stream
from macopt.config import MACConfig
from macopt.exact_ops import _use_triton
from macopt.kernels import mac_counters, mac_reference
from macopt.kernels.mac_reference import MACRing, MatchCandidates
from macopt.site_params import SiteParams, site_op
from macopt.validation import check_decode_inputs

Tensor = torch.Tensor


@dataclass(frozen=True)
class MACParams(SiteParams):
    """A MAC site's constants, as the decode ops take them (``batch_capacity`` 0: the batch of
    the first call)."""

    ring_size: int
    offset: int
    sinks: int
    tau: float
    t_min: int
    max_chain_depth: int
    batch_capacity: int

    @classmethod
    def from_config(cls, config: MACConfig) -> MACParams:
        return cls(config.ring_size, config.offset, config.sinks, config.tau, config.t_min,
                   config.max_chain_depth, config.batch_capacity or 0)

    def match(self) -> MACMatchParams:
        return MACMatchParams(self.ring_size, self.t_min, self.max_chain_depth,
                              self.batch_capacity)

    def prefill(self) -> MACPrefillParams:
        return MACPrefillParams(self.ring_size, self.offset, self.sinks, self.batch_capacity)

    def step_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of a decode step (kernel or reference)."""
        return dict(offset=self.offset, sinks=self.sinks, tau=self.tau, t_min=self.t_min,
                    max_depth=self.max_chain_depth)


@dataclass(frozen=True)
class MACMatchParams(SiteParams):
    """What ``mac_match`` reads of :class:`MACParams`."""

    ring_size: int
    t_min: int
    max_chain_depth: int
    batch_capacity: int


@dataclass(frozen=True)
class MACPrefillParams(SiteParams):
    """What ``mac_prefill`` reads of :class:`MACParams`."""

    ring_size: int
    offset: int
    sinks: int
    batch_capacity: int


def _check_decode(q: Tensor, q_pre: Tensor, k: Tensor, v: Tensor, positions: Tensor,
                  key_starts: Tensor, key_mask: Tensor | None = None,
                  holes: Tensor | None = None) -> None:
    check_decode_inputs(q, k, v, key_starts, positions, key_mask)
    if (key_mask is None) != (holes is None):
        raise ValueError("key_mask, holes: give both or neither")
    if holes is not None and (holes.shape != (q.shape[0],) or holes.dtype != torch.bool):
        raise ValueError(f"holes: expected bool ({q.shape[0]},), got {holes.dtype} "
                         f"{tuple(holes.shape)}")
    if q_pre.shape != q.shape:
        raise ValueError(f"q_pre: expected the shape of q {tuple(q.shape)}, got "
                         f"{tuple(q_pre.shape)}")


@site_op("macopt::mac_match", MACMatchParams)
def mac_match(
    q_pre: Tensor, positions: Tensor, key_starts: Tensor, site_id: int, params: MACMatchParams,
) -> tuple[Tensor, Tensor, Tensor]:
    """The match of a MAC decode step (:class:`MatchCandidates` ``d, pos, ok[B, Hq, R]``) on
    the site's ring as it is before this step; :func:`mac_decode_matched` takes the rest. On
    CUDA it is launched on the side stream (:mod:`macopt.side_stream`)."""
    _check_match(q_pre, positions, key_starts)
    ring, _ = mac_state.ring_for(site_id, q_pre, params.ring_size, params.batch_capacity)
    if not _use_triton(q_pre.device):
        return tuple(mac_reference.nearest_entries(q_pre, ring, positions, key_starts,
                                                   max_depth=params.max_chain_depth))
    from macopt.kernels import mac

    positions, key_starts = positions.contiguous(), key_starts.contiguous()
    # Allocated before the fork: the side stream allocates nothing.
    found = mac.empty_candidates(q_pre, params.ring_size)
    with side_stream.forked(q_pre.device, q_pre, positions, key_starts):
        mac.match_candidates(q_pre, ring, positions, key_starts, t_min=params.t_min,
                             max_depth=params.max_chain_depth, out=found)
    return tuple(found)


@mac_match.register_fake
def _(q_pre, positions, key_starts, site_id, params):
    _check_match(q_pre, positions, key_starts)
    if _use_triton(q_pre.device):
        from macopt.kernels import mac

        return tuple(mac.empty_candidates(q_pre, params.ring_size))
    batch, q_heads, _ = q_pre.shape
    return tuple(q_pre.new_empty(batch, q_heads, 1, dtype=dtype)
                 for dtype in (torch.float32, torch.int32, torch.uint8))


def _check_match(q_pre: Tensor, positions: Tensor, key_starts: Tensor) -> None:
    if q_pre.dim() != 3:
        raise ValueError(f"q_pre: expected [B, Hq, D], got {tuple(q_pre.shape)}")
    for name, t in (("positions", positions), ("key_starts", key_starts)):
        if t.shape != (q_pre.shape[0],):
            raise ValueError(f"{name}: expected shape ({q_pre.shape[0]},), got {tuple(t.shape)}")


@site_op("macopt::mac_decode_matched", MACParams)
def mac_decode_matched(
    q: Tensor, q_pre: Tensor, k: Tensor, v: Tensor, positions: Tensor, key_starts: Tensor,
    cand_d: Tensor, cand_pos: Tensor, cand_ok: Tensor, key_mask: Tensor | None,
    holes: Tensor | None, scale: float, site_id: int, params: MACParams,
) -> Tensor:
    """One MAC decode step ``o[B,Hq,D]`` of row ``b`` at cache position ``positions[b]`` over
    keys ``[key_starts[b], positions[b]]``, given this step's :func:`mac_match` (its three
    tensors, in order); updates the site's ring and counters in place. ``key_mask[B, N]`` with
    ``holes[B]`` (or both None): a row whose mask drops keys inside its range misses and
    attends the keys its mask keeps (exact), in the same launches."""
    _check_decode(q, q_pre, k, v, positions, key_starts, key_mask, holes)
    side_stream.join(q.device)  # the match ran on the side stream (CUDA)
    candidates = MatchCandidates(cand_d, cand_pos, cand_ok)
    ring, counters = mac_state.ring_for(site_id, q_pre, params.ring_size, params.batch_capacity)
    if _use_triton(q.device):
        from macopt.kernels import mac

        # The finalize launch adds the step to the counters: no separate counting launch.
        o, _, _ = mac.mac_decode_step(q, q_pre, k, v, ring, positions, key_starts, scale,
                                      counters=counters, candidates=candidates,
                                      key_mask=key_mask, holes=holes, **params.step_kwargs())
    else:
        o, hit, keys_read = mac_reference.mac_decode_step(
            q, q_pre, k, v, ring, positions, key_starts, scale, candidates=candidates,
            key_mask=key_mask, holes=holes, **params.step_kwargs())
        mac_counters.count_decode_reference_(counters, hit, keys_read, positions, key_starts)
    mac_guard.on_decode(site_id, counters, measure=lambda: _error_against_exact(
        o, q, k, v, key_starts, positions, key_mask, scale))
    return o


def _error_against_exact(o: Tensor, q: Tensor, k: Tensor, v: Tensor, key_starts: Tensor,
                         positions: Tensor, key_mask: Tensor | None, scale: float) -> float:
    """Relative L1 distance of a MAC step's output from exact attention over the same keys:
    the guard's check (one exact decode and a host sync, once per site and sequence)."""
    exact = torch.ops.macopt.decode_attention(q, k, v, key_starts, positions + 1, key_mask,
                                              scale)
    return mac_guard.relative_error(o, exact)


@mac_decode_matched.register_fake
def _(q, q_pre, k, v, positions, key_starts, cand_d, cand_pos, cand_ok, key_mask, holes, scale,
      site_id, params):
    _check_decode(q, q_pre, k, v, positions, key_starts, key_mask, holes)
    return torch.empty_like(q)


def check_prefill_inputs(attn_out: Tensor, q_post: Tensor, q_pre: Tensor, k: Tensor,
                         key_starts: Tensor, ends: Tensor) -> None:
    """The shapes every MAC prefill op takes (``mac_prefill``, ``mac_topk_phi_prefill``)."""
    if q_post.dim() != 4 or q_pre.shape != q_post.shape or attn_out.shape != q_post.shape:
        raise ValueError(f"q_post, q_pre, attn_out: expected one shape [B, Hq, N, D], got "
                         f"{tuple(q_post.shape)}, {tuple(q_pre.shape)}, {tuple(attn_out.shape)}")
    batch = q_post.shape[0]
    if k.dim() != 4 or k.shape[0] != batch or k.shape[3] != q_post.shape[3]:
        raise ValueError(f"k: expected [{batch}, Hkv, Nk, {q_post.shape[3]}], got "
                         f"{tuple(k.shape)}")
    for name, t in (("key_starts", key_starts), ("ends", ends)):
        if t.shape != (batch,):
            raise ValueError(f"{name}: expected shape ({batch},), got {tuple(t.shape)}")


@site_op("macopt::mac_prefill", MACPrefillParams)
def mac_prefill(
    attn_out: Tensor, q_post: Tensor, q_pre: Tensor, k: Tensor, v: Tensor, key_starts: Tensor,
    ends: Tensor, scale: float, site_id: int, params: MACPrefillParams,
) -> Tensor:
    """A copy of ``attn_out``; rewrites every ring slot of the site's first ``B`` rows with
    the exact entries of the prompt chunk (queries at cache positions ``[ends[b] - N,
    ends[b])``, row ``b``'s sequence ``[key_starts[b], ends[b])``, keys from the whole cache
    ``k``): the reset that starts new sequences. A chunk continuing a sequence fills the slots
    of its own positions; older ones stay empty (misses until decoding refills them), which
    ``macopt.stats`` counts when the chunk is shorter than the ring (:func:`count_prefill_`)."""
    check_prefill_inputs(attn_out, q_post, q_pre, k, key_starts, ends)
    ring, counters = mac_state.ring_for(site_id, q_pre, params.ring_size, params.batch_capacity)
    write_prefill_entries(ring, q_post, q_pre, k, v, scale, key_starts, ends, params.offset,
                          params.sinks)
    count_prefill_(counters, q_post.shape[2], ring.size, key_starts, ends)
    mac_guard.on_prefill(site_id, counters)
    return attn_out.clone()


def count_prefill_(counters: Tensor, chunk_len: int, ring_size: int, key_starts: Tensor,
                   ends: Tensor) -> None:
    """Count a prefill in ``counters`` and, if its chunk is shorter than the ring and continues
    a sequence (some row has keys before the chunk), a short continued chunk: the ring lost the
    older positions. On the device, in place: no host sync, safe in a CUDA graph."""
    counters[mac_counters.COUNTERS.index("prefills")] += 1
    if chunk_len < ring_size:  # a chunk of ring_size or more fills every slot itself
        continued = (ends.long() - chunk_len > key_starts.long()).any()
        counters[mac_counters.COUNTERS.index("short_continued_chunks")] += continued


def write_prefill_entries(ring: MACRing, q_post: Tensor, q_pre: Tensor, k: Tensor, v: Tensor,
                          scale: float, key_starts: Tensor, ends: Tensor, offset: int,
                          sinks: int) -> None:
    """Rewrite every slot of ``ring`` with the exact entries of a prompt chunk (Triton on CUDA,
    the reference on CPU); see :func:`mac_prefill`."""
    if _use_triton(q_post.device):
        from macopt.kernels import mac_prefill

        mac_prefill.prefill_entries_(ring, q_post, q_pre, k, v, scale, key_starts, ends, offset,
                                     sinks)
    else:
        ring.copy_(mac_reference.prefill_entries(q_post, q_pre, k, v, scale, key_starts, ends,
                                                 ring.size, offset, sinks))


@mac_prefill.register_fake
def _(attn_out, q_post, q_pre, k, v, key_starts, ends, scale, site_id, params):
    check_prefill_inputs(attn_out, q_post, q_pre, k, key_starts, ends)
    return torch.empty_like(attn_out)
