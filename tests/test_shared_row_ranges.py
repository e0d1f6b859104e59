"""A decode graph reads each row's key range from the model's one mask once, for every layer:
the reduction over the mask (first, last, holes) is shared by the sites, not repeated per layer
(one small kernel a step instead of one a layer)."""

import pytest
import torch
from model_zoo import ZOO
from passes_harness import _fresh_compiles, generate

import macopt
from macopt.passes import manager
from macopt.passes.graph_utils import INSERTED

aten = torch.ops.aten


@pytest.fixture
def rewritten_graphs(monkeypatch):
    """Every graph macopt's passes rewrote, after the rewrite."""
    seen = []
    run = manager.run_passes

    def spy(graph, *args, **kwargs):  # noqa: ANN001, ANN202
        reports = run(graph, *args, **kwargs)
        seen.append(graph)
        return reports

    monkeypatch.setattr(manager, "run_passes", spy)
    return seen


def _inserted(graph, target):
    return [n for n in graph.nodes if n.target is target and n.meta.get(INSERTED)]


@pytest.mark.parametrize("config,op_name,hole_checks", [
    (macopt.ExactConfig(), "decode_attention", 0),  # its op reads the mask itself
    # MAC: its op takes each row's holes flag (rows with holes: exact over the mask)
    (macopt.MACConfig(tau=1.0, t_min=0), "mac_decode_matched", 1),
    # Top-K + phi: the exact op its rows with holes take (mask_holes.py)
    (macopt.TopKPhiConfig(sinks=1, tail=2, budget=64, page_size=16), "decode_attention_or", 1),
], ids=["exact", "mac", "topk_phi"])
def test_the_mask_is_reduced_once_per_decode_graph(config, op_name, hole_checks,
                                                   rewritten_graphs):
    model = ZOO["llama"].build()
    layers = model.config.num_hidden_layers
    assert layers >= 2
    macopt.optimize(model, config)
    with _fresh_compiles():
        generate(model, 3, compiled=True)  # left-padded rows: a real mask
    op = getattr(torch.ops.macopt, op_name).default
    decode = [g for g in rewritten_graphs if _inserted(g, op)]
    assert decode, "no decode graph was rewritten"
    for graph in decode:
        assert len(_inserted(graph, op)) == layers
        assert len(_inserted(graph, aten.amax.default)) == 1
        counts = [n for n in _inserted(graph, aten.sum.dim_IntList)
                  if n.kwargs.get("dtype") == torch.int32]  # keys attended per row
        assert len(counts) == hole_checks
