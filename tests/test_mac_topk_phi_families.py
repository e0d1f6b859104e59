"""MAC + Top-K + phi through the passes (tiny random Llama and Qwen3-like models, CPU).

With a Top-K budget covering the whole cache and tau = 1.0 (nothing matches), every step's
prefix comes from Top-K + phi with every middle key retrieved (the completion's remainder is
empty) and the tail is exact: ``mac_topk_phi`` must decode the unmodified model's greedy
tokens, batch 3 with decode steps compiled by Inductor (``fullgraph=True``) and batch 1 eagerly
(through the rewritten graph, ``macopt_eager``). With a permissive tau (the random models'
pre-RoPE queries are small: nearly every step hits once matching starts) and a two-token
budget, hits happen, the stats show them and the output stays close to exact.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from model_zoo import ZOO
from passes_harness import DECODE_STEPS, _fresh_compiles, generate, hf_generate, prompts

import macopt
from macopt.passes._compat import dynamo

FAMILIES = ("llama", "qwen3")  # qwen3: q-norm before RoPE, GQA group 4
EXACT_PARTS = macopt.MACTopKPhiConfig(
    macopt.MACConfig(ring_size=16, offset=4, tau=1.0, t_min=0, batch_capacity=3),
    macopt.TopKPhiConfig(sinks=1, tail=2, budget=1.0, page_size=16))
HITS = macopt.MACTopKPhiConfig(
    macopt.MACConfig(ring_size=16, offset=4, tau=0.45, t_min=0, batch_capacity=3),
    # the completion on: on random weights attention is near-uniform, and its estimate of the
    # unretrieved middle is what keeps a 2-key budget close to exact
    macopt.TopKPhiConfig(sinks=1, tail=2, budget=2, selector="exact", completion=True))


def _build(name: str) -> torch.nn.Module:
    model = ZOO[name].build()
    model.set_attn_implementation("sdpa")
    return model


@functools.cache
def run(name: str):
    dynamo.reset()  # fresh recompile counts: the eager path compiles the shared forward too
    reference = _build(name)
    model = macopt.optimize(copy.deepcopy(reference), EXACT_PARTS)
    with _fresh_compiles():
        optimized = {1: generate(model, 1, compiled=False), 3: generate(model, 3, compiled=True)}
    expected = {b: generate(reference, b, compiled=False) for b in (1, 3)}
    return list(macopt.explain(model)), macopt.stats(model), optimized, expected


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("batch", [1, 3])
def test_with_every_middle_key_retrieved_and_no_hits_it_decodes_the_unmodified_tokens(
        name, batch):
    _, _, optimized, expected = run(name)
    got, want = optimized[batch], expected[batch]
    assert got.tokens.shape == (batch, DECODE_STEPS)
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logits, want.logits, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_decode_and_prefill_site_is_rewritten_to_the_composed_ops(name):
    reports, stats, _, _ = run(name)
    sites = ZOO[name].decode_sites("mac")[0]
    for phase in ("decode", "prefill"):
        rewritten = [r for r in reports if r.phase == phase and r.rewritten]
        assert len(rewritten) == sites, phase
        assert all(r.method == "mac_topk_phi" for r in rewritten)
    assert [layer.method for layer in stats] == ["mac_topk_phi"] * sites
    for layer in stats:
        # The counters cover the runs since the site's state was last allocated: the eager
        # batch-1 run and the compiled batch-3 run, or the latter alone where its other
        # shapes reallocated the state (qwen3). Each run prefills once and decodes every step.
        assert layer.prefills in (1, 2), stats
        assert layer.decode_steps == layer.prefills * (DECODE_STEPS - 1), stats
        # Nothing hits and every middle key is retrieved: every key of every step is read.
        assert layer.hit_rate == 0.0 and layer.keys_read == layer.keys_full > 0


@functools.cache
def run_hits():
    dynamo.reset()
    reference = _build("llama")
    model = macopt.optimize(copy.deepcopy(reference), HITS)
    with _fresh_compiles():
        got = generate(model, 3, compiled=True)
    return got, generate(reference, 3, compiled=False), macopt.stats(model)


def test_hits_happen_and_stats_count_the_keys_of_hits_and_misses():
    _, _, stats = run_hits()
    for layer in stats:
        assert layer.method == "mac_topk_phi" and 0.5 < layer.hit_rate < 1.0
        assert 0 < layer.keys_read < layer.keys_full


def test_with_hits_the_output_stays_finite_and_close_to_exact():
    got, want, _ = run_hits()
    assert torch.isfinite(got.logits).all()
    assert (got.logits - want.logits).abs().max() > 0  # rewritten: not the unmodified model
    same = (got.tokens == want.tokens).all(0).long().cumprod(0)
    steps = int(same.sum()) + 1
    assert steps > 4
    drift = (got.logits - want.logits)[:, :steps].abs().max()
    assert drift < 0.1 * want.logits[:, :steps].abs().max()


def test_state_resets_between_generate_calls():
    """A second generation on an eager-optimized model equals a fresh model's generation of
    the same prompts (with hits, so a leaked ring or summary would change the tokens)."""
    reference = _build("llama")
    used = macopt.optimize(copy.deepcopy(reference), HITS)
    fresh = macopt.optimize(copy.deepcopy(reference), HITS)
    ids, mask = prompts(3)
    first, _ = hf_generate(used, ids, mask, False)
    second, second_logits = hf_generate(used, ids.roll(3, dims=1), mask, False)
    want, want_logits = hf_generate(fresh, ids.roll(3, dims=1), mask, False)
    assert not torch.equal(first, second)  # different prompts, different generations
    assert torch.equal(second, want)
    torch.testing.assert_close(second_logits, want_logits, atol=0, rtol=0)
    assert macopt.stats(used)[0].hit_rate > 0.5
