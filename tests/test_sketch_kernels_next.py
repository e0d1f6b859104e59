"""The sketch selector's next kernels (examples/research/sketch_kernels_next.py, not yet run on a
GPU) on the CPU interpreter against torch: the scores with the query rounded to fp16, and the
candidates' exact scores, at the shapes the current kernels' tests use."""

import pytest
import torch

from examples.research import sketch_kernels_next as nxt
from macopt.kernels import topk_phi_reference as ref
from macopt.topk_phi_select import (
    _sketch_query,
    build_sketch,
    sketch_scores_reference,
    sketch_shapes,
)


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("n_keys", [33, 300])
def test_next_scores_equal_the_reference_with_an_fp16_query(group, n_keys):
    gen = torch.Generator().manual_seed(group * 100 + n_keys)
    batch, n_kv_heads, head_dim = 2, 2, 64
    k = torch.randn(batch, n_kv_heads, n_keys, head_dim, generator=gen)
    q = torch.randn(batch, n_kv_heads * group, head_dim, generator=gen)
    lo = torch.tensor([2, 0], dtype=torch.int32)
    hi = torch.tensor([n_keys - 5, n_keys], dtype=torch.int32)
    codes_shape, scales_shape = sketch_shapes(batch, n_kv_heads, n_keys, head_dim)
    codes = torch.full(codes_shape, 0xAB, dtype=torch.uint8)
    scales = torch.full(scales_shape, float("nan"))
    build_sketch(k, lo, hi, codes, scales)
    for channels in (0, 5, head_dim):
        _, dims, q_scaled = _sketch_query(q, scales, head_dim**-0.5, n_kv_heads, channels)
        got, maxima = nxt.sketch_scores(codes, dims, q_scaled, lo, hi, n_keys, block_max=True)
        want = sketch_scores_reference(codes, dims, q_scaled.half().float(), lo, hi, n_keys)
        inside = ref.positions_in(lo, hi, n_keys)[:, None, :].expand_as(got)
        assert torch.equal(torch.isinf(got), ~inside)
        torch.testing.assert_close(got[inside].float(), want[inside].float(), atol=2e-3,
                                   rtol=1e-3)
        # each block's best (blocks of a power of two tokens), what the candidate pass reads
        block = 1 << (-(-n_keys // maxima.shape[-1]) - 1).bit_length()
        for i in range(maxima.shape[-1]):
            best = got[..., i * block:(i + 1) * block].float().amax(-1)
            torch.testing.assert_close(maxima[..., i], best)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_next_candidate_scores_equal_torch(dtype):
    gen = torch.Generator().manual_seed(5)
    batch, n_kv_heads, group, n_keys, head_dim = 2, 2, 3, 90, 64
    q = torch.randn(batch, n_kv_heads * group, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, n_kv_heads, n_keys, head_dim, generator=gen).to(dtype)
    cand = torch.stack([torch.randperm(n_keys, generator=gen)[:70] for _ in range(4)])
    cand = cand.view(batch, n_kv_heads, 70).to(torch.int32)
    lo, hi = torch.tensor([3, 10], dtype=torch.int32), torch.tensor([80, 90], dtype=torch.int32)
    got = nxt.candidate_scores(q, k, cand, lo, hi, 0.125)
    k_cand = torch.gather(k.float(), 2, cand.long()[..., None].expand(-1, -1, -1, head_dim))
    want = torch.einsum("bhgd,bhrd->bhgr", q.float().view(batch, n_kv_heads, group, head_dim),
                        k_cand) * 0.125
    inside = (cand >= lo[:, None, None]) & (cand < hi[:, None, None])
    want = want.masked_fill(~inside[:, :, None, :], float("-inf"))
    assert got.shape == want.shape and torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)])
