"""Reasons that must not mislead (issue 17, B7): MLA (DeepSeek-V3, MiniCPM3), Gemma2 and MPT,
each a tiny random-weight model from its transformers config (nothing downloads).

MLA's q/k head dim is ``qk_nope_head_dim + qk_rope_head_dim`` (64 here, supported) while v's
is ``v_head_dim`` (32): the refusal and the site reason must say exactly that. Gemma2 has no
SDPA path in transformers; its eager attention stays and every site reports its softcap. MPT
adds an ALiBi bias to the scores: its decode rows say so.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from passes_harness import _fresh_compiles
from transformers import DynamicCache

import macopt
from macopt.passes import scope

IDS = dict(vocab_size=256, bos_token_id=1, eos_token_id=None, pad_token_id=0)
_MLA = dict(IDS, num_hidden_layers=2, hidden_size=128, intermediate_size=256,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32,
            qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32)
MLA_HEAD_DIMS = "q/k head dim 64 is supported, but the v head dim 32 differs from it"


def _build(config_cls: str, model_cls: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()


def deepseek_v3():
    return _build("DeepseekV3Config", "DeepseekV3ForCausalLM", **_MLA, moe_intermediate_size=64,
                  n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                  first_k_dense_replace=1)


def minicpm3():
    return _build("MiniCPM3Config", "MiniCPM3ForCausalLM", **_MLA)


def gemma2():
    return _build("Gemma2Config", "Gemma2ForCausalLM", **IDS, num_hidden_layers=2,
                  hidden_size=128, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64)


def mpt():
    return _build("MptConfig", "MptForCausalLM", **IDS, n_layers=2, d_model=256, n_heads=4,
                  max_seq_len=256)


@torch.no_grad()
def prefill_and_decode(forward, model, steps: int = 2) -> torch.Tensor:
    """Logits of a prompt of 6 and ``steps`` decode steps through ``forward``."""
    ids = torch.randint(2, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    mpt_cache = isinstance(model, transformers.MptForCausalLM)  # MPT: its own tuple cache
    cache = None if mpt_cache else DynamicCache(config=model.config)
    logits = []
    for step in range(steps + 1):
        out = forward(ids if step == 0 else ids[:, -1:], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def reports(model) -> list:
    return [r for m in model.modules() for r in scope.reports_of(m)]


@pytest.mark.parametrize("build", [deepseek_v3, minicpm3])
@pytest.mark.parametrize("config", [macopt.ExactConfig(), macopt.MACConfig()], ids=["exact", "mac"])
def test_mla_models_are_refused_with_their_qk_and_v_head_dims(build, config):
    with pytest.raises(ValueError, match=MLA_HEAD_DIMS):
        macopt.optimize(build(), config)


def test_mla_sites_compiled_with_the_backend_say_the_v_head_dim_differs():
    model = minicpm3()
    forward = torch.compile(model.forward, backend=macopt.backend(macopt.ExactConfig(),
                                                                  inductor=False))
    with _fresh_compiles():
        prefill_and_decode(forward, model)
    # Untagged modules: the backend's sites are known by graph only, the reason from its shapes.
    decode = [r for r in reports(model) if r.phase == "decode"]
    assert len(decode) == 2
    for report in decode:
        assert report.decision == "skipped" and report.head_dim == 64
        assert report.reason.startswith("v head dim 32 differs from the q/k head dim 64")


def test_gemma2_keeps_its_eager_attention_and_every_site_says_softcap():
    reference = gemma2()
    model = macopt.optimize(gemma2(), macopt.MACConfig(tau=1.0, t_min=0, ring_size=16, offset=4))
    got = prefill_and_decode(model, model)  # the eager route: the rewritten graph, no Inductor
    found = reports(model)
    assert {r.phase for r in found} == {"prefill", "decode"}
    assert all(r.decision == "skipped" and r.reason.startswith("softcap:") for r in found)
    torch.testing.assert_close(got, prefill_and_decode(reference, reference), atol=1e-5,
                               rtol=1e-5)


def test_mpt_decode_rows_say_alibi():
    model = macopt.optimize(mpt(), macopt.ExactConfig())
    forward = torch.compile(model.forward, backend=macopt.backend(inductor=False))
    with _fresh_compiles():
        prefill_and_decode(forward, model)
    decode = [r for r in macopt.explain(model) if r.phase == "decode"]
    assert len(decode) == 2
    assert all(r.decision == "skipped" and "ALiBi" in r.reason for r in decode)


class LatentAttention(torch.nn.Module):
    """MLA's SDPA call: q/k of head dim 64, v of head dim 32."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class Wrapper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = LatentAttention()

    def forward(self, *args):
        return self.attn(*args)


def test_an_sdpa_site_with_a_smaller_v_head_dim_says_so():
    model = Wrapper()
    q, k = torch.randn(1, 4, 1, 64), torch.randn(1, 4, 8, 64)
    v = torch.randn(1, 4, 8, 32)
    compiled = torch.compile(model, fullgraph=True,
                             backend=macopt.backend(macopt.ExactConfig(), inductor=False))
    with _fresh_compiles():
        torch.testing.assert_close(compiled(q, k, v), model(q, k, v))
    (report,) = scope.reports_of(model.attn)
    assert report.decision == "skipped"
    assert report.reason.startswith("v head dim 32 differs from the q/k head dim 64")


def test_inspect_shows_mpts_decode_sites_with_the_alibi_reason(monkeypatch, capsys):
    # MPT keeps its own cache: generate() compiles no decode step, so inspect compiles its
    # forward itself (before: no row, and an explain message about static caches).
    from macopt import cli

    monkeypatch.setenv("COLUMNS", "400")  # one table row per line
    assert cli.main(["inspect", "mpt"]) == 0
    decode = [line for line in capsys.readouterr().out.splitlines() if "decode (q=1)" in line]
    assert len(decode) == 2
    assert all("skipped" in line and "ALiBi" in line for line in decode), decode
