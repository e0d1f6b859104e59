"""Issue 17, B5: the bundled tiny model decodes with a cache, and a compiled (fullgraph)
forward of a MAC-optimized model survives generate() both with and without a cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import macopt

TINY_LM = Path(__file__).resolve().parents[1] / "examples" / "tiny-lm"


def test_tiny_lm_generation_config_decodes_with_a_cache():
    config = json.loads((TINY_LM / "generation_config.json").read_text())
    assert config.get("use_cache", True) is True
    loaded = transformers.GenerationConfig.from_pretrained(TINY_LM)
    assert loaded.use_cache is True


def _one_layer_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=None, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


# MAC at tau 1.0 is exact; Top-K + phi is exact without a cache (every forward a prefill).
@pytest.mark.parametrize("config, use_cache", [
    (macopt.MACConfig(tau=1.0, t_min=0), False),
    (macopt.MACConfig(tau=1.0, t_min=0), True),
    (macopt.TopKPhiConfig(), False),
], ids=["mac-no-cache", "mac-cache", "topk_phi-no-cache"])
def test_compiled_generate_with_and_without_cache(config, use_cache):
    # Without a cache every step is a prefill of a growing (symbolic) length: the key-range
    # nodes once handed Inductor a where() whose scalar was that symbol (LoweringException).
    model = _one_layer_llama()
    eager = model.generate(torch.arange(2, 22)[None], max_new_tokens=3, do_sample=False,
                           use_cache=use_cache)
    macopt.optimize(model, config)
    model.forward = torch.compile(model.forward, fullgraph=True)
    out = model.generate(torch.arange(2, 22)[None], max_new_tokens=3, do_sample=False,
                         use_cache=use_cache)
    assert torch.equal(out, eager)


def test_macopt_generate_decodes_with_a_cache_whatever_the_generation_config(tmp_path,
                                                                              monkeypatch):
    model = _one_layer_llama()
    model.generation_config.use_cache = False
    model.save_pretrained(tmp_path)
    seen = []
    original = transformers.LlamaForCausalLM.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("use_cache", self.generation_config.use_cache))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.LlamaForCausalLM, "generate", spy)
    from macopt.cli import main

    assert main(["generate", str(tmp_path), "--prompt-ids", "5,6,7", "--max-new-tokens",
                 "2"]) == 0
    assert seen == [True]
