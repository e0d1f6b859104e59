"""The MAC decode step on a real GPU at Llama-3.1-8B sizes (skipped without CUDA)."""

import pytest
import torch

from macopt.kernels import mac
from macopt.kernels.mac_reference import MACRing, mac_decode_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _step_inputs(batch, n_keys, ring_size, hit_share, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q_heads, kv_heads, head_dim = 32, 8, 128

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen).to(torch.bfloat16)

    q, k, v = randn(batch, q_heads, head_dim), randn(batch, kv_heads, n_keys, head_dim), \
        randn(batch, kv_heads, n_keys, head_dim)
    # Small-integer pre-RoPE queries: exact fp32 distances, so kernel and reference agree on
    # every decision.
    q_pre = torch.randint(-1, 2, (batch, q_heads, head_dim), device="cuda",
                          generator=gen).to(torch.bfloat16)
    t = torch.full((batch,), n_keys - 1, device="cuda", dtype=torch.int64)
    s0 = torch.zeros(batch, device="cuda", dtype=torch.int64)
    ring = MACRing.empty(batch, q_heads, ring_size, head_dim, torch.bfloat16, "cuda")
    window = torch.arange(n_keys - 1 - ring_size, n_keys - 1, device="cuda", dtype=torch.int32)
    ring.pos[..., window % ring_size] = window  # position p lives in slot p mod M
    ring.q.copy_(torch.randint(-1, 2, ring.q.shape, device="cuda", generator=gen))
    ring.o.copy_(torch.randn(ring.o.shape, device="cuda", generator=gen))
    ring.lse.copy_(torch.randn(ring.lse.shape, device="cuda", generator=gen) * 3 + 10)
    # Some entries may not be reused (depth at max_depth 4, or an empty prefix): a nearest one
    # of those is a miss.
    ring.depth.copy_(torch.randint(0, 5, ring.depth.shape, device="cuda", generator=gen))
    empty = torch.rand(ring.lse.shape, device="cuda", generator=gen) < 0.05
    ring.lse.masked_fill_(empty, float("-inf"))
    near = torch.rand(batch, q_heads, device="cuda", generator=gen) < hit_share
    slots = torch.randint(0, ring_size, (batch, q_heads), device="cuda", generator=gen)
    for b, h in near.nonzero().tolist():
        ring.q[b, h, slots[b, h]] = q_pre[b, h]
    return q, q_pre, k, v, ring, t, s0


@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("hit_share", [0.0, 0.5, 1.0])
def test_step_equals_the_reference_at_llama_sizes(batch, hit_share):
    q, q_pre, k, v, ring, t, s0 = _step_inputs(batch, 32768, 512, hit_share, seed=batch)
    params = dict(offset=256, tau=0.5, t_min=0, max_depth=4)
    ring_ref, ring_kernel = (MACRing(*(x.clone() for x in ring.tensors())) for _ in range(2))
    o_ref, hit_ref, keys_ref = mac_decode_step(q, q_pre, k, v, ring_ref, t, s0, 128**-0.5,
                                               compute_dtype=torch.float64, **params)
    o, hit, keys = mac.mac_decode_step(q, q_pre, k, v, ring_kernel, t, s0, 128**-0.5, **params)
    assert torch.equal(hit, hit_ref) and torch.equal(keys, keys_ref)
    torch.testing.assert_close(o.double(), o_ref.double(), atol=2e-2, rtol=2e-2)
    assert torch.equal(ring_kernel.pos, ring_ref.pos)
    assert torch.equal(ring_kernel.depth, ring_ref.depth)
    torch.testing.assert_close(ring_kernel.o, ring_ref.o.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ring_kernel.lse, ring_ref.lse.float(), atol=2e-2, rtol=0)
    if 0 < hit_share:
        assert hit_ref.any()
    if hit_share < 1:
        assert not hit_ref.all()
