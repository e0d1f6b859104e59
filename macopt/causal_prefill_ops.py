"""Prefill attention that takes SDPA's causal path when its mask is a causal one
(``torch.ops.macopt.causal_offset`` / ``causal_prefill_attention``): what the
``macopt_eager`` route runs at prefill sites (:mod:`macopt.passes.causal_prefill`).

Why. Traced by dynamo, transformers cannot see that a static cache is empty (its write counter
is a tensor), so it materialises a boolean mask ``[B,1,C,N]`` over the whole cache where eager
would pass ``is_causal=True``. SDPA with a mask runs no causal kernel: every query attends all
``N`` keys, the masked ones included, the KV heads are repeated (``repeat_kv`` copies of the
cache), and on CUDA the flash kernel is not eligible. A chunk continuing a sequence
(``generate(..., prefill_chunk_size=C)``) gets such a mask in eager transformers too: each chunk
then attends the whole static cache (108 s for a 2 x 128K prompt in chunks of 4096 on an H100,
BENCHMARKS.md 21).

What. ``causal_offset`` reads the mask once per forward (one host sync, shared by all layers):
is it a causal pattern for every row, ``mask[b,0,i,j] == (j <= P + i)``, the chunk's queries at
positions ``P .. P+C-1`` over keys ``0 .. P+C-1`` (``P = 0``: SDPA's top-left ``is_causal``)?
It returns ``P``, or -1 for any other mask (left padding, a sliding window).
``causal_prefill_attention`` then attends the first ``P + C`` keys only: at ``P = 0`` with
eager transformers' own call (``sdpa_attention_forward`` with no mask: ``is_causal=True``,
grouped KV heads through ``enable_gqa``); at ``P > 0`` through SDPA's lower-right causal bias
(``torch.nn.attention.bias.causal_lower_right``: the flash kernel on CUDA) with the KV heads
repeated over those keys. Keys ``j >= P + C`` are masked for every query, so the cut drops
nothing, and the causal pattern on ``C x (P + C)`` is the mask's: every branch computes SDPA
with this mask, exactly. Any other mask runs the masked call eager transformers makes (repeated
KV heads, the boolean mask).

>>> offset = torch.ops.macopt.causal_offset(mask)  # doctest: +SKIP
>>> o = torch.ops.macopt.causal_prefill_attention(q, k, v, mask, offset, 0.125,
...                                                 [0, 2, 1, 3])  # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

Tensor = torch.Tensor

# Inductor keeps an op with this tag out of its CUDA graphs (it partitions the graph around
# it): the offset's host sync then runs between graphs instead of breaking a capture, where
# generate()'s own compile runs prefill chunks (None: a torch without the tag).
CUDAGRAPH_UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)
_TAGS = () if CUDAGRAPH_UNSAFE is None else (CUDAGRAPH_UNSAFE,)

_CHECK_ELEMENTS = 1 << 26  # mask entries compared per block: 128 MB of scratch, 17 blocks at 32K


def _check_mask(mask: Tensor) -> None:
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask: expected a boolean [B, 1, C, N] tensor, got {mask.dtype} "
                         f"{tuple(mask.shape)}")


@torch.library.custom_op("macopt::causal_offset", mutates_args=(), tags=_TAGS)
def causal_offset(mask: Tensor) -> Tensor:
    """A CPU int64 scalar: ``P`` if ``mask[b, 0, i, j] == (j <= P + i)`` for every entry, with
    ``P + C <= N`` (``P`` = 0: SDPA's ``is_causal``, aligned top-left), else -1. ``P`` is read
    from the first query's row; compared in blocks of query rows, so the scratch stays small
    at long contexts; one host sync at the end."""
    _check_mask(mask)
    queries, keys = mask.shape[-2:]
    if queries == 0 or queries > keys:
        return torch.tensor(-1)
    offset = mask[0, 0, 0].sum() - 1  # on the device: the pattern check below decides
    key_index = torch.arange(keys, device=mask.device)
    rows = max(1, _CHECK_ELEMENTS // max(keys, 1))
    causal = (offset >= 0) & (offset + queries <= keys)
    for start in range(0, queries, rows):
        stop = min(queries, start + rows)
        query_index = torch.arange(start, stop, device=mask.device) + offset
        expected = key_index[None, :] <= query_index[:, None]
        causal &= (mask[:, :, start:stop] == expected).all()
    return torch.where(causal, offset, -1).cpu()


@causal_offset.register_fake
def _(mask):
    _check_mask(mask)
    return torch.empty((), dtype=torch.int64, device="cpu")


def _check_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, offset: Tensor,
                     layout: list[int], sizes: bool = True) -> None:
    """Ranks, dtypes and devices; with ``sizes`` (real tensors, not the fake: comparing
    symbolic sizes there would add shape guards after the trace) the sizes too."""
    _check_mask(mask)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v: expected [B, Hq, C, D], [B, Hkv, N, D], [B, Hkv, N, Dv], "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if offset.device.type != "cpu" or offset.dtype != torch.int64 or offset.numel() != 1:
        raise ValueError("offset: expected the CPU int64 scalar of macopt::causal_offset")
    if sorted(layout) != [0, 1, 2, 3]:
        raise ValueError(f"layout: expected a permutation of 0..3, got {layout}")
    if sizes and (v.shape[:3] != k.shape[:3] or q.shape[1] % k.shape[1]
                  or mask.shape[2:] != (q.shape[2], k.shape[2])):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, mask "
                         f"{tuple(mask.shape)}: expected query heads a multiple of KV heads, v "
                         f"with k's [B, Hkv, N] and the mask [B, 1, C, N]")


def _output_like(q: Tensor, v: Tensor, layout: list[int]) -> Tensor:
    """An empty ``[B, Hq, C, Dv]`` whose dims lie in memory in the order ``layout`` (outermost
    first): the strides of the traced graph's attention output, whose views of it must stay
    valid whichever branch ran."""
    batch, heads, queries, _ = q.shape
    sizes = (batch, heads, queries, v.shape[-1])
    stored = q.new_empty([sizes[d] for d in layout])
    return stored.permute([layout.index(d) for d in range(4)])


@torch.library.custom_op("macopt::causal_prefill_attention", mutates_args=(), tags=_TAGS)
def causal_prefill_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, offset: Tensor,
                             scale: float | None, layout: list[int]) -> Tensor:
    """``SDPA(q, k, v, attn_mask=mask, scale)`` for ``q[B,Hq,C,D]`` and un-repeated
    ``k/v[B,Hkv,N,D]``: over the first ``P + C`` keys with a causal pattern when ``offset``
    (:func:`causal_offset` of this mask) is ``P >= 0``, else with the mask and repeated KV
    heads. The result's dims lie in memory in the order ``layout`` (a permutation of 0..3,
    outermost first; copied there if SDPA returned another layout)."""
    _check_attention(q, k, v, mask, offset, layout)
    group = q.shape[1] // k.shape[1]
    position = int(offset)
    queries = q.shape[2]
    # transformers (use_gqa_in_sdpa, CUDA and CPU) groups heads in SDPA only without a mask
    # and with equal head dims <= 256; it repeats the KV heads otherwise.
    native_gqa = group > 1 and position == 0 and k.shape[-1] == v.shape[-1] <= 256
    if position >= 0:
        k, v = k[:, :, :position + queries], v[:, :, :position + queries]
    if group > 1 and not native_gqa:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if position == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                             **({"enable_gqa": True} if native_gqa else {}))
    elif position > 0:  # queries at P .. P+C-1: the causal pattern aligned bottom-right
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(queries, position + queries), scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    result = _output_like(q, v, layout)
    if out.stride() == result.stride():
        return out
    return result.copy_(out)


@causal_prefill_attention.register_fake
def _(q, k, v, mask, offset, scale, layout):
    _check_attention(q, k, v, mask, offset, layout, sizes=False)
    return _output_like(q, v, layout)


# What passes/causal_prefill.py inserts.
CAUSAL_OFFSET = torch.ops.macopt.causal_offset.default
CAUSAL_PREFILL_ATTENTION = torch.ops.macopt.causal_prefill_attention.default
