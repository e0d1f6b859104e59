"""Eager softmax attention, ``softmax(q @ k^T * scale + mask) @ v`` written out by hand
(``passes/eager_sites.py``): rewritten like an SDPA call where it provably computes the same
function, otherwise left untouched with a reason.

Hugging Face models here keep ``attn_implementation="eager"`` and run a greedy decode loop whose
compiled step (Inductor, ``fullgraph=True``, static cache) builds its own 4-D mask, so the mask
is ``where(keep, 0, min)`` inside the graph. Under ``generate()`` with a static cache,
transformers builds the float mask before the compiled step instead: it reaches the graph as an
input whose values no graph op proves 0/-inf, so the rewrite checks them at run time
(``passes/masks.py``), at decode sites and at the prefill sites where stateful methods build
their state: a value that is neither 0 nor a masking value fails loudly. Plain modules' float
mask inputs may be biases and stay skipped (``tests/test_passes_sites.py``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_zoo import ZOO
from passes_harness import DECODE_STEPS, OP_CALL, Generation, generate, prompts
from transformers import StaticCache

import macopt
from macopt.passes import scope
from macopt.passes._compat import (
    CustomGraphPass,
    compile_fx,
    dynamo,
    inductor_config,
    run_and_get_code,
)
from macopt.passes.manager import run_passes
from macopt.passes.masks import CHECK_MESSAGE
from macopt.passes.report import SiteReport
from macopt.stats import Stats

STEPS, CACHE_LEN, BATCH = 6, 16, 3  # batch 3: rows 1 and 2 are left-padded
SDPA_FUSED = "_scaled_dot_product_flash_attention_for_cpu"
# Family -> the ops its decode sites may be found as (two layers each, all rewritten). Whether
# Inductor fuses GPT-J's eager pattern into SDPA before macopt's pass depends on the torch /
# transformers release (fused with transformers 5.23, not with 5.25); either is rewritten.
GPTJ_OPS = {"eager_softmax", SDPA_FUSED}
HF_FAMILIES = {"llama": {"eager_softmax"}, "qwen2": {"eager_softmax"},
               "phi3": {"eager_softmax"}, "gptj": GPTJ_OPS}


@dataclass
class EagerRun:
    reports: list[SiteReport]
    tokens: torch.Tensor
    logits: torch.Tensor
    want_tokens: torch.Tensor
    want_logits: torch.Tensor
    op_calls: int
    mask_checks: int  # run-time mask checks in the compiled code


@torch.no_grad()
def greedy_decode(model, step, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill eagerly, then ``STEPS`` greedy steps through ``step``; the 2-D mask spans the
    whole static cache (one shape for every step), so the step builds the 4-D mask itself."""
    ids, mask = prompts(batch)
    cache = StaticCache(config=model.config, max_cache_len=CACHE_LEN)
    full_mask = torch.ones(batch, CACHE_LEN, dtype=torch.long)
    full_mask[:, :ids.shape[1]] = mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=full_mask, past_key_values=cache,
                position_ids=positions, cache_position=torch.arange(ids.shape[1]))
    tokens, logits = [out.logits[:, -1].argmax(-1, keepdim=True)], [out.logits[:, -1]]
    position = positions[:, -1:]
    for t in range(ids.shape[1], ids.shape[1] + STEPS):
        position = position + 1
        out = step(input_ids=tokens[-1], attention_mask=full_mask, past_key_values=cache,
                   position_ids=position, cache_position=torch.tensor([t]))
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        logits.append(out.logits[:, -1])
    return torch.cat(tokens, 1), torch.stack(logits, 1)


@contextlib.contextmanager
def no_fx_graph_cache():
    """No FX-graph-cache hits: the passes must run to report."""
    saved, inductor_config.fx_graph_cache = inductor_config.fx_graph_cache, False
    try:
        yield
    finally:
        inductor_config.fx_graph_cache = saved


@functools.cache
def eager_run(name: str, backend: str = "inductor") -> EagerRun:
    reference = ZOO[name].build()
    reference.set_attn_implementation("eager")
    model = copy.deepcopy(reference)
    macopt.optimize(model, macopt.ExactConfig())  # selects SDPA where the model has it ...
    model.set_attn_implementation("eager")  # ... so go back: the eager pattern is under test
    compiler = "inductor" if backend == "inductor" else macopt.backend(inductor=False)
    step = torch.compile(model.forward, fullgraph=True, backend=compiler)
    with no_fx_graph_cache():
        (tokens, logits), code = run_and_get_code(greedy_decode, model, step, BATCH)
    want_tokens, want_logits = greedy_decode(reference, reference.forward, BATCH)
    return EagerRun([r for r in macopt.explain(model) if r.phase == "decode"], tokens, logits,
                    want_tokens, want_logits, sum(c.count(OP_CALL) for c in code),
                    sum(c.count(CHECK_MESSAGE) for c in code))


@pytest.mark.parametrize("name", sorted(HF_FAMILIES))
def test_eager_hf_decode_sites_are_rewritten(name):
    entry, reports = ZOO[name], eager_run(name).reports
    assert len(reports) == 2 and all(r.op in HF_FAMILIES[name] for r in reports)
    assert [r.decision for r in reports] == ["rewritten"] * 2
    assert {(r.rope_form, r.group) for r in reports} == {(entry.rope_form, entry.group)}
    assert eager_run(name).op_calls == 2


def test_masks_built_inside_the_graph_need_no_run_time_check():
    assert eager_run("llama").mask_checks == 0


@pytest.mark.parametrize("name", sorted(HF_FAMILIES))
def test_eager_hf_greedy_tokens_match_the_unmodified_model(name):
    run = eager_run(name)
    assert run.tokens.shape == (BATCH, STEPS + 1)
    assert torch.equal(run.tokens, run.want_tokens)
    torch.testing.assert_close(run.logits, run.want_logits, atol=2e-4, rtol=2e-4)


def test_gptj_eager_pattern_itself_is_rewritten_without_inductor_fusing_it():
    """Without Inductor nothing fuses GPT-J's softmax into SDPA: the eager matcher reads its
    fp32 upcasts, ``/ sqrt(d)`` scale and interleaved partial RoPE."""
    run = eager_run("gptj", backend="macopt_eager")
    assert [(r.op, r.decision, r.rope_form) for r in run.reports] == [
        ("eager_softmax", "rewritten", "partial-interleaved")] * 2
    assert torch.equal(run.tokens, run.want_tokens)
    torch.testing.assert_close(run.logits, run.want_logits, atol=2e-4, rtol=2e-4)


# Plain PyTorch modules writing attention by hand, compiled through the macopt backend.
B, HQ, N, D = 2, 4, 8, 64


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, group, n, d).reshape(b, h * group, n, d)


class HandWrittenAttention(torch.nn.Module):
    """``softmax(q @ k^T * scale + mask) @ v``; ``variant`` picks how it is written."""

    def __init__(self, variant: str, group: int = 1):
        super().__init__()
        self.variant, self.group = variant, group
        slopes = torch.tensor([2.0 ** -(i + 1) for i in range(HQ)])
        self.register_buffer("slopes", slopes[None, :, None, None])
        self.register_buffer("temperature", torch.tensor(0.125))

    def forward(self, q, k, v, keep):
        k, v = repeat_kv(k, self.group), repeat_kv(v, self.group)
        if self.variant == "scaled-query-masked-fill":
            scores = (q * D ** -0.5) @ k.transpose(-2, -1)
            scores = scores.masked_fill(~keep, float("-inf"))
        elif self.variant == "mask-then-scale":  # the scale would scale a finite fill too
            scores = (q @ k.transpose(-2, -1) + torch.where(keep, 0.0, -1e5)) * 0.125
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(D)
            scores = self._modify(scores) + torch.where(keep, 0.0, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        if self.variant == "dropout":
            probs = F.dropout(probs, p=0.5, training=True)
        return probs @ v

    def _modify(self, scores):
        if self.variant == "softcap":
            return 30.0 * torch.tanh(scores / 30.0)
        if self.variant == "alibi":  # a per-head linear bias on key distance, as ALiBi adds
            distance = torch.arange(N, dtype=scores.dtype) - (N - 1)
            return scores + self.slopes * distance
        if self.variant == "tensor-scale":
            return scores * self.temperature
        return scores


class Model(torch.nn.Module):
    """Dynamo records submodules (not the compiled root) in nn_module_stack."""

    def __init__(self, attention: torch.nn.Module):
        super().__init__()
        self.attn = attention

    def forward(self, *args):
        return self.attn(*args)


def _run_plain(variant: str, group: int = 1, inductor: bool = False):
    module = Model(HandWrittenAttention(variant, group))
    torch.manual_seed(0)
    q = torch.randn(B, HQ, 1, D)
    k, v = torch.randn(B, HQ // group, N, D), torch.randn(B, HQ // group, N, D)
    keep = torch.rand(B, 1, 1, N) > 0.3
    keep[..., -1] = True  # the decoded token's own key
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True,
                             backend=macopt.backend(macopt.ExactConfig(), inductor=inductor))
    with no_fx_graph_cache():
        got, want = compiled(q, k, v, keep), module(q, k, v, keep)
    (report,) = scope.reports_of(module.attn)
    return report, got, want


@pytest.mark.parametrize("group", [1, 2], ids=["mha", "gqa-repeat-kv"])
@pytest.mark.parametrize("variant", ["scaled-scores-additive-mask", "scaled-query-masked-fill"])
def test_hand_written_attention_is_rewritten_exactly(variant, group):
    report, got, want = _run_plain(variant, group)
    assert (report.op, report.decision) == ("eager_softmax", "rewritten")
    assert (report.gqa_form, report.group) == (("repeat_kv", 2) if group == 2 else ("none", 1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_hand_written_gqa_attention_is_rewritten_under_inductor():
    """Inductor fuses this pattern into SDPA before macopt's pass: the fused op is rewritten."""
    report, got, want = _run_plain("scaled-scores-additive-mask", group=2, inductor=True)
    assert (report.op, report.decision, report.group) == (SDPA_FUSED, "rewritten", 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("variant", "reason"), [
    ("softcap", "softcap (tanh on the scores)"),
    ("alibi", "more than one term added to the scores"),
    ("tensor-scale", "scaled by a tensor"),
    ("mask-then-scale", "scaled after the mask is applied"),
])
def test_patterns_not_provably_attention_are_left_with_their_reason(variant, reason):
    report, got, want = _run_plain(variant)
    assert (report.op, report.decision) == ("eager_softmax", "skipped")
    assert reason in report.reason
    torch.testing.assert_close(got, want)


def test_attention_dropout_in_training_is_left_with_its_reason():
    report, _, _ = _run_plain("dropout")
    assert report.decision == "skipped" and "attention dropout" in report.reason


# generate() with a static cache: transformers builds the float masks (prefill and decode)
# before the model, so they are graph inputs, checked at run time (passes/masks.py).
GENERATE_BATCHES = (1, 3)  # batch 3: rows 1 and 2 left-padded
# Family -> the op found at its decode sites: Inductor fuses GPT-J's pattern, not Llama's.
GENERATE_FAMILIES = {"gptj": GPTJ_OPS, "llama": {"eager_softmax"}}
# MAC with tau = 1.0: nothing matches, so each step attends its whole context (exact tokens),
# while the prefill still builds the ring from the checked mask.
GENERATE_CONFIGS = {
    "exact": macopt.ExactConfig(),
    "mac": macopt.MACConfig(ring_size=16, offset=4, tau=1.0, t_min=0, batch_capacity=3),
}
DECODE_OP_CALLS = {"exact": OP_CALL, "mac": "torch.ops.macopt.mac_decode_matched.default("}
CHECK_FAILED = re.escape(CHECK_MESSAGE[:60])


@dataclass
class GenerateRun:
    reports: list[SiteReport]
    stats: Stats
    optimized: dict[int, Generation]  # by batch size
    reference: dict[int, Generation]

    def phase(self, phase: str) -> list[SiteReport]:
        return [r for r in self.reports if r.phase == phase]


@functools.cache
def generate_run(name: str, method: str) -> GenerateRun:
    """Eager attention, ``generate()`` with a static cache and the decode step compiled by
    Inductor (``fullgraph=True``), against the unmodified model run eagerly."""
    dynamo.reset()  # Hugging Face's decorators share code objects across runs: fresh limits
    reference = ZOO[name].build()
    reference.set_attn_implementation("eager")
    model = copy.deepcopy(reference)
    macopt.optimize(model, GENERATE_CONFIGS[method])
    model.set_attn_implementation("eager")
    with no_fx_graph_cache():
        optimized = {b: generate(model, b, compiled=True) for b in GENERATE_BATCHES}
    return GenerateRun(list(macopt.explain(model)), macopt.stats(model), optimized,
                       {b: generate(reference, b, compiled=False) for b in GENERATE_BATCHES})


@pytest.mark.parametrize("method", sorted(GENERATE_CONFIGS))
@pytest.mark.parametrize("name", sorted(GENERATE_FAMILIES))
def test_generate_float_mask_sites_are_rewritten(name, method):
    reports = generate_run(name, method).phase("decode")
    found = [(r.layer, r.op, r.decision, r.reason) for r in reports]
    assert len(reports) == 2 and all(r.op in GENERATE_FAMILIES[name] for r in reports), found
    assert [r.decision for r in reports] == ["rewritten"] * 2, found


@pytest.mark.parametrize("name", sorted(GENERATE_FAMILIES))
def test_generate_float_mask_prefill_sites_build_the_stateful_methods_state(name):
    run = generate_run(name, "mac")
    assert [r.decision for r in run.phase("prefill")] == ["rewritten"] * 2
    assert len(run.stats) == 2
    for layer in run.stats:  # one prefill per generate() call, then its decode steps
        assert layer.prefills == len(GENERATE_BATCHES)
        assert layer.decode_steps == (DECODE_STEPS - 1) * len(GENERATE_BATCHES)


@pytest.mark.parametrize("method", sorted(GENERATE_CONFIGS))
@pytest.mark.parametrize("name", sorted(GENERATE_FAMILIES))
@pytest.mark.parametrize("batch", GENERATE_BATCHES)
def test_generate_compiled_code_checks_the_mask_once_for_all_sites(name, method, batch):
    """Inductor keeps the check (a C++ throw on CPU, ``tl.device_assert`` in Triton); both
    sites read one mask, so they share one check."""
    code = generate_run(name, method).optimized[batch].code
    assert sum(c.count(DECODE_OP_CALLS[method]) for c in code) == 2
    assert sum(c.count(CHECK_MESSAGE) for c in code) == 1


@pytest.mark.parametrize("method", sorted(GENERATE_CONFIGS))
@pytest.mark.parametrize("name", sorted(GENERATE_FAMILIES))
@pytest.mark.parametrize("batch", GENERATE_BATCHES)
def test_generate_float_mask_greedy_tokens_match_the_unmodified_model(name, method, batch):
    run = generate_run(name, method)
    got, want = run.optimized[batch], run.reference[batch]
    assert got.tokens.shape == (batch, DECODE_STEPS)
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logits, want.logits, atol=2e-4, rtol=2e-4)


# 4-D float masks fed to the compiled step, as generate() feeds them: one prefill, or one
# decode step after an eager prefill.
PROMPT_LEN = prompts(BATCH)[0].shape[1]
NOTHING_MATCHES = GENERATE_CONFIGS["mac"]


def float_key_mask() -> torch.Tensor:
    """``[BATCH,1,1,CACHE_LEN]``: 0 where a row attends (its prompt tokens and the decoded
    one), transformers' fill ``finfo.min`` elsewhere, and ``-inf`` on row 2's padding."""
    _, prompt_mask = prompts(BATCH)
    keep = torch.zeros(BATCH, 1, 1, CACHE_LEN, dtype=torch.bool)
    keep[:, 0, 0, :PROMPT_LEN] = prompt_mask.bool()
    keep[..., PROMPT_LEN] = True
    mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    mask[2, ..., :5] = float("-inf")
    return mask


def float_prompt_mask() -> torch.Tensor:
    """``[BATCH,1,PROMPT_LEN,CACHE_LEN]``, as transformers builds it: query i attends the
    row's prompt keys up to i (0), ``finfo.min`` elsewhere, so the pad queries of the
    left-padded rows mask every key."""
    _, prompt_mask = prompts(BATCH)
    prompt_keys = torch.zeros(BATCH, CACHE_LEN, dtype=torch.bool)
    prompt_keys[:, :PROMPT_LEN] = prompt_mask.bool()
    causal = torch.ones(PROMPT_LEN, CACHE_LEN, dtype=torch.bool).tril()
    keep = causal & prompt_keys[:, None, None, :]
    return torch.where(keep, 0.0, torch.finfo(torch.float32).min)


@torch.no_grad()
def prefill_logits(model, step, mask: torch.Tensor) -> torch.Tensor:
    """The prompt through ``step`` with the 4-D ``mask``, into a fresh static cache."""
    ids, prompt_mask = prompts(BATCH)
    cache = StaticCache(config=model.config, max_cache_len=CACHE_LEN)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    return step(input_ids=ids, attention_mask=mask, past_key_values=cache,
                position_ids=positions, cache_position=torch.arange(PROMPT_LEN)).logits


@torch.no_grad()
def decode_step_logits(model, step, mask: torch.Tensor) -> torch.Tensor:
    """Prefill eagerly into a static cache, then one step through ``step`` with ``mask``."""
    ids, prompt_mask = prompts(BATCH)
    cache = StaticCache(config=model.config, max_cache_len=CACHE_LEN)
    full_mask = torch.ones(BATCH, CACHE_LEN, dtype=torch.long)
    full_mask[:, :PROMPT_LEN] = prompt_mask
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=full_mask, past_key_values=cache,
                position_ids=positions, cache_position=torch.arange(PROMPT_LEN))
    out = step(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask,
               past_key_values=cache, position_ids=positions[:, -1:] + 1,
               cache_position=torch.tensor([PROMPT_LEN]))
    return out.logits[:, -1]


def eager_llama_pair(backend, config: object = GENERATE_CONFIGS["exact"]
                     ) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    """``(reference, optimized, compiled step of the optimized one)``, eager attention."""
    reference = ZOO["llama"].build()
    reference.set_attn_implementation("eager")
    model = copy.deepcopy(reference)
    macopt.optimize(model, config)
    model.set_attn_implementation("eager")
    torch._dynamo.reset()
    return reference, model, torch.compile(model.forward, fullgraph=True, backend=backend)


BAD_VALUES = {
    "alibi-like-bias": lambda mask: mask[2, ..., 6].fill_(-5.0),  # an attended key, shifted
    "whole-row-masked": lambda mask: mask[1].fill_(torch.finfo(torch.float32).min),
    "nan": lambda mask: mask[0, ..., 3].fill_(float("nan")),
}


@pytest.mark.parametrize("bad", sorted(BAD_VALUES))
def test_mask_values_that_are_not_0_or_masking_fail_loudly(bad):
    reference, model, step = eager_llama_pair(macopt.backend(inductor=False))
    mask = float_key_mask()
    with no_fx_graph_cache():
        got = decode_step_logits(model, step, mask)
    torch.testing.assert_close(got, decode_step_logits(reference, reference.forward, mask),
                               atol=1e-5, rtol=1e-5)  # 0, finfo.min and -inf: exact
    assert [r.decision for r in macopt.explain(model)] == ["rewritten"] * 2
    BAD_VALUES[bad](mask)
    with pytest.raises(RuntimeError, match=CHECK_FAILED):
        decode_step_logits(model, step, mask)


def bias_under_inductor() -> None:
    """A bias-carrying mask through the Inductor-compiled step: fails (run in a subprocess: a
    C++ throw that Inductor placed in a parallel region aborts the process)."""
    _, model, step = eager_llama_pair("inductor")
    mask = float_key_mask()
    decode_step_logits(model, step, mask)
    print("valid mask decoded", flush=True)
    BAD_VALUES["alibi-like-bias"](mask)
    decode_step_logits(model, step, mask)


def test_bias_fed_at_run_time_fails_loudly_under_inductor():
    script = "from test_passes_eager_sites import bias_under_inductor as f; f()"
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent,
                          capture_output=True, text=True, timeout=600)
    assert "valid mask decoded" in done.stdout, done.stderr[-2000:]
    assert done.returncode != 0 and re.search(CHECK_FAILED, done.stderr), done.stderr[-2000:]


BAD_PROMPT_VALUES = {
    "bias-at-an-earlier-query": lambda mask: mask[2, 0, 6, 6].fill_(-5.0),  # every query checked
    "last-query-masked": lambda mask: mask[1, 0, -1].fill_(torch.finfo(torch.float32).min),
}


@pytest.mark.parametrize("bad", sorted(BAD_PROMPT_VALUES))
def test_prefill_mask_values_that_are_not_0_or_masking_fail_loudly(bad):
    """A stateful method's prefill builds its state from the mask's key range: the check runs
    there too, on every query (pad queries may mask every key, a row's last query may not)."""
    reference, model, step = eager_llama_pair(macopt.backend(inductor=False), NOTHING_MATCHES)
    mask = float_prompt_mask()
    with no_fx_graph_cache():
        got = prefill_logits(model, step, mask)
    torch.testing.assert_close(got, prefill_logits(reference, reference.forward, mask),
                               atol=1e-5, rtol=1e-5)
    assert [(r.phase, r.decision) for r in macopt.explain(model)] == [("prefill", "rewritten")] * 2
    assert [layer.prefills for layer in macopt.stats(model)] == [1, 1]
    BAD_PROMPT_VALUES[bad](mask)
    with pytest.raises(RuntimeError, match=CHECK_FAILED):
        prefill_logits(model, step, mask)


class PassesWithoutAsserts(CustomGraphPass):
    """macopt's passes, then their run-time asserts erased, as Triton compiles them without
    debug (``assert_indirect_indexing=False``, ROCm)."""

    def __init__(self):
        self.erased = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        run_passes(graph)
        for node in graph.find_nodes(op="call_function",
                                     target=torch.ops.aten._assert_async.msg):
            graph.erase_node(node)
            self.erased += 1

    def uuid(self) -> None:
        return None


def without_asserts(config: object) -> tuple[torch.nn.Module, torch.nn.Module, object,
                                             PassesWithoutAsserts]:
    """:func:`eager_llama_pair` compiled by Inductor with the run-time asserts erased."""
    passes = PassesWithoutAsserts()
    backend = functools.partial(
        compile_fx, config_patches={"post_grad_custom_post_pass": passes})
    return (*eager_llama_pair(backend, config), passes)


def test_rows_failing_the_check_are_nan_where_asserts_are_compiled_out():
    reference, model, step, passes = without_asserts(GENERATE_CONFIGS["exact"])
    mask = float_key_mask()
    BAD_VALUES["alibi-like-bias"](mask)  # row 2
    got = decode_step_logits(model, step, mask)
    want = decode_step_logits(reference, reference.forward, mask)
    assert passes.erased == 1
    assert got[2].isnan().all()
    torch.testing.assert_close(got[:2], want[:2], atol=1e-5, rtol=1e-5)


def test_prefill_rows_failing_the_check_are_nan_where_asserts_are_compiled_out():
    reference, model, step, passes = without_asserts(NOTHING_MATCHES)
    mask = float_prompt_mask()
    BAD_PROMPT_VALUES["bias-at-an-earlier-query"](mask)  # row 2
    with no_fx_graph_cache():
        got = prefill_logits(model, step, mask)
    want = prefill_logits(reference, reference.forward, mask)
    assert passes.erased == 1
    assert got[2].isnan().all()
    torch.testing.assert_close(got[:2], want[:2], atol=1e-5, rtol=1e-5)


def test_stateful_methods_rewrite_float_mask_input_decode_sites():
    reference, model, step = eager_llama_pair(macopt.backend(inductor=False), NOTHING_MATCHES)
    mask = float_key_mask()
    with no_fx_graph_cache():
        got = decode_step_logits(model, step, mask)
    decode = [r for r in macopt.explain(model) if r.phase == "decode"]
    assert [(r.method, r.decision) for r in decode] == [("mac", "rewritten")] * 2
    torch.testing.assert_close(got, decode_step_logits(reference, reference.forward, mask),
                               atol=1e-5, rtol=1e-5)
