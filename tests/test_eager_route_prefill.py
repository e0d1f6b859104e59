"""The ``macopt_eager`` route's prefill runs what eager runs: SDPA's causal path when the mask is
causal, and the ops eager runs as one kernel kept whole.

Traced, transformers builds a boolean mask over the whole static cache where eager passes
``is_causal=True``; the route checks that mask at run time and attends only the keys a causal
mask reaches (``macopt.causal_prefill_ops``, ``passes/causal_prefill.py``). Identities: the
check accepts exactly the causal patterns of a prompt and of a chunk continuing one (its
offset); the op equals SDPA with the mask for any mask; a routed prefill gives the unmodified
model's logits for a prompt (causal branch), a chunk continuing it in a static cache (causal
branch, aligned bottom-right) and a left-padded batch (masked branch), on several families.
The route also keeps SiLU, GELU and layer norm whole (``api.eager_route_decompositions``):
decomposed, each would be several passes over memory.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from model_zoo import VOCAB, ZOO

import macopt
from macopt import causal_prefill_ops
from macopt._hf_compat import static_cache
from macopt.passes._compat import dynamo
from macopt.passes.causal_prefill import REWRITTEN

MAC = macopt.MACConfig(ring_size=16, offset=4, tau=0.45, t_min=0)
CACHE_LEN, FIRST, SECOND = 96, 24, 16
FAMILIES = ("llama", "qwen3", "gpt_neox")


def causal_mask(batch: int, queries: int, keys: int, offset: int = 0) -> torch.Tensor:
    """SDPA's top-left causal pattern (``offset`` 0) or a chunk at ``offset`` keys."""
    rows = torch.arange(queries)[:, None] + offset
    return (torch.arange(keys)[None, :] <= rows).expand(batch, 1, queries, keys).clone()


def offset_of(mask: torch.Tensor) -> int:
    return int(torch.ops.macopt.causal_offset(mask))


# ---------------------------------------------------------------------------------------------
# The run-time check


@pytest.mark.parametrize("block_elements", [1 << 26, 40])  # one block; many blocks of 1-2 rows
def test_check_accepts_the_causal_masks_of_a_prompt_and_a_continuing_chunk(monkeypatch,
                                                                            block_elements):
    monkeypatch.setattr(causal_prefill_ops, "_CHECK_ELEMENTS", block_elements)
    assert offset_of(causal_mask(1, 7, 7)) == 0 and offset_of(causal_mask(2, 7, 30)) == 0
    assert offset_of(causal_mask(2, 7, 30, offset=5)) == 5
    assert offset_of(causal_mask(1, 7, 30, offset=23)) == 23  # the chunk ends the cache


@pytest.mark.parametrize("block_elements", [1 << 26, 40])
@pytest.mark.parametrize("offset", [0, 5])
@pytest.mark.parametrize("flip", [(0, 6, 6), (1, 3, 20), (0, 2, 1), (1, 0, 0), (0, 0, 0)])
def test_check_rejects_a_mask_one_entry_away(monkeypatch, block_elements, offset, flip):
    """Above the diagonal, in the cache's tail, below the diagonal, the first key (row 1,
    then row 0's, whose first query gives the offset); diagonals shifted by ``offset``."""
    monkeypatch.setattr(causal_prefill_ops, "_CHECK_ELEMENTS", block_elements)
    mask = causal_mask(2, 7, 30, offset)
    batch, query, key = flip
    key = key + offset if key else 0
    mask[batch, 0, query, key] = ~mask[batch, 0, query, key]
    assert offset_of(mask) == -1


def test_check_rejects_padding_a_chunk_past_the_cache_and_more_queries_than_keys():
    padded = causal_mask(2, 7, 30)
    padded[1, :, :, :2] = False  # row 1 left-padded by two tokens
    assert offset_of(padded) == -1
    assert offset_of(causal_mask(1, 7, 10, offset=5)) == -1  # queries past the last key
    assert offset_of(torch.ones(1, 1, 8, 6, dtype=torch.bool).tril()) == -1
    assert offset_of(torch.zeros(1, 1, 1, 6, dtype=torch.bool)) == -1  # a query with no key


def test_check_result_is_a_cpu_scalar_and_passes_opcheck():
    offset = torch.ops.macopt.causal_offset(causal_mask(1, 5, 9, offset=2))
    assert offset.device.type == "cpu" and offset.dtype == torch.int64 and offset.shape == ()
    torch.library.opcheck(causal_prefill_ops.causal_offset, (causal_mask(1, 5, 9),))


# ---------------------------------------------------------------------------------------------
# The attention op


def _attention_inputs(group: int, batch: int = 2, queries: int = 7, keys: int = 30):
    generator = torch.Generator().manual_seed(group)
    kv_heads, dim = 2, 16
    q = torch.randn(batch, kv_heads * group, queries, dim, generator=generator)
    k = torch.randn(batch, kv_heads, keys, dim, generator=generator)
    v = torch.randn(batch, kv_heads, keys, dim, generator=generator)
    return q, k, v


def _masks(batch: int = 2, queries: int = 7, keys: int = 30) -> dict[str, torch.Tensor]:
    padded = causal_mask(batch, queries, keys)
    padded[1, :, :, :3] = False
    return {"causal": causal_mask(batch, queries, keys), "left-padded": padded,
            "continued chunk": causal_mask(batch, queries, keys, offset=4),
            "shared by rows": causal_mask(1, queries, keys)}


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("name", list(_masks()))
def test_attention_is_sdpa_with_the_mask(group, name):
    q, k, v = _attention_inputs(group)
    mask = _masks()[name]
    offset = torch.ops.macopt.causal_offset(mask)
    assert int(offset) == {"left-padded": -1, "continued chunk": 4}.get(name, 0)
    repeated = [t.repeat_interleave(group, dim=1) for t in (k, v)]
    want = F.scaled_dot_product_attention(q, *repeated, attn_mask=mask, scale=0.3)
    for layout, like in (([0, 2, 1, 3], want.transpose(1, 2).contiguous().transpose(1, 2)),
                         ([0, 1, 2, 3], want.contiguous())):
        got = torch.ops.macopt.causal_prefill_attention(q, k, v, mask, offset, 0.3, layout)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert got.stride() == like.stride()


@pytest.mark.parametrize("name", ["causal", "left-padded", "continued chunk"])
def test_attention_passes_opcheck(name):
    q, k, v = _attention_inputs(2)
    mask = _masks()[name]
    args = (q, k, v, mask, torch.ops.macopt.causal_offset(mask), None, [0, 2, 1, 3])
    torch.library.opcheck(causal_prefill_ops.causal_prefill_attention, args)


# ---------------------------------------------------------------------------------------------
# Routed prefills of whole models


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each model test compiles from scratch: the zoo's models share transformers' code
    objects, and enough recompiles of one of them make dynamo run it uncompiled (no passes)."""
    dynamo.reset()


def _model(family: str) -> torch.nn.Module:
    model = ZOO[family].build()
    model.set_attn_implementation("sdpa")
    return model


@torch.no_grad()
def _chunks_through(model: torch.nn.Module, chunks: list[torch.Tensor],
                    attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Logits of each chunk run in turn into one static cache."""
    cache = static_cache(model, chunks[0].shape[0], CACHE_LEN, torch.float32, "cpu")
    extra = {} if attention_mask is None else {"attention_mask": attention_mask}
    return [model(input_ids=ids, past_key_values=cache, use_cache=True, **extra).logits
            for ids in chunks]


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_prompt_builds_no_mask_and_a_chunk_attends_its_causal_keys(family, sdpa_calls,
                                                                          graphs_run):
    """A prompt into an empty static cache: transformers builds no ``[B, 1, C, N]`` mask and
    every layer takes SDPA's is_causal, as eager (``macopt.prompt_mask``); then a chunk
    continuing it (keys already in the cache): its mask, checked at run time, is causal from
    the chunk's offset, so each layer attends the keys before the chunk and its own only (eager
    attends the whole cache under the mask), with the same logits."""
    reference = _model(family)
    ids = _ids(1, FIRST + SECOND)
    chunks = [ids[:, :FIRST], ids[:, FIRST:]]
    want = _chunks_through(reference, chunks)
    model = macopt.optimize(copy.deepcopy(reference), MAC)
    sdpa_calls.clear()
    prompt = _chunks_through(model, chunks[:1])
    assert sdpa_calls == []  # no mask to check: the graph's own SDPA, is_causal
    assert not _square_masks(graphs_run[-1], FIRST)
    torch.testing.assert_close(prompt[0], want[0], atol=1e-4, rtol=1e-4)
    sdpa_calls.clear()
    got = _chunks_through(model, chunks)
    assert sdpa_calls == ["lower_right"] * reference.config.num_hidden_layers
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def _square_masks(gm: torch.fx.GraphModule, queries: int) -> list[torch.fx.Node]:
    """Boolean nodes of ``gm`` holding a mask row per query over the cache ([.., C, N])."""
    def is_mask(node: torch.fx.Node) -> bool:
        val = node.meta.get("val")
        return (isinstance(val, torch.Tensor) and val.dtype == torch.bool and val.dim() >= 2
                and tuple(val.shape[-2:]) == (queries, CACHE_LEN))
    return [n for n in gm.graph.nodes if is_mask(n)]


def test_causal_mask_check_runs_where_the_prompt_check_cannot_decide(monkeypatch, sdpa_calls,
                                                                    graphs_run):
    """A prompt whose cache the routed forward cannot read as empty keeps transformers' mask
    (the mask the test above finds absent); the run-time check then finds it causal and takes
    SDPA's causal path."""
    from macopt import prompt_mask

    reference = _model("llama")
    ids = _ids(1, FIRST)
    want = _chunks_through(reference, [ids])
    model = macopt.optimize(copy.deepcopy(reference), MAC)
    monkeypatch.setattr(prompt_mask, "fresh_causal_prompt", lambda args, kwargs: False)
    sdpa_calls.clear()
    got = _chunks_through(model, [ids])
    assert sdpa_calls == ["is_causal"] * reference.config.num_hidden_layers
    assert _square_masks(graphs_run[-1], FIRST)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)


def test_routed_left_padded_batch_keeps_its_mask_and_the_unmodified_logits(sdpa_calls):
    reference = _model("llama")
    ids = _ids(2, FIRST)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :5] = 0
    ids[1, :5] = 0  # the pad token
    want = _chunks_through(reference, [ids], attention_mask)
    model = macopt.optimize(copy.deepcopy(reference), MAC)
    sdpa_calls.clear()
    got = _chunks_through(model, [ids], attention_mask)
    assert sdpa_calls == ["mask"] * reference.config.num_hidden_layers
    # Pad queries attend no key (transformers leaves them NaN-free only by its own masking):
    # compare the real tokens' logits.
    torch.testing.assert_close(got[0][0], want[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0][1, 5:], want[0][1, 5:], atol=1e-4, rtol=1e-4)


def test_explain_reports_the_prefill_attention_path():
    model = macopt.optimize(_model("llama"), MAC)
    _chunks_through(model, [_ids(1, FIRST)])  # a prompt: SDPA is_causal, no mask built
    ids = _ids(1, SECOND, seed=1)
    cache = static_cache(model, 1, CACHE_LEN, torch.float32, "cpu")
    with torch.no_grad():  # a prompt, then a chunk continuing it: a mask, checked at run time
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    prefill = [r.prefill_attention for r in macopt.explain(model) if r.phase == "prefill"]
    assert prefill.count("kept as traced: SDPA is_causal already") == 2
    assert prefill.count(REWRITTEN) == 2
    assert f"attention: {REWRITTEN}" in str(macopt.explain(model).table().columns[-1]._cells)


def test_float_mask_input_is_kept_as_traced_with_the_reason(sdpa_calls):
    """A 4D float mask passed by the caller reaches the graph as an input (checked at run time
    by the passes, not boolean): the site keeps its traced attention and says why."""
    reference = _model("llama")
    ids = _ids(1, FIRST)
    keep = causal_mask(1, FIRST, CACHE_LEN)
    float_mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    want = _chunks_through(reference, [ids], float_mask)
    model = macopt.optimize(copy.deepcopy(reference), MAC)
    sdpa_calls.clear()
    got = _chunks_through(model, [ids], float_mask)
    assert sdpa_calls == []  # the traced aten attention ran, not the op
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    prefill = [r for r in macopt.explain(model) if r.phase == "prefill"]
    assert prefill and all(r.prefill_attention.startswith("kept as traced: float attention mask")
                           for r in prefill)


@pytest.mark.parametrize(("family", "whole", "pieces"), [
    ("llama", {"silu"}, {"exp", "div"}),
    ("gpt_neox", {"gelu", "native_layer_norm"}, {"erf", "var_mean", "rsqrt"}),
])
def test_routed_graph_keeps_activations_and_norms_whole(family, whole, pieces, graphs_run):
    # The absolute radius: the relative one adds its own rsqrt (the query's norm) to the graph.
    model = macopt.optimize(_model(family), dataclasses.replace(MAC, radius="absolute"))
    _chunks_through(model, [_ids(1, FIRST)])
    assert len(graphs_run) == 1
    ops = {n.target.__name__.split(".")[0] for n in graphs_run[0].graph.nodes
           if n.op == "call_function" and hasattr(n.target, "__name__")}
    assert whole <= ops and not pieces & ops


@pytest.mark.parametrize("selector", ["sketch", "page"])
def test_a_prompt_without_a_mask_keeps_the_topk_phi_state_sized_by_the_cache(selector):
    """With no mask transformers cuts a prompt's keys to its length; the state builders still
    take the whole static cache, so a shorter prompt into the same cache reuses the Top-K + phi
    state (a reallocation would break CUDA graphs recorded over it, macopt.state)."""
    from macopt import state

    model = macopt.optimize(_model("llama"), macopt.TopKPhiConfig(
        sinks=2, tail=4, budget=8, page_size=16, selector=selector))
    sites = {m._macopt_site_id for m in model.modules() if hasattr(m, "_macopt_site_id")}
    seen = []
    for length in (FIRST, SECOND):  # generate() keeps its static cache for the shorter prompt
        ids = _ids(1, length, seed=length)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                           do_sample=False, cache_implementation="static")
        seen.append({sid: state._STATES[sid] for sid in sites if sid in state._STATES})
    assert seen[0] and seen[0].keys() == seen[1].keys()
    assert all(seen[1][sid].buffers is s.buffers for sid, s in seen[0].items())
    cache_len = model._cache.layers[0].keys.shape[2] if hasattr(model, "_cache") else None
    assert {s.spec[3] for s in seen[1].values()} == {cache_len or FIRST + 3 - 1}
    assert FIRST < (cache_len or FIRST + 3 - 1)  # sized by the cache, not by a prompt


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_sdpa_math_backend_prompt_fills_the_same_mac_rings(family):
    """SDPA's math backend (what fp32 attention gets on CUDA) traces to a softmax with a
    ``where`` that zeroes fully masked rows and, for ``is_causal``, a ``[Nq, Nk]`` boolean mask.
    The prefill site must still be matched: it was skipped on CUDA, the rings stayed empty,
    and the first compiled decode step allocated them inside a CUDA-graph pool (BENCHMARKS.md
    17). Both backends' prompts leave the same rings and the unmodified model's logits."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from macopt import state

    reference = _model(family)
    ids = _ids(1, FIRST)
    want = _chunks_through(reference, [ids])[0]
    rings = {}
    for backend in (SDPBackend.MATH, None):
        dynamo.reset()
        state._STATES.clear()
        model = macopt.optimize(copy.deepcopy(reference), MAC)
        with sdpa_kernel(backend) if backend is not None else torch.no_grad():
            got = _chunks_through(model, [ids])[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        decisions = [r.decision for r in macopt.explain(model)]
        assert decisions and set(decisions) == {"rewritten"}, macopt.explain(model)
        rings[backend] = [s.buffers for s in state._STATES.values()]
    math_rings, default_rings = rings[SDPBackend.MATH], rings[None]
    assert len(math_rings) == len(default_rings) == reference.config.num_hidden_layers
    for a, b in zip(math_rings, default_rings, strict=True):
        assert (a.pos >= 0).any()
        for x, y in zip(a.tensors(), b.tensors(), strict=True):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
