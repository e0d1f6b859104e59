"""MAC through the passes on every family of the passes matrix (tiny random models, CPU).

With tau = 1.0 nothing matches, so every MAC step attends the whole prefix and tail exactly:
``mac`` must decode the same greedy tokens as the unmodified model, batch 1 and a left-padded
batch of 3, over 32 decode steps, with matching enabled from the first step (t_min = 0) and a
ring (M = 16, S = 4) much shorter than the sequence, so the match path, the ring writes and
their wrap-around all run. Batch 3 decodes with its steps compiled by Inductor
(``fullgraph=True``); batch 1 runs eagerly, which for a stateful method means through the
rewritten graph without Inductor (``macopt_eager``); prefills always run eagerly.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from model_zoo import ZOO
from passes_harness import DECODE_STEPS, Generation, _fresh_compiles, generate

import macopt
from macopt.passes import scope
from macopt.passes._compat import dynamo
from macopt.passes.report import SiteReport
from macopt.stats import Stats

NOTHING_MATCHES = macopt.MACConfig(ring_size=16, offset=4, tau=1.0, t_min=0, batch_capacity=3)
FAMILIES = sorted(name for name in ZOO if name != "gpt2")
BATCHES = (1, 3)


@dataclass
class MACRun:
    reports: list[SiteReport]
    stats: Stats
    optimized: dict[int, Generation]
    reference: dict[int, Generation]


@functools.cache
def run_mac(name: str) -> MACRun:
    # The eager path compiles the model's forward, whose code object Hugging Face's decorators
    # share across families; dynamo's per-code-object recompile limit must not carry over.
    dynamo.reset()
    reference = ZOO[name].build()
    if hasattr(reference, "set_attn_implementation"):
        reference.set_attn_implementation("sdpa")
    model = macopt.optimize(copy.deepcopy(reference), NOTHING_MATCHES)
    with _fresh_compiles():
        optimized = {1: generate(model, 1, compiled=False), 3: generate(model, 3, compiled=True)}
    return MACRun(
        reports=list(macopt.explain(model)),
        stats=macopt.stats(model),
        optimized=optimized,
        reference={b: generate(reference, b, compiled=False) for b in BATCHES},
    )


def _reports(name: str, phase: str) -> list[SiteReport]:
    return [r for r in run_mac(name).reports if r.phase == phase]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("batch", BATCHES)
def test_nothing_matching_decodes_the_unmodified_models_tokens(name, batch):
    run = run_mac(name)
    got, want = run.optimized[batch], run.reference[batch]
    assert got.tokens.shape == (batch, DECODE_STEPS)
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logits, want.logits, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_decode_sites_are_rewritten_to_mac_as_for_exact(name):
    reports = _reports(name, "decode")
    assert (sum(r.rewritten for r in reports),
            sum(r.decision == "skipped" for r in reports)) == ZOO[name].decode_sites("mac")
    for report in reports:
        # Skipped: local (sliding-window) layers only
        assert report.reason.startswith("Approximate" if report.rewritten else "sliding-window")


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_sites_gain_the_ring_builder_and_keep_their_attention(name):
    rewritten, _ = ZOO[name].decode_sites("mac")
    reports = _reports(name, "prefill")
    assert sum(r.rewritten for r in reports) == rewritten
    assert all(r.reason.startswith("Exact") for r in reports if r.rewritten)


@pytest.mark.parametrize("name", FAMILIES)
def test_no_recompile_across_decode_steps(name):
    # Per batch size at most the prefill graph and the family's decode graph(s), each compiled
    # once for all 32 decode steps (a per-token int in the graph would recompile every step).
    for batch in BATCHES:
        assert 2 <= run_mac(name).optimized[batch].graphs_compiled <= ZOO[name].decode_graphs + 1


@pytest.mark.parametrize("name", FAMILIES)
def test_stats_report_every_rewritten_layer(name):
    stats, (rewritten, _) = run_mac(name).stats, ZOO[name].decode_sites("mac")
    # generate() decodes DECODE_STEPS - 1 times after the prefill; nanoGPT's greedy loop also
    # runs the step after the last token.
    steps = DECODE_STEPS if name == "nanogpt" else DECODE_STEPS - 1
    assert len(stats) == rewritten
    for layer in stats:
        assert layer.method == "mac" and layer.prefills == len(BATCHES)
        assert layer.decode_steps == steps * len(BATCHES)
        assert layer.hit_rate == 0.0 and layer.read_fraction == 1.0
        assert layer.nbytes > 0


def test_gpt2_has_no_rope_and_is_refused_for_mac():
    with pytest.raises(ValueError, match="has no RoPE, and method 'mac' needs the pre-RoPE"):
        macopt.optimize(ZOO["gpt2"].build(), macopt.MACConfig())


class RopeBeforeHeadTranspose(torch.nn.Module):
    """GPT-J's layout: half RoPE on the query as ``[B, S, H, D]``, then the head transpose."""

    def forward(self, q, cos, sin, k, v, keep):
        half = q.shape[-1] // 2
        q = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin
        return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=keep)


class Wrapper(torch.nn.Module):
    """Dynamo records submodules (not the compiled root) in nn_module_stack."""

    def __init__(self, attention: torch.nn.Module):
        super().__init__()
        self.attn = attention

    def forward(self, *args):
        return self.attn(*args)


def test_a_site_with_rope_before_the_head_transpose_compiles_with_inductor():
    # The pre-RoPE query [B,1,H,D] goes to the op as [B,H,D]: its head move must be an op that
    # Inductor lowers in a post-grad graph.
    batch, heads, n_keys, dim = 2, 4, 8, 64
    model = Wrapper(RopeBeforeHeadTranspose())
    gen = torch.Generator().manual_seed(0)
    angles = torch.rand(batch, 1, 1, dim, generator=gen)
    k, v = (torch.randn(batch, heads, n_keys, dim, generator=gen) for _ in range(2))
    keep = torch.ones(batch, 1, 1, n_keys, dtype=torch.bool)
    keep[1, ..., :3] = False  # left padding
    args = (torch.randn(batch, 1, heads, dim, generator=gen), angles.cos(), angles.sin(), k, v,
            keep)
    dynamo.reset()
    compiled = torch.compile(model, fullgraph=True,
                             backend=macopt.backend(NOTHING_MATCHES, inductor=True))
    with _fresh_compiles():
        got = compiled(*args)
    (report,) = scope.reports_of(model.attn)
    assert (report.decision, report.rope_form, report.method) == ("rewritten", "half", "mac")
    torch.testing.assert_close(got, model(*args), atol=1e-5, rtol=1e-5)
