"""The routed prefill's attention on a real GPU: a chunk continuing a sequence attends the keys
before it and its own through SDPA's flash kernel; the same under generate()'s own
compile, between its CUDA graphs (skipped on machines without CUDA)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from model_zoo import VOCAB, ZOO

import macopt
from macopt import causal_prefill_ops
from macopt.bench.e2e import prefill_sites_causal

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


@torch.no_grad()
@pytest.mark.parametrize("config", [macopt.ExactConfig(), macopt.MACConfig(ring_size=16),
                                    macopt.TopKPhiConfig()], ids=["exact", "mac", "topk_phi"])
def test_generate_with_chunks_equals_the_traced_chunks(monkeypatch, config):
    """By default generate()'s compiled prefill chunks take the causal ops, which Inductor runs
    between its CUDA graphs (their host sync would break a capture); the logits equal those of
    the chunks as traced (``MACOPT_COMPILED_CAUSAL_PREFILL=0``: the whole cache under the
    mask)."""
    if causal_prefill_ops.CUDAGRAPH_UNSAFE is None:
        pytest.skip("this torch has no cudagraph_unsafe tag")
    reference = ZOO["llama"].build().cuda()
    reference.set_attn_implementation("sdpa")
    prompt = torch.randint(2, VOCAB, (2, 96), generator=torch.Generator().manual_seed(0)).cuda()

    def logits(causal):
        if causal:
            monkeypatch.delenv("MACOPT_COMPILED_CAUSAL_PREFILL", raising=False)
        else:
            monkeypatch.setenv("MACOPT_COMPILED_CAUSAL_PREFILL", "0")
        torch._dynamo.reset()
        model = macopt.optimize(copy.deepcopy(reference), config)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=8, cache_implementation="static",
                             prefill_chunk_size=32, output_logits=True,
                             return_dict_in_generate=True)
        layers = reference.config.num_hidden_layers
        assert (prefill_sites_causal(model) >= layers) == causal
        return torch.stack(out.logits, dim=1)

    torch.testing.assert_close(logits(True), logits(False), atol=1e-3, rtol=1e-3)
