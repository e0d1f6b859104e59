"""A fractional Top-K budget across prompts of different lengths on one optimized model.

``generate(..., cache_implementation="static")`` sizes its cache prompt + max_new_tokens, so a
second prompt of another length brings another cache length; dynamo then recompiles the decode
step with the cache length symbolic (automatic dynamic shapes). A fractional
``TopKPhiConfig.budget`` is resolved by the decode op against the cache length of the step it
runs, so the second prompt must decode, and decode what a fresh optimized model decodes on that
prompt alone (the same K: ``ceil(fraction * cache length)``). It used to be refused at the
rewrite ("TopKPhiConfig.budget as a fraction needs a static cache length").

The lengths differ by one key, as the passkey prompts that found the bug (4,085 / 4,086); with
a 0.25 budget that changes K (11 -> 12 keys of 44 / 45), so the second prompt's logits match
the fresh model's only with the second prompt's own K.
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_zoo import ZOO
from passes_harness import _fresh_compiles

import macopt
from macopt import _hf_compat
from macopt.passes._compat import dynamo, dynamo_counters

NEW_TOKENS = 4
LENGTHS = (40, 41)  # static caches of 44 and 45 keys
TOPK = dict(sinks=1, tail=2, page_size=16, selector="exact")
CONFIGS = {
    "topk_phi": macopt.TopKPhiConfig(budget=0.25, **TOPK),
    "mac_topk_phi": macopt.MACTopKPhiConfig(
        macopt.MACConfig(ring_size=16, offset=4, tau=1.0, t_min=0),
        macopt.TopKPhiConfig(budget=0.25, **TOPK)),
}


def _reference() -> torch.nn.Module:
    model = ZOO["llama"].build()
    model.set_attn_implementation("sdpa")
    return model


@torch.no_grad()
def _generate(model: torch.nn.Module, length: int, compiled: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and logits of a static-cache generate(); ``compiled``: the decode step
    compiled by Inductor (what transformers does on GPUs), else the plain call (on CPU
    transformers compiles nothing: the steps go through macopt's eager route)."""
    ids = torch.randint(2, 256, (1, length), generator=torch.Generator().manual_seed(length))
    compile_config = {"compile_config": _hf_compat.compile_config()} if compiled else {}
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, cache_implementation="static", output_logits=True,
                         return_dict_in_generate=True, **compile_config)
    return out.sequences[:, length:], torch.stack(out.logits, 1)


@pytest.mark.parametrize(("method", "compiled"), [("topk_phi", True), ("mac_topk_phi", False)])
def test_a_second_prompt_of_another_length_decodes_as_a_fresh_model_does(method, compiled):
    dynamo.reset()  # the first prompt compiles the cache length static, the second dynamic
    reference = _reference()
    model = macopt.optimize(copy.deepcopy(reference), CONFIGS[method])
    with _fresh_compiles():
        _generate(model, LENGTHS[0], compiled)
        recompiles = dynamo_counters["stats"]["unique_graphs"]
        tokens, logits = _generate(model, LENGTHS[1], compiled)
        assert dynamo_counters["stats"]["unique_graphs"] > recompiles  # a new (dynamic) graph
        fresh = macopt.optimize(copy.deepcopy(reference), CONFIGS[method])
        dynamo.reset()  # the fresh model compiles the second prompt's length static
        want_tokens, want_logits = _generate(fresh, LENGTHS[1], compiled)
    # Every step of the second prompt ran through the method (its prefill reallocated the
    # sites' state, sized by the cache length, so the counters start there).
    assert [s.decode_steps for s in macopt.stats(model)] == [NEW_TOKENS - 1] * 2
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)


def test_a_fraction_covering_the_cache_decodes_the_unmodified_tokens_at_both_lengths():
    dynamo.reset()
    reference = _reference()
    model = macopt.optimize(copy.deepcopy(reference),
                            macopt.TopKPhiConfig(budget=1.0, **TOPK))
    with _fresh_compiles():
        for length in LENGTHS:
            tokens, logits = _generate(model, length, compiled=False)
            want_tokens, want_logits = _generate(reference, length, compiled=False)
            assert torch.equal(tokens, want_tokens), length
            torch.testing.assert_close(logits, want_logits, atol=2e-4, rtol=2e-4)
