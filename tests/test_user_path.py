"""The user's path after ``macopt.optimize``: many models in one process, models compiled
before optimize(), ``torch.compile(model)`` passed in, static caches under the routed prefill,
and what ``explain`` says when nothing went through the passes."""

from __future__ import annotations

import copy

import pytest
import torch
from model_zoo import ZOO
from transformers import StaticCache

import macopt
from macopt import _hf_compat

NEW_TOKENS = 4


def _ids(length: int = 12) -> torch.Tensor:
    return torch.randint(2, 256, (1, length), generator=torch.Generator().manual_seed(length))


@torch.no_grad()
def _generate(model: torch.nn.Module, **kwargs) -> torch.Tensor:
    return model.generate(_ids(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, **kwargs)


def _decode_steps(model: torch.nn.Module) -> list[int | None]:
    return [s.decode_steps for s in macopt.stats(model)]


def test_every_one_of_six_models_in_one_process_decodes_through_its_method():
    # Each model's routing wrapper adds dynamo cache entries (its site-id guard); sharing one
    # code object, the 5th model hit dynamo's recompile limit and ran unmodified, silently.
    base = ZOO["llama"].build()
    for _ in range(6):
        model = macopt.optimize(copy.deepcopy(base), macopt.MACConfig(tau=1.0, t_min=0))
        _generate(model)
        assert _decode_steps(model) == [NEW_TOKENS - 1] * 2


def test_a_model_compiled_and_run_before_optimize_is_rewritten_after_it():
    model = ZOO["llama"].build()
    model.forward = torch.compile(model.forward, backend="inductor")
    with torch.no_grad():
        model(_ids())  # compiled code without macopt sites now exists for this forward
    macopt.optimize(model, macopt.MACConfig(tau=1.0, t_min=0))
    _generate(model)
    assert _decode_steps(model) == [NEW_TOKENS - 1] * 2


def test_optimize_on_a_compiled_module_tags_the_model_inside_and_returns_the_compiled_one():
    model = ZOO["llama"].build()
    compiled = torch.compile(model, backend="inductor")
    with torch.no_grad():
        want = model.generate(_ids(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False)
    assert macopt.optimize(compiled, macopt.ExactConfig()) is compiled
    with torch.no_grad():
        compiled(_ids(9))  # a prefill and ...
        out = compiled(_ids(9)[:, -1:], past_key_values=None)  # ... a one-token forward
    assert out.logits.shape[1] == 1
    assert [r.decision for r in macopt.explain(compiled) if r.phase == "decode"] == [
        "rewritten"] * 2
    with torch.no_grad():
        assert torch.equal(_generate(model), want)


def test_the_routed_prefill_leaves_generates_static_cache_allocated_and_marked_static():
    # Allocated lazily inside the traced macopt_eager prefill, transformers skips the marks,
    # and CUDA graphs then skip generate()'s compiled decode step ("mutated inputs").
    model = macopt.optimize(ZOO["llama"].build(), macopt.MACConfig(tau=1.0, t_min=0))
    cache = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        model(_ids(), past_key_values=cache, use_cache=True)
    tensors = _hf_compat.static_cache_tensors(cache)
    assert len(tensors) == 3 * model.config.num_hidden_layers
    assert all(hasattr(t, "_dynamo_static_input_type") for t in tensors)


def test_explain_after_eager_runs_of_a_stateless_method_says_why_nothing_was_rewritten():
    model = macopt.optimize(ZOO["llama"].build(), macopt.ExactConfig())
    _generate(model)
    with pytest.raises(ValueError, match="ran eagerly.*cache_implementation='static'"):
        macopt.explain(model)


def test_explain_of_a_model_never_optimized_says_so():
    with pytest.raises(ValueError, match="not optimized"):
        macopt.explain(ZOO["llama"].build())


def test_macopt_passes_the_cache_by_the_keyword_the_installed_transformers_takes():
    """transformers 5.25 renamed a forward's ``past_key_values`` to ``cache`` (the old name
    warns and goes in 5.40); macopt's own forward calls use whichever the model's forward
    takes, and read the returned cache under either name."""
    import inspect
    from types import SimpleNamespace

    from macopt._hf_compat import cache_kwargs, returned_cache

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None):
            return input_ids

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None):
            return input_ids

    assert cache_kwargs(Old(), 7) == {"past_key_values": 7}
    assert cache_kwargs(New().forward, 7) == {"cache": 7}
    llama = ZOO["llama"].build()
    takes = "cache" if "cache" in inspect.signature(type(llama).forward).parameters else (
        "past_key_values")
    assert cache_kwargs(llama, 7) == cache_kwargs(torch.compile(llama), 7) == {takes: 7}
    assert returned_cache(SimpleNamespace(cache=3)) == 3
    assert returned_cache(SimpleNamespace(past_key_values=4)) == 4
