"""The causal prefill rewrite under Inductor (off with ``MACOPT_COMPILED_CAUSAL_PREFILL=0``).

generate()'s own compile runs every prefill chunk through Inductor, where each chunk attends
the whole static cache under transformers' mask (BENCHMARKS.md 22). The optimized modules'
prefill sites in Inductor graphs get the same ops as the ``macopt_eager`` route
(``passes/causal_prefill.py``), tagged so that Inductor keeps them out of its CUDA graphs.
Here on the CPU (no CUDA graphs): the logits stay the unmodified model's, a continuing chunk
attends its causal keys only, and turned off, or outside an optimized model, nothing changes.
``tests/test_gpu_prefill.py`` checks the GPU path.
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_zoo import VOCAB, ZOO

import macopt
from macopt import causal_prefill_ops
from macopt._hf_compat import static_cache
from macopt.bench.e2e import prefill_sites_causal
from macopt.passes._compat import dynamo

CACHE_LEN, FIRST, SECOND = 96, 24, 16

pytestmark = pytest.mark.skipif(causal_prefill_ops.CUDAGRAPH_UNSAFE is None,
                                reason="this torch has no cudagraph_unsafe tag")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def _reference() -> torch.nn.Module:
    model = ZOO["llama"].build()
    model.set_attn_implementation("sdpa")
    return model


@torch.no_grad()
def _chunks_through_compiled(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Logits of a prompt's two chunks, each through ``torch.compile(model)`` (Inductor) into
    one static cache."""
    compiled = torch.compile(model)
    cache = static_cache(model, ids.shape[0], CACHE_LEN, torch.float32, "cpu")
    return [compiled(input_ids=chunk, past_key_values=cache, use_cache=True).logits
            for chunk in (ids[:, :FIRST], ids[:, FIRST:])]


def _ids() -> torch.Tensor:
    return torch.randint(2, VOCAB, (1, FIRST + SECOND), generator=torch.Generator().manual_seed(0))


def test_the_ops_carry_the_tag_that_keeps_them_out_of_cuda_graphs():
    for op in (causal_prefill_ops.CAUSAL_OFFSET, causal_prefill_ops.CAUSAL_PREFILL_ATTENTION):
        assert causal_prefill_ops.CUDAGRAPH_UNSAFE in op.tags


@pytest.mark.parametrize("config", [
    macopt.ExactConfig(), macopt.MACConfig(ring_size=16), macopt.TopKPhiConfig(),
    macopt.MACTopKPhiConfig(macopt.MACConfig(ring_size=16), macopt.TopKPhiConfig()),
], ids=["exact", "mac", "topk_phi", "mac_topk_phi"])
def test_a_compiled_chunk_attends_its_causal_keys_with_the_same_logits(
        monkeypatch, sdpa_calls, config):
    reference = _reference()
    ids = _ids()
    want = _chunks_through_compiled(reference, ids)
    assert sdpa_calls == []  # the unmodified model: not in scope, its graphs untouched
    monkeypatch.delenv("MACOPT_COMPILED_CAUSAL_PREFILL", raising=False)  # the default: on
    model = macopt.optimize(copy.deepcopy(reference), config)
    got = _chunks_through_compiled(model, ids)
    layers = reference.config.num_hidden_layers
    assert sdpa_calls == ["is_causal"] * layers + ["lower_right"] * layers
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    # what `macopt bench generate` records of it: every layer's site in each prefill graph
    # (one or two graphs here: dynamo may already treat the chunk length as dynamic)
    prefill = [r for r in macopt.explain(model) if r.phase == "prefill"]
    assert len(prefill) in (layers, 2 * layers)
    assert prefill_sites_causal(model) == len(prefill)


def test_turned_off_compiled_prefill_sites_stay_as_traced(monkeypatch, sdpa_calls):
    monkeypatch.setenv("MACOPT_COMPILED_CAUSAL_PREFILL", "0")
    model = macopt.optimize(_reference(), macopt.ExactConfig())
    _chunks_through_compiled(model, _ids())
    assert sdpa_calls == []
    assert prefill_sites_causal(model) == 0
