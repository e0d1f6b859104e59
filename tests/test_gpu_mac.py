"""The MAC decode step on a real GPU at Llama-3.1-8B sizes, with the match fused into the
attention launch (splits that wait for each other) and without (skipped without CUDA)."""

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
    ring.depth.zero_()
    near = torch.rand(batch, q_heads, device="cuda", generator=gen) < hit_share
    slots = torch.randint(0, ring_size, (batch, q_heads), device="cuda", generator=gen)
    for b, h in near.nonzero().tolist():
        ring.q[b, h, slots[b, h]] = q_pre[b, h]
    return q, q_pre, k, v, ring, t, s0


@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("hit_share", [0.0, 0.5, 1.0])
def test_fused_match_equals_three_launches_and_the_reference(batch, hit_share):
    q, q_pre, k, v, ring, t, s0 = _step_inputs(batch, 32768, 512, hit_share, seed=batch)
    params = dict(offset=256, tau=0.5, t_min=0, max_depth=4)
    sync = torch.zeros(batch, q.shape[1], dtype=torch.int32, device="cuda")
    rings = {name: MACRing(*(x.clone() for x in ring.tensors())) for name in ("ref", "3", "2")}
    o_ref, hit_ref, keys_ref = mac_decode_step(q, q_pre, k, v, rings["ref"], t, s0, 128**-0.5,
                                               compute_dtype=torch.float64, **params)
    results = {}
    for name, fuse in (("3", False), ("2", True)):
        # Three steps in a row: the arrival counters must be back at zero after each.
        for step in range(3):
            ring_in = MACRing(*(x.clone() for x in ring.tensors()))
            results[name] = mac.mac_decode_step(q, q_pre, k, v, ring_in, t, s0, 128**-0.5,
                                                sync=sync, fuse_match=fuse, **params)
            assert not sync.any(), f"step {step}: arrival counters left non-zero"
        rings[name] = ring_in
    for name in ("3", "2"):
        o, hit, keys = results[name]
        assert torch.equal(hit, hit_ref) and torch.equal(keys, keys_ref)
        torch.testing.assert_close(o.double(), o_ref.double(), atol=2e-2, rtol=2e-2)
        assert torch.equal(rings[name].pos, rings["ref"].pos)
    if 0 < hit_share:
        assert hit_ref.any()
    if hit_share < 1:
        assert not hit_ref.all()
