"""MAC in generation: hits happen and stay close to exact, state resets between generate
calls, and stats report them (tiny random Llama, CPU).

The random models' pre-RoPE queries are small (~0.05 per element), so with tau = 0.45 (radius
``2 D (1 - tau)^2 = 38.7`` at D = 64) nearly every step hits once matching starts (t_min = 0).
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

# Absolute radius: the premise above is about these models' query scale.
HITS = macopt.MACConfig(ring_size=16, offset=4, tau=0.45, t_min=0, batch_capacity=3,
                       radius="absolute")


def _llama() -> torch.nn.Module:
    model = ZOO["llama"].build()
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture(scope="module")
def reference():
    # Each test compiles fresh models whose forward shares one code object: start the module
    # with dynamo's recompile counts at zero.
    dynamo.reset()
    return _llama()


@pytest.fixture(scope="module")
def compiled_hits(reference):
    """Left-padded batch 3 with hits, decode steps compiled by Inductor, and its stats."""
    model = macopt.optimize(copy.deepcopy(reference), HITS)
    with _fresh_compiles():
        run = generate(model, 3, compiled=True)
    return run, macopt.stats(model)


def test_hits_happen_and_stats_show_them(compiled_hits):
    _, stats = compiled_hits
    assert len(stats) == 2
    for layer in stats:
        assert layer.hit_rate > 0.5
        assert len(layer.head_hit_rates) == 4 and all(0 < h <= 1 for h in layer.head_hit_rates)
        assert 0 < layer.keys_read < layer.keys_full
        assert layer.decode_steps == DECODE_STEPS - 1 and layer.prefills == 1


def test_ring_memory_is_what_the_config_documents(compiled_hits):
    # rows * Hq * M * (D * (4 fp32 query + 4 fp32 state) + 12) plus 7 * Hq int64 counters
    expected = 3 * 4 * 16 * (64 * 8 + 12) + 7 * 4 * 8
    assert [layer.nbytes for layer in compiled_hits[1]] == [expected, expected]


def test_with_hits_the_output_stays_finite_and_close_to_exact(compiled_hits, reference):
    run, _ = compiled_hits
    want = generate(reference, 3, compiled=False)
    assert torch.isfinite(run.logits).all()
    # Compare the steps whose inputs are still identical: up to the first differing token
    # (greedy decoding of these random models has tiny margins, so one flip is enough).
    same = (run.tokens == want.tokens).all(0).long().cumprod(0)
    steps = int(same.sum()) + 1
    assert steps > 4
    drift = (run.logits - want.logits)[:, :steps].abs().max()
    scale = want.logits[:, :steps].abs().max()
    assert drift < 0.1 * scale


def test_stats_table_has_a_row_per_layer(compiled_hits):
    table = compiled_hits[1].table()
    assert table.row_count == 2


@functools.cache
def _eager_tokens(model: torch.nn.Module, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = prompts(3)
    ids = ids.roll(seed, dims=1) if seed else ids
    return hf_generate(model, ids, mask, False)


def test_state_resets_between_generate_calls(reference):
    """A second generation on an eager-optimized model equals a fresh model's generation of
    the same prompts (with hits, so a leaked ring would change the tokens)."""
    used = macopt.optimize(copy.deepcopy(reference), HITS)
    fresh = macopt.optimize(copy.deepcopy(reference), HITS)
    first, _ = _eager_tokens(used, 0)
    second, second_logits = _eager_tokens(used, 3)
    want, want_logits = _eager_tokens(fresh, 3)
    assert not torch.equal(first, second)  # different prompts, different generations
    assert torch.equal(second, want)
    torch.testing.assert_close(second_logits, want_logits, atol=0, rtol=0)
    assert macopt.stats(used)[0].hit_rate > 0.5


def test_eager_optimized_model_runs_the_mac_ops(reference):
    model = macopt.optimize(copy.deepcopy(reference), HITS)
    ids, mask = prompts(1)
    hf_generate(model, ids, mask, False)
    assert {(r.phase, r.decision) for r in macopt.explain(model)} == {
        ("prefill", "rewritten"), ("decode", "rewritten")}


def test_reoptimizing_with_exact_restores_the_plain_forward(reference):
    model = macopt.optimize(copy.deepcopy(reference), HITS)
    assert "forward" in vars(model)
    macopt.optimize(model, macopt.ExactConfig())
    assert "forward" not in vars(model)
