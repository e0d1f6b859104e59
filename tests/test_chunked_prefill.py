"""A prompt prefilled in chunks (transformers' ``prefill_chunk_size``) leaves every method's
state as a one-shot prefill does: the same logits at every generated token (CPU, fp32).

The chunks reach a rewritten site as prefills over a cache that already holds the earlier
chunks; Top-K + phi rebuilds its sketch / summary over the whole prompt at each. MAC's ring
takes the entries of the chunk's own positions and leaves the others empty
(:func:`macopt.mac_ops.mac_prefill`), so its state is the one-shot prefill's when the last chunk
covers the ring (here: 128 tokens, a 64-slot ring; at the default 512 slots, chunks of 512
tokens or more ending on the prompt's end), and otherwise misses until decoding refills it:
``macopt.stats`` counts such chunks and says so.
``macopt bench generate --prefill-chunk`` relies on this to fit 128K at batch 2 on 80 GB.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import macopt

PROMPT, CHUNK = 640, 128  # the last chunk is whole
MAC = macopt.MACConfig(tau=0.5, t_min=0, ring_size=64, offset=32)  # hits at any context


@pytest.fixture(scope="module")
def model_and_prompt():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024)
    ids = torch.randint(0, 128, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    return LlamaForCausalLM(config).eval(), ids


def _logits(model, ids, **kwargs) -> torch.Tensor:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                         do_sample=False, cache_implementation="static", output_logits=True,
                         return_dict_in_generate=True, **kwargs)
    return torch.stack(out.logits)


@pytest.mark.parametrize("config", [
    macopt.ExactConfig(),
    MAC,  # the ring's contents matter, and the last chunk covers the ring
    macopt.TopKPhiConfig(budget=0.05, budget_floor=0),  # 30 of 600 keys: the selection matters
], ids=["exact", "mac", "topk_phi"])
def test_a_chunked_prefill_gives_the_one_shot_prefills_logits(model_and_prompt, config):
    base, ids = model_and_prompt
    model = copy.deepcopy(base)
    macopt.optimize(model, config)
    one_shot = _logits(model, ids)
    chunked = _logits(model, ids, prefill_chunk_size=CHUNK)
    torch.testing.assert_close(chunked, one_shot, rtol=1e-4, atol=1e-4)
    unmodified = _logits(base, ids)
    if isinstance(config, macopt.ExactConfig):
        torch.testing.assert_close(one_shot, unmodified, rtol=1e-4, atol=1e-4)
    else:  # approximate by design, and here it did approximate: the check above has teeth
        assert (one_shot - unmodified).abs().max() > 1e-3
    if isinstance(config, macopt.MACConfig):
        stats = macopt.stats(model)
        assert any(s.hit_rate and s.hit_rate > 0 for s in stats)
        # chunks of at least the ring and a one-shot prefill lose nothing: no count, no note
        assert [s.short_continued_chunks for s in stats] == [0, 0]
        assert stats.notes == [] and "prefill chunk" not in str(stats)


@pytest.mark.parametrize("config", [
    MAC, macopt.MACTopKPhiConfig(MAC, macopt.TopKPhiConfig(budget=0.05, budget_floor=0)),
], ids=["mac", "mac_topk_phi"])
def test_a_last_chunk_shorter_than_the_ring_is_counted_and_noted(model_and_prompt, config):
    base, ids = model_and_prompt
    model = copy.deepcopy(base)
    macopt.optimize(model, config)
    _logits(model, ids, prefill_chunk_size=600)  # 600 tokens, then 40 < 64 continuing them
    stats = macopt.stats(model)
    assert [(s.prefills, s.short_continued_chunks) for s in stats] == [(2, 1), (2, 1)]
    text = " ".join(str(stats).split())
    assert "1 prefill chunk shorter than MAC's ring continued a sequence" in text, text
    assert "prefill_chunk_size >= MACConfig.ring_size" in text, text
