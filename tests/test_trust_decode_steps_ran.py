"""Equal tokens prove nothing when nothing ran (issue 17, B9).

For every family of the test matrix (``tests/model_zoo.ZOO``) and every stateful method, a
short ``generate()`` with a static and with a dynamic cache must decode through macopt: each
decode site ``explain`` reports rewritten shows ``decode_steps`` in ``stats`` for every step,
and each site left alone says why. A family macopt cannot handle must be refused with its
reason (GPT-2 has no RoPE for MAC's pre-RoPE query). A run that rewrote nothing, or whose
counters stayed at zero, fails here, whatever tokens it produced.

nanoGPT has no ``generate()`` and no dynamic cache: its own greedy loop over its static cache
runs under "static" only.
"""

from __future__ import annotations

import pytest
import torch
from model_zoo import ZOO
from nanogpt import NanoGPT, greedy_generate

import macopt
from macopt.passes._compat import dynamo

PROMPT, NEW_TOKENS = 8, 3  # the prefill gives the first token; decode steps give the rest
METHODS = {
    # Budgets as token counts (fractions of a changing cache length:
    # tests/test_fractional_budget_prompt_lengths.py).
    "mac": macopt.MACConfig(ring_size=16, offset=4, tau=1.0, t_min=0),
    "topk_phi": macopt.TopKPhiConfig(sinks=1, tail=2, budget=32, page_size=16),
    "mac_topk_phi": macopt.MACTopKPhiConfig(
        macopt.MACConfig(ring_size=16, offset=4, tau=1.0, t_min=0),
        macopt.TopKPhiConfig(sinks=1, tail=2, budget=32, page_size=16)),
}
CACHES = ("static", "dynamic")
CASES = [(family, method, cache) for family in ZOO for method in METHODS for cache in CACHES
         if not (family == "nanogpt" and cache == "dynamic")]


@torch.no_grad()
def generate(model: torch.nn.Module, cache: str) -> None:
    ids = torch.randint(2, 256, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    if isinstance(model, NanoGPT):
        greedy_generate(model, model, ids, torch.ones_like(ids), NEW_TOKENS)
        return
    static = {"cache_implementation": "static"} if cache == "static" else {}
    model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                   **static)


def decode_steps_expected(model: torch.nn.Module) -> int:
    # nanoGPT's greedy loop also runs the step after the last token.
    return NEW_TOKENS if isinstance(model, NanoGPT) else NEW_TOKENS - 1


@pytest.mark.parametrize(("family", "method", "cache"), CASES)
def test_generate_decodes_through_macopt_or_says_why_not(family, method, cache):
    dynamo.reset()  # each case compiles its own graphs: no recompile limit carried over
    config = METHODS[method]
    if config.needs_pre_rope_query and ZOO[family].rope_form is None:
        with pytest.raises(ValueError, match="has no RoPE.*needs the pre-RoPE query"):
            macopt.optimize(ZOO[family].build(), config)
        return
    model = macopt.optimize(ZOO[family].build(), config)
    generate(model, cache)

    decode = [r for r in macopt.explain(model) if r.phase == "decode"]
    rewritten = [r.layer for r in decode if r.rewritten]
    skipped = [r for r in decode if not r.rewritten]
    assert (len(rewritten), len(skipped)) == ZOO[family].decode_sites(method), decode
    assert all(r.reason.strip() for r in skipped), skipped
    counted = {s.layer: (s.decode_steps, s.prefills) for s in macopt.stats(model)}
    steps = decode_steps_expected(model)
    assert counted == {layer: (steps, 1) for layer in rewritten}, counted
