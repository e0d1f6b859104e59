"""Reference math for partial attention states, in plain PyTorch.

This is the oracle every kernel is tested against (docs: docs/ALGORITHMS.md, section 0).

Conventions used across macopt:

- A decode query is ``q[B, Hq, D]``; the KV cache is ``k, v[B, Hkv, N, D]`` with
  ``Hq = g * Hkv`` (query head ``h`` reads KV head ``h // g``, the Hugging Face order).
- A *state* of a query over an index set I of keys is ``(o, lse)``:
  ``lse = log sum_{i in I} exp(s q.k_i)`` (natural log) and ``o = softmax-weighted mean of v_i``.
  States are fp32 (fp64 when asked). The **empty state** is ``o = 0, lse = -inf``; every
  function here accepts and returns it without producing NaN.
- The keys a row attends are ``[starts[b], ends[b])`` intersected with ``key_mask[b]``
  (``True`` = attend) when a mask is given.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _key_validity(
    batch: int,
    n_keys: int,
    device: torch.device,
    starts: Tensor | None,
    ends: Tensor | None,
    key_mask: Tensor | None,
) -> Tensor:
    """Boolean ``[B, N]``: which keys each row attends."""
    pos = torch.arange(n_keys, device=device)
    valid = torch.ones(batch, n_keys, dtype=torch.bool, device=device)
    if starts is not None:
        valid &= pos[None, :] >= starts.to(device).long()[:, None]
    if ends is not None:
        valid &= pos[None, :] < ends.to(device).long()[:, None]
    if key_mask is not None:
        valid &= key_mask.to(device=device, dtype=torch.bool)
    return valid


def attention_state(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    starts: Tensor | None = None,
    ends: Tensor | None = None,
    key_mask: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """State ``(o[B, Hq, D], lse[B, Hq])`` of decode queries over their key ranges (GQA aware).

    >>> q, k, v = torch.randn(1, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    >>> o, lse = attention_state(q, k, v, ends=torch.tensor([3]))
    >>> o.shape, lse.shape
    (torch.Size([1, 4, 8]), torch.Size([1, 4]))
    """
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    qf = q.to(compute_dtype).view(batch, n_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bhnd->bhgn", qf, k.to(compute_dtype)) * scale
    valid = _key_validity(batch, n_keys, q.device, starts, ends, key_mask)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf for rows with no valid key
    weights = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])  # 0 where masked
    o = torch.einsum("bhgn,bhnd->bhgd", weights, v.to(compute_dtype))
    return o.reshape(batch, n_q_heads, head_dim), lse.reshape(batch, n_q_heads)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    starts: Tensor | None = None,
    ends: Tensor | None = None,
    key_mask: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Full decode attention output in ``q``'s dtype (rows with no valid key give zeros)."""
    o, _ = attention_state(q, k, v, scale, starts, ends, key_mask, compute_dtype)
    return o.to(q.dtype)


def merge_state(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """State of the union of two disjoint key sets. ``o[..., D]``, ``lse[...]``."""
    lse_max = torch.maximum(lse_a, lse_b)
    shift = torch.where(torch.isinf(lse_max), torch.zeros_like(lse_max), lse_max)
    w_a = torch.exp(lse_a - shift)
    w_b = torch.exp(lse_b - shift)
    total = w_a + w_b
    lse = shift + torch.log(total)  # -inf when both are empty
    denom = torch.where(total > 0, total, torch.ones_like(total))
    o = (w_a[..., None] * o_a + w_b[..., None] * o_b) / denom[..., None]
    return o, lse


def merge_states(o: Tensor, lse: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """Merge the states stacked along ``dim`` of ``lse`` (``o`` has one more trailing dim)."""
    dim = dim % lse.dim()
    lse_all = torch.logsumexp(lse, dim=dim)
    shift = torch.where(torch.isinf(lse_all), torch.zeros_like(lse_all), lse_all)
    weights = torch.exp(lse - shift.unsqueeze(dim))  # 0 for empty parts
    out = (weights.unsqueeze(-1) * o).sum(dim=dim)
    return out, lse_all


def downdate_state(o_full: Tensor, lse_full: Tensor, o_part: Tensor, lse_part: Tensor):
    """Remove a sub-state from a state: the inverse of :func:`merge_state`.

    Loses precision when the part holds almost all the mass; removing everything gives the
    empty state.
    """
    ratio = torch.exp(lse_part - torch.where(torch.isinf(lse_full), 0.0, lse_full))
    ratio = torch.where(torch.isinf(lse_part), torch.zeros_like(ratio), ratio)
    rest = 1.0 - ratio
    empty = rest <= 0
    lse = torch.where(empty, torch.full_like(lse_full, float("-inf")), lse_full + torch.log(rest))
    safe_rest = torch.where(empty, torch.ones_like(rest), rest)
    o = (o_full - ratio[..., None] * o_part) / safe_rest[..., None]
    o = torch.where(empty[..., None], torch.zeros_like(o), o)
    return o, lse


def empty_state(shape: tuple[int, ...], head_dim: int, device=None, dtype=torch.float32):
    """The state of an empty key set: ``o = 0``, ``lse = -inf``."""
    o = torch.zeros(*shape, head_dim, device=device, dtype=dtype)
    lse = torch.full(shape, float("-inf"), device=device, dtype=dtype)
    return o, lse
