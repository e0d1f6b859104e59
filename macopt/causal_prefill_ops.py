"""Prefill attention that takes SDPA's causal path when its mask is the causal one
(``torch.ops.macopt.mask_is_causal`` / ``causal_prefill_attention``): what the
``macopt_eager`` route runs at prefill sites (:mod:`macopt.passes.causal_prefill`).

Why. Traced by dynamo, transformers cannot see that a static cache is empty (its write counter
is a tensor), so it materialises a boolean mask ``[B,1,C,N]`` over the whole cache where eager
would pass ``is_causal=True``. SDPA with a mask runs no causal kernel: every query attends all
``N`` keys, the masked ones included, the KV heads are repeated (``repeat_kv`` copies of the
cache), and on CUDA the flash kernel is not eligible.

What. ``mask_is_causal`` reads the mask once per forward (one host sync, shared by all
layers): is it exactly SDPA's top-left causal pattern, ``mask[b,0,i,j] == (j <= i)`` for every
row, query and key? ``causal_prefill_attention`` then makes eager transformers' own call
(``sdpa_attention_forward`` with no mask): keys cut to the first ``C``, ``is_causal=True``,
grouped KV heads through ``enable_gqa``. Keys ``j >= C`` are masked for every query, so the
cut drops nothing, and SDPA's ``is_causal`` on ``C x C`` is the same pattern: both branches
compute SDPA with this mask, exactly. Any other mask (left padding, a chunk continuing a
sequence, a sliding window) runs the masked call eager transformers makes with a mask
(repeated KV heads, the boolean mask).

>>> causal = torch.ops.macopt.mask_is_causal(mask)  # doctest: +SKIP
>>> o = torch.ops.macopt.causal_prefill_attention(q, k, v, mask, causal, 0.125,
...                                                 [0, 2, 1, 3])  # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

_CHECK_ELEMENTS = 1 << 26  # mask entries compared per block: 128 MB of scratch, 17 blocks at 32K


def _check_mask(mask: Tensor) -> None:
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask: expected a boolean [B, 1, C, N] tensor, got {mask.dtype} "
                         f"{tuple(mask.shape)}")


@torch.library.custom_op("macopt::mask_is_causal", mutates_args=())
def mask_is_causal(mask: Tensor) -> Tensor:
    """A CPU bool scalar: whether ``mask[b, 0, i, j] == (j <= i)`` for every entry (SDPA's
    ``is_causal``, aligned top-left). Compared in blocks of query rows, so the scratch stays
    small at long contexts; one host sync at the end."""
    _check_mask(mask)
    queries, keys = mask.shape[-2:]
    if queries > keys:
        return torch.tensor(False)
    key_index = torch.arange(keys, device=mask.device)
    rows = max(1, _CHECK_ELEMENTS // max(keys, 1))
    causal = torch.ones((), dtype=torch.bool, device=mask.device)
    for start in range(0, queries, rows):
        stop = min(queries, start + rows)
        query_index = torch.arange(start, stop, device=mask.device)
        expected = key_index[None, :] <= query_index[:, None]
        causal &= (mask[:, :, start:stop] == expected).all()
    return causal.cpu()


@mask_is_causal.register_fake
def _(mask):
    _check_mask(mask)
    return torch.empty((), dtype=torch.bool, device="cpu")


def _check_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, causal: Tensor,
                     layout: list[int], sizes: bool = True) -> None:
    """Ranks, dtypes and devices; with ``sizes`` (real tensors, not the fake: comparing
    symbolic sizes there would add shape guards after the trace) the sizes too."""
    _check_mask(mask)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v: expected [B, Hq, C, D], [B, Hkv, N, D], [B, Hkv, N, Dv], "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if causal.device.type != "cpu" or causal.dtype != torch.bool or causal.numel() != 1:
        raise ValueError("causal: expected the CPU bool scalar of macopt::mask_is_causal")
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


@torch.library.custom_op("macopt::causal_prefill_attention", mutates_args=())
def causal_prefill_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, causal: Tensor,
                             scale: float | None, layout: list[int]) -> Tensor:
    """``SDPA(q, k, v, attn_mask=mask, scale)`` for ``q[B,Hq,C,D]`` and un-repeated
    ``k/v[B,Hkv,N,D]``: through ``is_causal`` on the first ``C`` keys when ``causal`` (from
    :func:`mask_is_causal` of this mask) is True, else with the mask and repeated KV heads;
    in both, the call eager transformers makes for that mask. The result's dims lie in memory
    in the order ``layout`` (a permutation of 0..3, outermost first; copied there if SDPA
    returned another layout)."""
    _check_attention(q, k, v, mask, causal, layout)
    group = q.shape[1] // k.shape[1]
    # transformers (use_gqa_in_sdpa, CUDA and CPU) groups heads in SDPA only without a mask
    # and with equal head dims <= 256; it repeats the KV heads otherwise.
    native_gqa = group > 1 and bool(causal) and k.shape[-1] == v.shape[-1] <= 256
    if group > 1 and not native_gqa:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if bool(causal):
        queries = q.shape[2]
        out = F.scaled_dot_product_attention(q, k[:, :, :queries], v[:, :, :queries],
                                             is_causal=True, scale=scale,
                                             **({"enable_gqa": True} if native_gqa else {}))
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    result = _output_like(q, v, layout)
    if out.stride() == result.stride():
        return out
    return result.copy_(out)


@causal_prefill_attention.register_fake
def _(q, k, v, mask, causal, scale, layout):
    _check_attention(q, k, v, mask, causal, layout, sizes=False)
    return _output_like(q, v, layout)


# What passes/causal_prefill.py inserts.
MASK_IS_CAUSAL = torch.ops.macopt.mask_is_causal.default
CAUSAL_PREFILL_ATTENTION = torch.ops.macopt.causal_prefill_attention.default
