"""optimize / explain / backends: scoping, errors, composition with other passes, and the
passes' decisions on cases the family matrix does not reach. Cheap: no Inductor codegen."""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from model_zoo import ZOO
from transformers import CompileConfig

import macopt
from macopt.passes import scope
from macopt.passes._compat import CustomGraphPass, inductor_config
from macopt.passes.manager import MacoptPasses


@dataclass(frozen=True)
class PreRopeExact(macopt.ExactConfig):
    """Test-only: exact, but demanding the pre-RoPE query like MAC will."""

    needs_pre_rope_query: ClassVar[bool] = True


def _tagged(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if scope.scope_of_module(m) is not None]


@torch.no_grad()
def _eager_backend_decode(model: torch.nn.Module, config=None) -> None:
    """Trace one decode step through the passes without Inductor (the macopt_eager path)."""
    compile_config = CompileConfig(fullgraph=True, mode="default",
                                   backend=macopt.backend(config, inductor=False))
    compile_config._compile_all_devices = True
    ids = torch.randint(2, 256, (1, 4))
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                   cache_implementation="static", compile_config=compile_config)


def test_optimize_tags_every_attention_module_and_returns_the_model():
    model = ZOO["llama"].build()
    assert macopt.optimize(model, macopt.ExactConfig()) is model
    assert _tagged(model) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert model.config._attn_implementation == "sdpa"


def test_override_none_and_filter_leave_modules_alone():
    model = ZOO["llama"].build()
    macopt.optimize(model, macopt.ExactConfig(), overrides={"model.layers.0.self_attn": None})
    assert _tagged(model) == ["model.layers.1.self_attn"]
    macopt.optimize(model, macopt.ExactConfig(), filter_fn=lambda m, name: "0" in name)
    assert _tagged(model) == ["model.layers.0.self_attn"]


def test_unknown_override_name_is_an_error_and_tags_nothing():
    model = ZOO["llama"].build()
    with pytest.raises(ValueError, match="no attention module named"):
        macopt.optimize(model, macopt.ExactConfig(), overrides={"model.layers.9.attn": None})
    assert _tagged(model) == []


def test_model_without_attention_is_a_clear_error():
    with pytest.raises(ValueError, match="no attention module found in Sequential"):
        macopt.optimize(torch.nn.Sequential(torch.nn.Linear(4, 4)), macopt.ExactConfig())


class _EagerOnlyAttention(torch.nn.Linear):
    pass


class _EagerOnlyModel(torch.nn.Module):
    """Stands for a Hugging Face model whose attention cannot switch to SDPA: transformers logs
    a warning and keeps 'eager' (GPT-J up to transformers 5.23 behaves so)."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(_attn_implementation="eager")
        self.attn = _EagerOnlyAttention(4, 4)

    def set_attn_implementation(self, name):
        pass


def test_model_without_sdpa_support_keeps_its_eager_attention_and_is_tagged():
    model = macopt.optimize(_EagerOnlyModel(), macopt.ExactConfig())
    assert model.config._attn_implementation == "eager"
    assert _tagged(model) == ["attn"]


def test_method_needing_rope_on_a_model_without_rope_is_refused():
    model = ZOO["gpt2"].build()
    with pytest.raises(ValueError, match="has no RoPE.*use macopt.ExactConfig"):
        macopt.optimize(model, PreRopeExact())
    assert _tagged(model) == []


def test_config_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match="MethodConfig"):
        macopt.optimize(ZOO["llama"].build(), {"method": "exact"})


def test_explain_before_any_run_says_what_to_do():
    model = macopt.optimize(ZOO["llama"].build(), macopt.ExactConfig())
    with pytest.raises(ValueError, match=r"has not run since macopt.optimize\(\)"):
        macopt.explain(model)


def test_site_without_rope_is_reported_not_rewritten_for_a_pre_rope_method():
    model = ZOO["gpt2"].build()  # not optimized: the backend's config covers its sites
    _eager_backend_decode(model, PreRopeExact())
    decode = [r for r in macopt.explain(model) if r.phase == "decode"]
    assert [r.decision for r in decode] == ["skipped", "skipped"]
    assert all("no RoPE found" in r.reason and not r.pre_rope_lifted for r in decode)


def test_eager_backend_rewrites_and_matches_unmodified_tokens():
    reference = ZOO["qwen3"].build()
    model = macopt.optimize(ZOO["qwen3"].build(), macopt.ExactConfig())
    _eager_backend_decode(model)
    assert [r.decision for r in macopt.explain(model)] == ["rewritten", "rewritten"]
    ids = torch.randint(2, 256, (1, 6))
    kwargs = dict(max_new_tokens=8, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        want = reference.generate(ids, disable_compile=True, **kwargs)
        # An optimized model run eagerly takes the unmodified path: same numbers.
        assert torch.equal(model.generate(ids, disable_compile=True, **kwargs), want)


class _CountingPass(CustomGraphPass):
    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return "counting-pass-v1"


def test_install_passes_wraps_a_pass_already_installed():
    user_pass = _CountingPass()
    # inductor's own patch(): pytest's monkeypatch would delattr on undo, which hides the entry
    with inductor_config.patch(post_grad_custom_post_pass=user_pass):
        manager = macopt.install_passes()
        assert inductor_config.post_grad_custom_post_pass is manager
        assert manager.previous is user_pass and macopt.install_passes() is manager
        manager(torch.fx.Graph())
        assert user_pass.calls == 1


def test_uuid_without_tags_is_stable_and_follows_a_wrapped_pass(isolated_scope):
    first, again = MacoptPasses().uuid(), MacoptPasses().uuid()
    assert first is not None and first == again
    assert MacoptPasses(previous=_CountingPass()).uuid() != first
