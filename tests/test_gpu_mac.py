"""The MAC decode step on a real GPU at Llama-3.1-8B sizes (skipped without CUDA)."""

import copy

import pytest
import torch
from model_zoo import VOCAB, ZOO

import macopt
from macopt import mac_state
from macopt._hf_compat import static_cache
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


def test_the_two_op_step_captured_in_a_cuda_graph_equals_the_plain_step():
    # mac_match runs on the side stream (macopt.side_stream): the capture must record its
    # fork and join, and the replay give the plain step's output and ring, bit for bit.
    q, q_pre, k, v, ring, t, s0 = _step_inputs(2, 8192, 512, 0.5, seed=7)
    site, scale = 990_001, 128**-0.5
    site_ring, _ = mac_state.ring_for(site, q_pre, 512, 0)
    ops = torch.ops.macopt

    def step():
        found = ops.mac_match(q_pre, t, s0, site, 512, 0, 4, 0)
        return ops.mac_decode_matched(q, q_pre, k, v, t, s0, *found, None, None, scale, site,
                                      512, 256, 0, 0.5, 0, 4, 0)

    site_ring.copy_(ring)
    step()  # compiles the kernels before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    site_ring.copy_(ring)
    graph.replay()
    plain = ring.clone()
    want, hit, _ = mac.mac_decode_step(q, q_pre, k, v, plain, t, s0, scale, offset=256,
                                       tau=0.5, t_min=0, max_depth=4)
    torch.cuda.synchronize()
    assert hit.any() and not hit.all()
    assert torch.equal(out, want)
    for got, expected in zip(site_ring.tensors(), plain.tensors(), strict=True):
        assert torch.equal(got, expected)


FORCED_HITS = -1000.0  # radius 2 D (1 - tau)^2 beyond any distance: every valid entry hits


@torch.no_grad()
@pytest.mark.parametrize("tau", [1.0, FORCED_HITS])
def test_decode_compiled_with_cuda_graphs_equals_the_eager_route(tau):
    """``torch.compile(mode="reduce-overhead")`` (CUDA-graph trees, the match on the side
    stream) decodes what the same method decodes eagerly; with tau 1 (no hit) that is the
    unmodified model's decode."""
    reference = ZOO["llama"].build().cuda()
    reference.set_attn_implementation("sdpa")
    config = macopt.MACConfig(ring_size=16, offset=4, tau=tau, t_min=0, max_chain_depth=2**30)
    prompt = torch.randint(2, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))

    def decode(model, compiled):
        cache = static_cache(model, 1, 64, torch.float32, "cuda")
        logits = model(input_ids=prompt.cuda(), past_key_values=cache, use_cache=True).logits

        def step(ids, cache):
            return model(input_ids=ids, past_key_values=cache, use_cache=True).logits

        run = torch.compile(step, mode="reduce-overhead", fullgraph=True) if compiled else step
        ids, out = logits[:, -1:].argmax(-1), []
        for _ in range(12):
            logits = run(ids, cache).clone()  # a CUDA-graph output is overwritten by the replay
            out.append(logits)
            ids = logits[:, -1:].argmax(-1)
        return torch.cat(out, dim=1)

    compiled = decode(macopt.optimize(copy.deepcopy(reference), config), compiled=True)
    eager = decode(macopt.optimize(copy.deepcopy(reference), config), compiled=False)
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-3)
    if tau == 1.0:
        torch.testing.assert_close(compiled, decode(reference, compiled=False), atol=1e-3,
                                   rtol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("config", [macopt.MACConfig(ring_size=16), macopt.TopKPhiConfig()],
                         ids=["mac", "topk_phi"])
def test_generate_with_a_chunked_prefill_keeps_state_out_of_the_cuda_graph_pool(config):
    """generate()'s own compile runs each prefill chunk through CUDA-graph trees: the state
    first allocated in the first chunk's warm-up must not land in the graphs' pool, or the
    next chunk's recording stops ("tensor(s) in the cudagraph pool not tracked as outputs",
    BENCHMARKS.md 22). Chunks longer than MAC's ring leave the state a one-shot prefill
    leaves, so the logits match those of the same method without chunks."""
    reference = ZOO["llama"].build().cuda()
    reference.set_attn_implementation("sdpa")
    prompt = torch.randint(2, VOCAB, (2, 96), generator=torch.Generator().manual_seed(0)).cuda()

    def logits(chunk):
        model = macopt.optimize(copy.deepcopy(reference), config)
        chunking = {"prefill_chunk_size": chunk} if chunk else {}
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=8, cache_implementation="static",
                             output_logits=True, return_dict_in_generate=True, **chunking)
        return torch.stack(out.logits, dim=1)

    torch.testing.assert_close(logits(32), logits(0), atol=1e-3, rtol=1e-3)
