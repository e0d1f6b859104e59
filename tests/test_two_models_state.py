"""Two live models of one class, each optimized with a stateful method and compiled.

Their decode graphs are identical up to the site ids baked into them, so nothing but macopt's
guards keeps the second model from replaying the first one's compiled code (dynamo does not
guard on which module instance it traced) or from being served the first one's graph by
Inductor's FX graph cache: either way its decode steps would read and write the first
model's MAC rings.
"""

from __future__ import annotations

import torch
from model_zoo import ZOO
from passes_harness import DECODE_STEPS, hf_generate, prompts

import macopt
from macopt.passes._compat import dynamo_counters, inductor_config


def test_each_model_decodes_with_its_own_state():
    config = macopt.MACConfig(tau=-1000.0, t_min=0)  # every eligible step hits
    first = macopt.optimize(ZOO["llama"].build(), config)
    second = macopt.optimize(ZOO["llama"].build(), config)
    ids, mask = prompts(1)
    compiled = []
    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=True):  # the cache must not hand over graphs
        for model in (first, second):
            before = dynamo_counters["stats"]["unique_graphs"]
            hf_generate(model, ids, mask, True)
            compiled.append(dynamo_counters["stats"]["unique_graphs"] - before)
    assert compiled[1] >= 1  # the second model compiled its own graphs
    decode_steps = DECODE_STEPS - 1  # the first token comes from the prefill
    for model in (first, second):
        layers = macopt.stats(model)
        assert [s.decode_steps for s in layers] == [decode_steps] * len(layers)
        assert all(s.prefills == 1 for s in layers)
