"""Eager softmax attention, ``softmax(q @ k^T * scale + mask) @ v`` written out by hand
(``passes/eager_sites.py``): rewritten like an SDPA call where it provably computes the same
function, otherwise left untouched with a reason.

Hugging Face models here keep ``attn_implementation="eager"`` and run a greedy decode loop whose
compiled step (Inductor, ``fullgraph=True``, static cache) builds its own 4-D mask, so the mask
is ``where(keep, 0, min)`` inside the graph. Under ``generate()`` with a static cache,
transformers builds the float mask before the compiled step instead: it reaches the graph as an
input whose values the passes cannot prove 0/-inf, and those sites are found and left (the
family matrix's GPT-J entry).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from transformers import StaticCache

import macopt
from macopt.passes import scope
from macopt.passes._compat import inductor_config, run_and_get_code
from macopt.passes.report import SiteReport
from tests.model_zoo import ZOO
from tests.passes_harness import OP_CALL, prompts

STEPS, CACHE_LEN, BATCH = 6, 16, 3  # batch 3: rows 1 and 2 are left-padded
SDPA_FUSED = "_scaled_dot_product_flash_attention_for_cpu"  # Inductor fuses GPT-J's pattern
# Family -> the op found at its decode sites (two layers each, all rewritten).
HF_FAMILIES = {"llama": "eager_softmax", "qwen2": "eager_softmax", "phi3": "eager_softmax",
               "gptj": SDPA_FUSED}


@dataclass
class EagerRun:
    reports: list[SiteReport]
    tokens: torch.Tensor
    logits: torch.Tensor
    want_tokens: torch.Tensor
    want_logits: torch.Tensor
    op_calls: int


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
                    want_tokens, want_logits, sum(c.count(OP_CALL) for c in code))


@pytest.mark.parametrize("name", sorted(HF_FAMILIES))
def test_eager_hf_decode_sites_are_rewritten(name):
    entry, reports = ZOO[name], eager_run(name).reports
    assert [(r.op, r.decision) for r in reports] == [(HF_FAMILIES[name], "rewritten")] * 2
    assert {(r.rope_form, r.group) for r in reports} == {(entry.rope_form, entry.group)}
    assert eager_run(name).op_calls == 2


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
