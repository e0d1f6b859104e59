"""The Top-K selectors' Triton kernels on a real GPU at Llama-3.1-8B head shapes, against their
torch paths (skipped on machines without CUDA). bf16 scores tie often, so sets are compared by
overlap and by the attention mass they keep, not element by element."""

import pytest
import torch

import macopt  # noqa: F401  (registers torch.ops.macopt)
from macopt.kernels.exact_select import exact_topk
from macopt.topk_phi_select import build_sketch, exact_selection, sketch_selection, sketch_shapes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _layer(batch, n_keys, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(batch, 8, n_keys, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k[:, :, 1000:1010] += 2 * q.view(batch, 8, 4, 128)[:, :, :1].to(k.dtype)  # needles
    lo = torch.full((batch,), 4, dtype=torch.int32, device="cuda")
    hi = torch.full((batch,), n_keys - 64, dtype=torch.int32, device="cuda")
    return q, k, lo, hi


def _mass(q, k, lo, hi, selected):
    """Per (row, KV group): softmax mass (fp32, over the middle) of the selected tokens, summed
    over the group's heads."""
    batch, n_kv, n_keys, _ = k.shape
    scores = torch.einsum("bhgd,bhnd->bhgn", q.float().view(batch, n_kv, 4, 128), k.float())
    pos = torch.arange(n_keys, device="cuda")
    inside = (pos >= lo[:, None]) & (pos < hi[:, None])
    probs = scores.masked_fill(~inside[:, None, None], float("-inf")).mul(128**-0.5).softmax(-1)
    keep = torch.zeros(batch, n_kv, n_keys, dtype=torch.bool, device="cuda")
    keep.scatter_(-1, selected.clamp(min=0).long(), selected >= 0)
    return (probs * keep[:, :, None]).sum(-1).sum(-1)


@pytest.mark.parametrize("batch,n_keys,top_k", [(2, 32768, 656), (1, 131072, 2622)])
def test_exact_kernel_keeps_the_torch_selectors_mass(batch, n_keys, top_k):
    q, k, lo, hi = _layer(batch, n_keys)
    got = exact_topk(q, k, 128**-0.5, lo, hi, top_k)
    want = exact_selection(q, k, 128**-0.5, lo, hi, top_k)
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / top_k
                            for a, b in zip(got.flatten(0, 1), want.flatten(0, 1), strict=True)])
    assert overlap.min() > 0.95  # near-ties in bf16 order differently
    torch.testing.assert_close(_mass(q, k, lo, hi, got), _mass(q, k, lo, hi, want),
                               rtol=2e-3, atol=1e-4)
    assert (got[:, :, :10] >= 0).all()


def test_sketch_kernels_keep_what_their_torch_reference_keeps():
    batch, n_keys, top_k = 2, 32768, 656
    q, k, lo, hi = _layer(batch, n_keys, seed=1)
    codes_shape, scales_shape = sketch_shapes(batch, 8, n_keys, 128)
    codes = torch.empty(codes_shape, dtype=torch.uint8, device="cuda")
    scales = torch.empty(scales_shape, dtype=torch.float32, device="cuda")
    build_sketch(k, lo, hi, codes, scales)
    args = (q, k, codes, scales, 128**-0.5, lo, hi, top_k)
    got = sketch_selection(*args, triton_path=True)
    want = sketch_selection(*args, triton_path=False)
    torch.testing.assert_close(_mass(q, k, lo, hi, got), _mass(q, k, lo, hi, want),
                               rtol=2e-2, atol=1e-3)
    exact = exact_selection(q, k, 128**-0.5, lo, hi, top_k)
    assert (_mass(q, k, lo, hi, got) >= 0.9 * _mass(q, k, lo, hi, exact)).all()


@pytest.mark.parametrize("rows,n_keys,n_keep", [(8, 131072, 2622), (3, 50000, 1),
                                                (2, 140000, 140000)])
def test_radix_topk_on_the_gpu_is_a_sort(rows, n_keys, n_keep):
    # The exact selector's threshold: exactly the n_keep largest keys, ties to the lower index.
    from macopt.kernels.radix_select import radix_topk

    gen = torch.Generator(device="cuda").manual_seed(n_keys)
    ranks = torch.randint(-2**31, 2**31 - 1, (rows, n_keys), device="cuda", generator=gen,
                          dtype=torch.int32)
    ranks[-1] = ranks[-1] % 97  # many ties
    got = radix_topk(ranks, n_keep)
    index = torch.arange(n_keys, device="cuda")
    order = torch.argsort(-ranks.long() * (2 * n_keys) + index, dim=-1)
    assert torch.equal(got, order[:, :n_keep].sort(dim=-1).values.to(torch.int32))
