"""Tiny random-weight models, one per family the passes must handle (nothing downloads).

Each ``ZooEntry`` says what the passes must find in its decode graph: how many sites get
rewritten for ``exact`` (and for each method whose count differs) and the RoPE form at them.
A torch or transformers upgrade that changes the graphs must fail these counts loudly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers
from nanogpt import NanoGPT, NanoGPTConfig

VOCAB = 256
_COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=256)
_LLAMA_LIKE = dict(_COMMON, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64)


@dataclass(frozen=True)
class ZooEntry:
    """A model family: how to build it and what the decode graph must contain."""

    name: str
    build: Callable[[], torch.nn.Module]
    rewritten: int  # decode sites rewritten for ExactConfig
    skipped: int  # decode sites left untouched (with a reason)
    rope_form: str | None  # RoPE form at every decode site
    group: int  # GQA group at every decode site
    decode_graphs: int = 1  # decode graphs compiled per generate() call
    # Method name -> (rewritten, skipped) decode sites, where they differ from ExactConfig's.
    by_method: dict[str, tuple[int, int]] = field(default_factory=dict)

    def decode_sites(self, method: str) -> tuple[int, int]:
        """``(rewritten, skipped)`` decode sites for ``method`` (a ``MethodConfig.method``)."""
        return self.by_method.get(method, (self.rewritten, self.skipped))


def _hf(config_cls: str, model_cls: str, **kwargs) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        # Token ids inside the tiny vocabulary; no EOS so every run decodes the same length.
        ids = dict(bos_token_id=1, eos_token_id=None, pad_token_id=0)
        config = getattr(transformers, config_cls)(**{**ids, **kwargs})
        return getattr(transformers, model_cls)(config).eval()

    return build


def _nanogpt() -> torch.nn.Module:
    torch.manual_seed(0)
    return NanoGPT(NanoGPTConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=256)).eval()


ZOO = {
    e.name: e
    for e in (
        ZooEntry("llama", _hf("LlamaConfig", "LlamaForCausalLM", **_LLAMA_LIKE), 2, 0, "half", 2),
        ZooEntry("mistral", _hf("MistralConfig", "MistralForCausalLM", **_LLAMA_LIKE,
                                sliding_window=None), 2, 0, "half", 2),
        ZooEntry("qwen2", _hf("Qwen2Config", "Qwen2ForCausalLM", **_LLAMA_LIKE), 2, 0, "half", 2),
        ZooEntry("qwen3", _hf("Qwen3Config", "Qwen3ForCausalLM",
                              **dict(_LLAMA_LIKE, num_key_value_heads=1)), 2, 0, "half", 4),
        ZooEntry("gemma3", _hf("Gemma3TextConfig", "Gemma3ForCausalLM", **_LLAMA_LIKE,
                               query_pre_attn_scalar=64, sliding_window=16,
                               layer_types=["sliding_attention", "full_attention"]),
                 # transformers' sliding-window cache layer branches in Python on whether its
                 # window is full: one decode graph while the 8-token prompt's window fills, one
                 # once full (the unmodified model's too; tests/test_sliding_window_recompiles).
                 1, 1, "half", 2, decode_graphs=2),
        ZooEntry("phi3", _hf("Phi3Config", "Phi3ForCausalLM", **_COMMON, hidden_size=256,
                             intermediate_size=256, num_attention_heads=4,
                             num_key_value_heads=2),
                 2, 0, "half", 2),
        ZooEntry("gpt_neox", _hf("GPTNeoXConfig", "GPTNeoXForCausalLM",
                                 **dict(_COMMON, hidden_size=256, intermediate_size=256,
                                        num_attention_heads=4)), 2, 0, "partial-half", 1),
        ZooEntry("olmo2", _hf("Olmo2Config", "Olmo2ForCausalLM", **_LLAMA_LIKE), 2, 0, "half", 2),
        ZooEntry("cohere", _hf("CohereConfig", "CohereForCausalLM", **_LLAMA_LIKE),
                 2, 0, "interleaved", 2),
        ZooEntry("glm", _hf("GlmConfig", "GlmForCausalLM", **_LLAMA_LIKE),
                 2, 0, "partial-interleaved", 2),
        # GPT-J (interleaved partial RoPE) has no SDPA path in transformers 5.x: it keeps its
        # eager attention, which Inductor fuses into SDPA. generate() with a static cache builds
        # the float masks of the prefill and of each step before the model: graph inputs,
        # checked at run time (passes/masks.py).
        ZooEntry("gptj", _hf("GPTJConfig", "GPTJForCausalLM", vocab_size=VOCAB, n_layer=2,
                             n_embd=256, n_head=4, rotary_dim=32, n_positions=256),
                 2, 0, "partial-interleaved", 1),
        ZooEntry("gpt2", _hf("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_layer=2,
                             n_embd=128, n_head=2, n_positions=256), 2, 0, None, 1),
        ZooEntry("nanogpt", _nanogpt, 2, 0, "complex", 2),
    )
}
