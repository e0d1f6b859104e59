"""Shared harness for the pass tests: run a zoo model optimized and compiled, and unmodified.

One ``FamilyRun`` per family holds everything the tests assert on, computed once: greedy
tokens and logits (batch 1, and a left-padded batch of 3) of the optimized model with its
decode step compiled by Inductor (``fullgraph=True``), of the unmodified model run eagerly,
the compiled code, the per-site reports, graph breaks and graphs compiled.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import torch
from model_zoo import VOCAB, ZOO
from nanogpt import NanoGPT, greedy_generate

import macopt
from macopt import _hf_compat
from macopt.passes._compat import dynamo_counters, inductor_config, run_and_get_code
from macopt.passes.report import SiteReport

DECODE_STEPS = 33  # the first token comes from prefill; 32+ decode steps follow
PROMPT = 8
OP_CALL = "torch.ops.macopt.decode_attention.default("


@dataclass
class Generation:
    tokens: torch.Tensor
    logits: torch.Tensor
    code: list[str] = field(default_factory=list)
    graphs_compiled: int = 0


@dataclass
class FamilyRun:
    name: str
    reports: list[SiteReport]
    graph_breaks: int
    optimized: dict[int, Generation]  # by batch size
    reference: dict[int, Generation]


def prompts(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts; rows after the first are left-padded by 2 and 5 tokens."""
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(2, VOCAB, (batch, PROMPT), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in zip(range(1, batch), (2, 5), strict=False):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def generate(model: torch.nn.Module, batch: int, compiled: bool) -> Generation:
    ids, mask = prompts(batch)
    before = dynamo_counters["stats"]["unique_graphs"]
    if isinstance(model, NanoGPT):
        step = torch.compile(model, fullgraph=True) if compiled else model
        run = functools.partial(greedy_generate, model, step, ids, mask, DECODE_STEPS)
    else:
        run = functools.partial(hf_generate, model, ids, mask, compiled)
    if compiled:
        (tokens, logits), code = run_and_get_code(run)
    else:
        (tokens, logits), code = run(), []
    graphs = dynamo_counters["stats"]["unique_graphs"] - before
    return Generation(tokens, logits, code, graphs)


@torch.no_grad()
def hf_generate(model, ids, mask, compiled):
    # On every device (transformers only auto-compiles on GPUs); window lengths dynamic.
    compile_config = _hf_compat.compile_config(mode="default")
    out = model.generate(ids, attention_mask=mask, max_new_tokens=DECODE_STEPS,
                         min_new_tokens=DECODE_STEPS, do_sample=False,
                         cache_implementation="static", compile_config=compile_config,
                         disable_compile=not compiled, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


@functools.cache
def run_family(name: str) -> FamilyRun:
    """Optimize + compile + generate, and the eager unmodified reference (cached per family)."""
    reference = ZOO[name].build()
    if hasattr(reference, "set_attn_implementation"):
        reference.set_attn_implementation("sdpa")
    model = copy.deepcopy(reference)
    macopt.optimize(model, macopt.ExactConfig())
    breaks = sum(dynamo_counters["graph_break"].values())
    with _fresh_compiles():
        optimized = {b: generate(model, b, compiled=True) for b in (1, 3)}
    breaks = sum(dynamo_counters["graph_break"].values()) - breaks
    return FamilyRun(
        name=name,
        reports=list(macopt.explain(model)),
        graph_breaks=breaks,
        optimized=optimized,
        reference={b: generate(reference, b, compiled=False) for b in (1, 3)},
    )


class _fresh_compiles:
    """No FX-graph-cache hits (the passes must run to report), restored afterwards."""

    def __enter__(self):
        self._saved = inductor_config.fx_graph_cache
        inductor_config.fx_graph_cache = False

    def __exit__(self, *exc):
        inductor_config.fx_graph_cache = self._saved
