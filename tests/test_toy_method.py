"""A fifth method plugs in with one file per layer (tests/toy_method/) and one registry line:
the passes find it by its config type, rewrite its decode sites to its op, and the op gets
the config's values as one typed object."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from model_zoo import ZOO
from toy_method import ops as toy_ops
from toy_method import rewrite as toy_rewrite
from toy_method.config import ToyConfig
from transformers import CompileConfig

import macopt
from macopt import config as config_module
from macopt.passes import methods


@pytest.fixture(autouse=True, scope="module")
def toy_registered():
    methods.register_method(ToyConfig, toy_rewrite.REWRITES)  # the one registry line
    yield
    del methods.METHODS[ToyConfig]
    config_module._CONFIG_CLASSES.pop(ToyConfig.method, None)  # other files see four methods


def _generate(model: torch.nn.Module, ids: torch.Tensor, compiled: bool) -> torch.Tensor:
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False,
                  cache_implementation="static")
    with torch.no_grad():
        if not compiled:
            return model.generate(ids, disable_compile=True, **kwargs)
        compile_config = CompileConfig(fullgraph=True, mode="default",
                                       backend=macopt.backend(inductor=False))
        compile_config._compile_all_devices = True
        return model.generate(ids, compile_config=compile_config, **kwargs)


def test_toy_method_rewrites_its_sites_and_its_op_gets_the_config_values():
    reference = ZOO["qwen3"].build()
    model = macopt.optimize(ZOO["qwen3"].build(), ToyConfig(window=0))
    ids = torch.randint(2, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    toy_ops.CALLS.clear()
    tokens = _generate(model, ids, compiled=True)
    decode = [r for r in macopt.explain(model) if r.phase == "decode"]
    assert [(r.method, r.decision) for r in decode] == [("toy", "rewritten")] * 2
    assert all(r.reason.startswith("Toy: exact attention") for r in decode)
    assert toy_ops.CALLS and set(toy_ops.CALLS) == {toy_ops.ToyParams(window=0)}
    # window 0 attends every key: the toy method is exact, so the tokens are the model's.
    assert torch.equal(tokens, _generate(reference, ids, compiled=False))


@dataclass(frozen=True)
class _WiderToy(ToyConfig):
    """A subclass changing only defaults keeps its base's method."""

    window: int = 4


@dataclass(frozen=True)
class _Unregistered(macopt.MethodConfig):
    pass


def test_the_registry_finds_a_method_by_config_type_or_its_nearest_base():
    assert methods.rewrites_for(ToyConfig()) is toy_rewrite.REWRITES
    assert methods.rewrites_for(_WiderToy()) is toy_rewrite.REWRITES
    assert methods.rewrites_for(macopt.MACConfig()) is methods.METHODS[macopt.MACConfig]
    assert methods.rewrites_for(_Unregistered()) is None


def test_registering_something_other_than_a_config_type_is_refused():
    with pytest.raises(TypeError, match="MethodConfig subclass"):
        methods.register_method("toy", toy_rewrite.REWRITES)
