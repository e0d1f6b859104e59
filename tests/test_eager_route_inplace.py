"""The ``macopt_eager`` route writes the KV cache in place (tiny random Llama, static cache, CPU).

A stateful method routes the model's eager forward through aot_autograd's functionalized graph,
in which ``StaticLayer.update``'s ``index_copy_`` is an out-of-place ``index_put`` of the whole
cache. Run as it is, that graph holds a second copy of every cache tensor the step writes
(16 GiB at 128K on Llama-8B). The route keeps the writes in place: no node of the graph it runs
allocates a cache-sized tensor, and prefill and decode compute what plain eager computes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_zoo import VOCAB, ZOO

import macopt
from macopt._hf_compat import static_cache

MAC = macopt.MACConfig(ring_size=16, offset=4, tau=0.45, t_min=0)
CACHE_LEN = 96  # unlike any other length in the graph: a cache-sized tensor is a cache copy
FIRST, SECOND = 24, 16  # a prompt, then a chunk continuing it (a cache already holding keys)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    model = ZOO["llama"].build()
    model.set_attn_implementation("sdpa")
    return model


def _chunks() -> list[torch.Tensor]:
    ids = torch.randint(2, VOCAB, (1, FIRST + SECOND), generator=torch.Generator().manual_seed(0))
    return [ids[:, :FIRST], ids[:, FIRST:]]


@torch.no_grad()
def _prefill(model: torch.nn.Module, chunks: list[torch.Tensor]) -> tuple[list, object]:
    """Logits of each chunk run in turn into one static cache, and the cache."""
    cache = static_cache(model, 1, CACHE_LEN, torch.float32, "cpu")
    logits = [model(input_ids=ids, past_key_values=cache, use_cache=True).logits
              for ids in chunks]
    return logits, cache


def _cache_sized_allocations(gm: torch.fx.GraphModule, shape: torch.Size) -> list[str]:
    """Nodes that return a new tensor (no alias of an input: not a view, not in place) of
    ``shape``."""
    found = []
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        val = node.meta.get("val")
        if node.op != "call_function" or schema is None or not isinstance(val, torch.Tensor):
            continue
        if val.shape == shape and schema.returns[0].alias_info is None:
            found.append(node.format_node())
    return found


def _calls(gm: torch.fx.GraphModule, op: torch._ops.OpOverload) -> bool:
    return any(node.target is op for node in gm.graph.nodes)


def test_routed_prefill_allocates_no_copy_of_the_cache(reference, graphs_run):
    model = macopt.optimize(copy.deepcopy(reference), MAC)
    _, cache = _prefill(model, _chunks())
    assert graphs_run, "the optimized model's eager forward did not run the macopt_eager graph"
    shape = cache.layers[0].keys.shape
    for gm in graphs_run:
        assert _cache_sized_allocations(gm, shape) == []
        assert _calls(gm, torch.ops.macopt.mac_prefill.default)


def test_routed_prefill_writes_the_cache_plain_eager_writes(reference, graphs_run):
    """Same logits and the same cache (keys, values, write counters) as the unoptimized model,
    for a prompt and for a chunk continuing it."""
    want_logits, want_cache = _prefill(reference, _chunks())
    model = macopt.optimize(copy.deepcopy(reference), MAC)
    logits, cache = _prefill(model, _chunks())
    assert graphs_run
    for got, want in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for got, want in zip(cache.layers, want_cache.layers, strict=True):
        torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-5)
        assert int(got.cumulative_length) == FIRST + SECOND


@torch.no_grad()
def test_routed_decode_steps_write_in_place_and_match_eager(reference, graphs_run):
    """Decode steps through the route (tau 1: no hit, so exactly full attention) give plain
    eager's tokens, and their graph copies no cache either."""
    no_hits = macopt.MACConfig(ring_size=16, offset=4, tau=1.0, t_min=0)
    tokens = {}
    for name, model in (("eager", reference),
                        ("routed", macopt.optimize(copy.deepcopy(reference), no_hits))):
        logits, cache = _prefill(model, _chunks()[:1])
        ids, out = logits[-1][:, -1:].argmax(-1), []
        for _ in range(4):
            ids = model(input_ids=ids, past_key_values=cache, use_cache=True).logits.argmax(-1)
            out.append(int(ids))
        tokens[name] = out
    assert tokens["routed"] == tokens["eager"]
    decode_op = torch.ops.macopt.mac_decode_matched.default
    decode_graphs = [gm for gm in graphs_run if _calls(gm, decode_op)]
    assert decode_graphs
    for gm in decode_graphs:
        assert _cache_sized_allocations(gm, cache.layers[0].keys.shape) == []


@torch.no_grad()
def test_the_match_is_placed_before_the_layers_key_and_value_projections(reference, graphs_run):
    """The pass hoists each site's match to right after its pre-RoPE query, so that on CUDA its
    side-stream launch overlaps the K/V projections: at least two matmuls (K and V) lie between
    a site's match and its decode op, and the last matmul before the match is the query's."""
    model = macopt.optimize(copy.deepcopy(reference), MAC)
    _, cache = _prefill(model, _chunks()[:1])
    model(input_ids=torch.ones(1, 1, dtype=torch.long), past_key_values=cache, use_cache=True)
    match_op, decode_op = torch.ops.macopt.mac_match.default, torch.ops.macopt.mac_decode_matched
    decode_graphs = [gm for gm in graphs_run if _calls(gm, decode_op.default)]
    assert decode_graphs
    for gm in decode_graphs:
        nodes = list(gm.graph.nodes)
        matches = [i for i, n in enumerate(nodes) if n.target is match_op]
        decodes = [i for i, n in enumerate(nodes) if n.target is decode_op.default]
        mms = [i for i, n in enumerate(nodes) if n.target in (torch.ops.aten.mm.default,
                                                               torch.ops.aten.addmm.default)]
        config = reference.config
        assert len(matches) == len(decodes) == config.num_hidden_layers
        for match, decode in zip(matches, decodes, strict=True):
            assert sum(match < i < decode for i in mms) >= 2
            q_matmul = nodes[max(i for i in mms if i < match)]
            q_width = config.num_attention_heads * config.head_dim
            assert q_width != config.num_key_value_heads * config.head_dim  # tells Q from K/V
            assert q_matmul.meta["val"].shape[-1] == q_width
