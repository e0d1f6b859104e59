"""The pass still applies when Inductor's FX graph cache is warm: compiling the same decode
step twice in fresh dynamo state hits the cache the second time, and both compiled graphs
call macopt's decode op (the manager's uuid keys the cache correctly). The key must not
depend on when the garbage collector frees a model that earlier code dropped."""

from __future__ import annotations

import torch
from model_zoo import ZOO
from passes_harness import OP_CALL, hf_generate

import macopt
from macopt.passes._compat import (
    dynamo,
    dynamo_counters,
    fresh_inductor_cache,
    inductor_config,
    run_and_get_code,
)
from macopt.passes.manager import MacoptPasses


def _compiled_decode_code(model: torch.nn.Module) -> list[str]:
    dynamo.reset()
    ids = torch.randint(2, 256, (1, 4))
    (_, _), code = run_and_get_code(hf_generate, model, ids, torch.ones_like(ids), True)
    return code


def test_a_tagged_graph_is_rewritten_at_every_compile_never_served_from_the_fx_cache(
        isolated_scope):
    model = macopt.optimize(ZOO["llama"].build(), macopt.ExactConfig())
    with inductor_config.patch(fx_graph_cache=True), fresh_inductor_cache():
        hits = dynamo_counters["inductor"]["fxgraph_cache_hit"]
        cold = _compiled_decode_code(model)
        warm = _compiled_decode_code(model)
        assert dynamo_counters["inductor"]["fxgraph_cache_hit"] - hits == 0
    assert sum(c.count(OP_CALL) for c in cold) == 2
    assert sum(c.count(OP_CALL) for c in warm) == 2


def test_uuid_ignores_a_dropped_model_awaiting_garbage_collection():
    before = MacoptPasses().uuid()
    dropped = macopt.optimize(ZOO["qwen3"].build(), macopt.ExactConfig())
    dropped._cycle = [dropped]  # only the garbage collector frees a model in a cycle
    del dropped
    assert MacoptPasses().uuid() == before
