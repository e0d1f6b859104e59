"""The family matrix: each zoo model, optimized with ExactConfig and compiled with Inductor
(``fullgraph=True``, static cache), rewrites exactly the expected decode sites and decodes
the same greedy tokens as the unmodified model, batch 1 and a left-padded batch of 3."""

from __future__ import annotations

import pytest
import torch
from model_zoo import ZOO
from passes_harness import DECODE_STEPS, OP_CALL, run_family

FAMILIES = sorted(ZOO)
BATCHES = (1, 3)


def _decode_reports(name: str):
    return [r for r in run_family(name).reports if r.phase == "decode"]


@pytest.mark.parametrize("name", FAMILIES)
def test_expected_decode_sites_are_rewritten(name):
    entry, reports = ZOO[name], _decode_reports(name)
    assert sum(r.rewritten for r in reports) == entry.rewritten
    assert sum(r.decision == "skipped" for r in reports) == entry.skipped


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("batch", BATCHES)
def test_compiled_code_calls_the_decode_op_once_per_rewritten_site(name, batch):
    code = run_family(name).optimized[batch].code
    entry = ZOO[name]
    assert sum(c.count(OP_CALL) for c in code) == entry.rewritten * entry.decode_graphs


@pytest.mark.parametrize("name", FAMILIES)
def test_rope_form_and_group_found_at_every_decode_site(name):
    entry = ZOO[name]
    assert {(r.rope_form, r.pre_rope_lifted, r.group) for r in _decode_reports(name)} == {
        (entry.rope_form, entry.rope_form is not None, entry.group)
    }


@pytest.mark.parametrize("name", FAMILIES)
def test_skipped_sites_say_why(name):
    for report in _decode_reports(name):
        if report.decision == "skipped":
            assert report.reason, report


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("batch", BATCHES)
def test_greedy_tokens_match_the_unmodified_model(name, batch):
    run = run_family(name)
    got, want = run.optimized[batch], run.reference[batch]
    assert got.tokens.shape == (batch, DECODE_STEPS)
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logits, want.logits, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_no_graph_break_and_no_recompile_across_decode_steps(name):
    run = run_family(name)
    assert run.graph_breaks == 0
    # One decode graph per batch size, reused for all 32 decode steps.
    graphs = ZOO[name].decode_graphs
    assert [run.optimized[b].graphs_compiled for b in BATCHES] == [graphs, graphs]
