"""Models ``optimize()`` cannot rewrite say so (issue 17, B3): Bloom (ALiBi) and a model whose
Linear layers ``torch.ao.quantization.quantize_dynamic`` replaced. Tiny random weights.

Bloom adds an ALiBi bias to its scores, which the kernels do not add: ``optimize`` warns, the
model generates its unmodified tokens with either cache, and ``explain`` names ALiBi instead of
advising the static cache the user already passed. Quantized modules break dynamo's graph at
every Linear (their packed weights cannot be traced): ``optimize`` refuses, tagging nothing.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from model_zoo import ZOO

import macopt

IDS = dict(vocab_size=256, bos_token_id=1, eos_token_id=None, pad_token_id=0)
NEW_TOKENS = 3
STATELESS_AND_STATEFUL = [macopt.ExactConfig(), macopt.TopKPhiConfig(budget=32, page_size=16)]


def bloom() -> torch.nn.Module:
    torch.manual_seed(0)  # head dim 64: the kernels' head dims are not what rules it out
    config = transformers.BloomConfig(**IDS, n_layer=2, hidden_size=256, n_head=4)
    return transformers.BloomForCausalLM(config).eval()


def quantized_llama() -> torch.nn.Module:
    return torch.ao.quantization.quantize_dynamic(ZOO["llama"].build(), {torch.nn.Linear},
                                                  dtype=torch.qint8)


@torch.no_grad()
def generate(model: torch.nn.Module, **cache) -> torch.Tensor:
    ids = torch.randint(2, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, **cache)


@pytest.mark.parametrize("config", STATELESS_AND_STATEFUL, ids=lambda c: c.method)
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_bloom_warns_alibi_generates_unmodified_and_explain_names_alibi(config, cache):
    reference = bloom()
    with pytest.warns(UserWarning, match="BloomForCausalLM is out of scope.*ALiBi"):
        model = macopt.optimize(copy.deepcopy(reference), config)
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    assert torch.equal(generate(model, **kwargs), generate(reference, **kwargs))
    with pytest.raises(ValueError, match="ALiBi") as raised:
        macopt.explain(model)
    assert "cache_implementation" not in str(raised.value)  # advice already followed


def test_bloom_is_refused_for_mac_for_want_of_rope():
    with pytest.raises(ValueError, match="has no RoPE.*needs the pre-RoPE query"):
        macopt.optimize(bloom(), macopt.MACConfig())


@pytest.mark.parametrize("config", [macopt.ExactConfig(), macopt.MACConfig(tau=1.0, t_min=0)],
                         ids=lambda c: c.method)
def test_a_dynamically_quantized_model_is_refused_and_left_untagged(config):
    model = quantized_llama()
    with pytest.raises(ValueError, match=r"15 quantized modules \(e\.g\. 'model\.layers\.0\."
                                         r"self_attn\.q_proj'.*cannot trace their packed"):
        macopt.optimize(model, config)
    with pytest.raises(ValueError, match="not optimized"):
        macopt.explain(model)
    generate(model, cache_implementation="static")  # still the user's model, unmodified
