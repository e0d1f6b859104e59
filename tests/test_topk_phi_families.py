"""Top-K + phi through the passes on several families (tiny random models, CPU).

With a budget covering the whole cache every middle key is retrieved, so each decode step
attends exactly what full attention does (the completion's remainder is empty): ``topk_phi``
must decode the unmodified model's greedy tokens, batch 1 and a left-padded batch of 3, with
decode steps compiled by Inductor (``fullgraph=True``) and the prefill going through the
rewritten graph that builds the summaries. Sinks 1 and tail 2 leave a middle region even in
the harness's short prompts.
"""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
from model_zoo import ZOO
from passes_harness import DECODE_STEPS, _fresh_compiles, generate
from rich.console import Console

import macopt

FAMILIES = ("llama", "qwen3", "gpt_neox", "gptj")  # GPT-J: float mask inputs, checked
BATCHES = (1, 3)


def whole_context(selector: str) -> macopt.TopKPhiConfig:
    # completion=True: without maps the default is Top-K alone; this runs the summary too
    return macopt.TopKPhiConfig(sinks=1, tail=2, budget=1.0, page_size=16, selector=selector,
                                completion=True)


@functools.cache
def run(name: str, selector: str):
    reference = ZOO[name].build()
    reference.set_attn_implementation("sdpa")
    model = macopt.optimize(copy.deepcopy(reference), whole_context(selector))
    with _fresh_compiles():
        optimized = {b: generate(model, b, compiled=True) for b in BATCHES}
    expected = {b: generate(reference, b, compiled=False) for b in BATCHES}
    return list(macopt.explain(model)), optimized, expected


@pytest.mark.parametrize("selector", ["page", "exact", "sketch"])
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("batch", BATCHES)
def test_a_budget_covering_the_context_decodes_the_unmodified_models_tokens(
        name, selector, batch):
    _, optimized, expected = run(name, selector)
    got, want = optimized[batch], expected[batch]
    assert got.tokens.shape == (batch, DECODE_STEPS)
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logits, want.logits, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_decode_and_prefill_sites_are_rewritten(name):
    reports, _, _ = run(name, "page")
    for phase in ("decode", "prefill"):
        rewritten = [r for r in reports if r.phase == phase and r.rewritten]
        assert len(rewritten) == ZOO[name].decode_sites("topk_phi")[0], phase
        assert all(r.method == "topk_phi" for r in rewritten)


def test_a_one_token_budget_without_completion_changes_the_logits():
    # The other tests pass trivially if nothing were rewritten; this one cannot.
    reference = ZOO["llama"].build()
    reference.set_attn_implementation("sdpa")
    config = macopt.TopKPhiConfig(sinks=1, tail=2, budget=1, selector="exact", completion=False)
    model = macopt.optimize(copy.deepcopy(reference), config)
    with _fresh_compiles():
        got = generate(model, 1, compiled=True)
    want = generate(reference, 1, compiled=False)
    assert (got.logits - want.logits).abs().max() > 0.05


def test_stats_report_the_steps_and_state_bytes_of_topk_phi_sites():
    reference = ZOO["llama"].build()
    reference.set_attn_implementation("sdpa")
    model = macopt.optimize(reference, whole_context("page"))
    with _fresh_compiles():
        generate(model, 1, compiled=True)
    layers = macopt.stats(model)
    assert len(layers) == ZOO["llama"].decode_sites("topk_phi")[0]
    for layer in layers:
        # One prefill, then every decode step through the site; keys read are not counted.
        assert layer.method == "topk_phi"
        assert (layer.decode_steps, layer.prefills) == (DECODE_STEPS - 1, 1)
        assert layer.hit_rate is None and layer.read_fraction is None
        assert layer.completion == "on: completion=True, random features"
        # at least the summary: m, u [Hkv, F] and t [Hkv, F, D] in fp32 for the one row,
        # F = D by default
        head_dim = model.config.head_dim
        assert layer.nbytes > 4 * model.config.num_key_value_heads * head_dim * (2 + head_dim)
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(layers.table())
    assert "topk_phi" in console.export_text()
