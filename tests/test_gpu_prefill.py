"""The routed prefill's attention on a real GPU: a chunk continuing a sequence attends the keys
before it and its own through SDPA's flash kernel (skipped on machines without CUDA)."""

import pytest
import torch
import torch.nn.functional as F

import macopt  # noqa: F401  (registers torch.ops.macopt)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("offset", [0, 3072])
def test_a_causal_chunk_runs_flash_and_equals_sdpa_with_its_mask(offset):
    # Llama-3.1-8B heads, a chunk of 1024 queries into a static cache of 8192 keys, bf16.
    batch, q_heads, kv_heads, dim, chunk, cache = 2, 32, 8, 128, 1024, 8192
    gen = torch.Generator(device="cuda").manual_seed(offset)
    q = torch.randn(batch, q_heads, chunk, dim, device="cuda", dtype=torch.bfloat16,
                    generator=gen)
    k, v = (torch.randn(batch, kv_heads, cache, dim, device="cuda", dtype=torch.bfloat16,
                        generator=gen) for _ in range(2))
    rows = torch.arange(chunk, device="cuda")[:, None] + offset
    mask = (torch.arange(cache, device="cuda")[None, :] <= rows).expand(batch, 1, chunk, cache)
    found = torch.ops.macopt.causal_offset(mask.contiguous())
    assert int(found) == offset
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got = torch.ops.macopt.causal_prefill_attention(q, k, v, mask.contiguous(), found,
                                                        dim ** -0.5, [0, 1, 2, 3])
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("flash" in name.lower() for name in kernels), kernels
    repeated = [t.float().repeat_interleave(q_heads // kv_heads, dim=1) for t in (k, v)]
    want = F.scaled_dot_product_attention(q.float(), *repeated, attn_mask=mask)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
