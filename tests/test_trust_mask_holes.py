"""Masks with holes (issue 17, B1): a row whose 2D ``attention_mask`` masks keys between its
first and last attended key (right padding, or any hole) is not one key range, which is all
MAC, Top-K + phi and their composition take. Such rows must still get the model's answer.

A tiny random Llama generates greedily through the eager route (the rewritten graph without
Inductor) with a dynamic cache and with a static cache; one test compiles the decode step with
Inductor. With tau = 1.0 and a Top-K budget covering the context every method must give the
unmodified model's tokens and logits, for any mask. (Top-K + phi with a dynamic cache also
needed its decode sites to see through repeat_kv's full slice on a symbolic key length: its
summary is per KV head.)
"""

from __future__ import annotations

import copy
import functools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_zoo import VOCAB, ZOO
from passes_harness import _fresh_compiles

import macopt
from macopt import _hf_compat
from macopt.passes._compat import dynamo

BATCH, PROMPT, STEPS = 2, 8, 5
MAC = macopt.MACConfig(ring_size=16, offset=4, tau=1.0, t_min=0, batch_capacity=BATCH)
TOPK = macopt.TopKPhiConfig(sinks=1, tail=2, budget=64, page_size=16)  # 64 keys: the whole cache
CONFIGS = {"mac": MAC, "topk_phi": TOPK, "mac_topk_phi": macopt.MACTopKPhiConfig(MAC, TOPK)}
RIGHT_PADDED = [[1] * PROMPT, [1] * 5 + [0] * 3]  # row 1: 3 pad tokens after its prompt


@functools.cache
def reference() -> torch.nn.Module:
    model = ZOO["llama"].build()
    model.set_attn_implementation("sdpa")
    return model


@functools.cache
def optimized(method: str) -> torch.nn.Module:
    dynamo.reset()
    return macopt.optimize(copy.deepcopy(reference()), CONFIGS[method])


@torch.no_grad()
def generate(model, mask, cache=None, compiled=False):
    mask = torch.tensor(mask)
    ids = torch.randint(2, VOCAB, mask.shape, generator=torch.Generator().manual_seed(0))
    ids = ids.masked_fill(mask == 0, 0)
    compile_config = _hf_compat.compile_config(mode="default") if compiled else None
    out = model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, min_new_tokens=STEPS,
                         do_sample=False, output_logits=True, return_dict_in_generate=True,
                         cache_implementation=cache, disable_compile=not compiled,
                         compile_config=compile_config)
    return out.sequences[:, PROMPT:], torch.stack(out.logits, 1)


def assert_same_generation(got, want):
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=2e-4, rtol=2e-4)


# Each row attends at least one prompt key; anything else goes (holes, right/left padding).
masks = st.lists(st.lists(st.integers(0, 1), min_size=PROMPT, max_size=PROMPT).filter(any),
                 min_size=BATCH, max_size=BATCH)


RUNS = [("mac", None), ("mac", "static"), ("topk_phi", "static"), ("mac_topk_phi", "static")]


@settings(max_examples=6)
@given(mask=masks, run=st.sampled_from(RUNS))
def test_any_mask_gives_the_unmodified_models_generation(mask, run):
    method, cache = run
    want = generate(reference(), mask, cache=cache)
    assert_same_generation(generate(optimized(method), mask, cache=cache), want)


def test_right_padding_gives_the_unmodified_models_generation_every_method():
    for method, cache in RUNS:
        want = generate(reference(), RIGHT_PADDED, cache=cache)
        assert_same_generation(generate(optimized(method), RIGHT_PADDED, cache=cache), want)


def test_right_padding_compiled_by_inductor_gives_the_unmodified_models_generation():
    dynamo.reset()
    model = macopt.optimize(copy.deepcopy(reference()), MAC)
    with _fresh_compiles():
        got = generate(model, RIGHT_PADDED, cache="static", compiled=True)
    assert_same_generation(got, generate(reference(), RIGHT_PADDED, cache="static"))
    decode = [r for r in macopt.explain(model) if r.phase == "decode"]
    assert decode and all(r.rewritten and "holes" in r.reason for r in decode)


def test_rows_without_holes_keep_the_method_rows_with_holes_take_exact_attention():
    # With a permissive tau MAC hits and row 0 (left-padded: one key range) drifts from the
    # unmodified model; row 1 (right-padded: holes) must still match it exactly.
    dynamo.reset()
    hits = macopt.MACConfig(ring_size=16, offset=4, tau=-10.0, t_min=0, batch_capacity=BATCH)
    model = macopt.optimize(copy.deepcopy(reference()), hits)
    mask = [[0, 0] + [1] * (PROMPT - 2), RIGHT_PADDED[1]]
    got, want = generate(model, mask), generate(reference(), mask)
    assert (got[1][0] - want[1][0]).abs().max() > 1e-3
    torch.testing.assert_close(got[1][1], want[1][1], atol=2e-4, rtol=2e-4)
    stats = macopt.stats(model)
    assert all(layer.hit_rate > 0 for layer in stats)


def test_top_k_phi_with_a_dynamic_cache_finds_the_kv_heads_behind_repeat_kv():
    # With a symbolic key length repeat_kv keeps a full slice; the decode op must still get
    # the KV heads the prefill summarised (it failed on the summary's head count before).
    dynamo.reset()
    model = macopt.optimize(copy.deepcopy(reference()), TOPK)
    assert_same_generation(generate(model, RIGHT_PADDED), generate(reference(), RIGHT_PADDED))
    decode = [r for r in macopt.explain(model) if r.phase == "decode"]
    assert decode and all((r.gqa_form, r.group) == ("repeat_kv", 2) for r in decode)
