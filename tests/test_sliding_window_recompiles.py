"""Decode graphs of a sliding-window static cache (Gemma3): how many, and why.

transformers' ``StaticSlidingWindowLayer.update`` branches in Python on its int length counter,
``is_full = cumulative_length_int >= max_cache_len``, so a generate() whose window fills during
decode compiles one decode graph while the window fills and one once it is full. That split is
the unmodified model's; macopt adds no recompile of its own. Without
``macopt._hf_compat.compile_window_lengths_dynamic`` dynamo would also specialize the first
decode graph on the prompt length (``cumulative_length_int == 8``) and recompile at the second
step: three graphs instead of two.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from model_zoo import VOCAB, ZOO
from passes_harness import hf_generate

import macopt
from macopt.passes._compat import dynamo, dynamo_counters

WINDOW = 16  # the zoo's gemma3 sliding window
# The forward's cache argument as dynamo names it: ``cache`` from transformers 5.2x on,
# ``past_key_values`` before.
CACHE_ARG = r"kwargs\['(cache|past_key_values)'\]"


def _model(optimized: bool) -> torch.nn.Module:
    model = ZOO["gemma3"].build()
    model.set_attn_implementation("sdpa")
    return macopt.optimize(model, macopt.ExactConfig()) if optimized else model


def _guard_failures() -> list[str]:
    """Every guard failure dynamo recorded so far, first line each, without the compile id."""
    reasons = [r for rs in dynamo.utils.guard_failures.values() for r in rs]
    return [re.sub(r"^\d+/\d+: ", "", r.splitlines()[0]) for r in reasons]


@functools.cache
def decode_compiles(optimized: bool, prompt: int, window_lengths_dynamic: bool = True
                    ) -> tuple[int, list[str]]:
    """Decode graphs one batch-1 generate() compiles, and the guards whose failure recompiled."""
    dynamo.reset()  # dynamo shares compiled code between instances of a class: start empty
    saved = torch.compiler.config.dynamic_sources
    model = _model(optimized)
    ids = torch.randint(2, VOCAB, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    graphs, failures = dynamo_counters["stats"]["unique_graphs"], len(_guard_failures())
    try:
        if not window_lengths_dynamic:
            torch.compiler.config.dynamic_sources = ""
            with pytest.MonkeyPatch.context() as patch:  # keep compile_config from adding it
                patch.setattr(macopt._hf_compat, "compile_window_lengths_dynamic", lambda: None)
                hf_generate(model, ids, torch.ones_like(ids), compiled=True)
        else:
            hf_generate(model, ids, torch.ones_like(ids), compiled=True)
    finally:
        torch.compiler.config.dynamic_sources = saved
    graphs = dynamo_counters["stats"]["unique_graphs"] - graphs
    return graphs, _guard_failures()[failures:]


@pytest.mark.parametrize("optimized", [False, True], ids=["unmodified", "macopt"])
def test_window_filling_during_decode_recompiles_once_when_the_window_is_full(optimized):
    graphs, failures = decode_compiles(optimized, prompt=8)
    assert graphs == 2
    assert len(failures) == 1
    assert re.match(rf"{CACHE_ARG}\.layers\[0\]\.cumulative_length_int <= {WINDOW - 1}  # if "
                    r"is_full:", failures[0]), failures[0]


def test_macopt_compiles_exactly_the_unmodified_models_decode_graphs():
    assert decode_compiles(True, prompt=8) == decode_compiles(False, prompt=8)


@pytest.mark.parametrize("optimized", [False, True], ids=["unmodified", "macopt"])
def test_a_prompt_filling_the_window_decodes_every_step_with_one_graph(optimized):
    assert decode_compiles(optimized, prompt=WINDOW + 4) == (1, [])


def test_without_dynamic_window_lengths_the_first_graph_specializes_on_the_prompt_length():
    graphs, failures = decode_compiles(False, prompt=8, window_lengths_dynamic=False)
    assert graphs == 3
    assert re.match(rf"{CACHE_ARG}\.layers\[0\]\.cumulative_length_int == 8 ", failures[0]), (
        failures[0])
