"""Site ids key the per-site state of stateful methods: one per live module, never reused.

Python reuses the ``id()`` of a dead object, and the passes know a module only by the id in
dynamo's ``nn_module_stack``. A module that gets a dead module's id must still get a fresh
site id, so it never starts from the dead module's MAC ring or Top-K+phi summaries; the dead
module's state is released. The tests force the id reuse: ``_PaddedAttention`` instances have
a size no other object has, so CPython hands a freed one's memory (its id) to the next.
"""

from __future__ import annotations

import gc

import pytest
import torch
from nanogpt import CausalSelfAttention, NanoGPT, NanoGPTConfig, greedy_generate

import macopt
from macopt import state
from macopt.passes import scope
from macopt.passes.manager import MacoptPasses

CFG = NanoGPTConfig(n_layer=1)
MAC = macopt.MACConfig(ring_size=16, offset=4, batch_capacity=1)


class _PaddedAttention(CausalSelfAttention):
    """nanoGPT's attention in objects of a size few others have (unused slots; 512 bytes, the
    largest block CPython's small-object allocator hands out)."""

    __slots__ = tuple(f"_pad{i}" for i in range(57))


# Objects allocated beside each new module and kept alive: CPython hands a freed block back
# only while its pool still holds a live block; a pool left empty can go to another size of
# object, and the dead module's id was then never reused (seen once in a full suite run).
_POOL_NEIGHBOURS: list[_PaddedAttention] = []


def _attention(dead_id: int | None = None) -> _PaddedAttention:
    """A new attention module; with ``dead_id``, one that reuses that dead module's id."""
    if dead_id is None:
        _POOL_NEIGHBOURS.extend(_PaddedAttention.__new__(_PaddedAttention) for _ in range(2))
        module = _PaddedAttention(CFG)
        _POOL_NEIGHBOURS.extend(_PaddedAttention.__new__(_PaddedAttention) for _ in range(2))
        return module
    tried = []
    for _ in range(10_000):
        module = _PaddedAttention.__new__(_PaddedAttention)  # the object's memory only
        if id(module) == dead_id:
            module.__init__(CFG)
            return module
        tried.append(module)  # kept alive, so the next try gets other memory
    pytest.fail("CPython did not reuse the dead module's id")


def _model(attention: _PaddedAttention | None = None) -> NanoGPT:
    torch.manual_seed(0)
    model = NanoGPT(CFG).eval()
    model.blocks[0].attn = attention or _attention()
    return model


def _decode_through_backend(model: NanoGPT, config: macopt.MethodConfig = MAC) -> None:
    """A few decode steps compiled with macopt's backend: the module is not tagged, so the
    backend's config covers it (a stateful one gives it its site id)."""
    step = torch.compile(model, backend=macopt.backend(config, inductor=False), fullgraph=True)
    ids = torch.randint(2, CFG.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    greedy_generate(model, step, ids, torch.ones_like(ids), 3)


def test_a_module_with_a_dead_modules_id_gets_a_fresh_site_and_fresh_state():
    first = _model()
    _decode_through_backend(first)
    dead_id = id(first.blocks[0].attn)
    dead_site = scope.site_id_for(dead_id)
    assert dead_site is not None and state.get(dead_site) is not None
    del first
    gc.collect()
    assert state.get(dead_site) is None  # released with its module

    second = _model(_attention(dead_id))  # before anything else takes the memory
    _decode_through_backend(second)
    site = scope.site_id_for(dead_id)
    assert site is not None and site != dead_site
    assert state.get(site) is not None


def test_site_ids_are_never_handed_out_twice():
    first = _attention()
    dead_id, dead_site = id(first), scope.site_id_for(id(first))
    del first
    second = _attention(dead_id)
    assert scope.site_id_for(id(second)) not in (None, dead_site)
    assert scope.site_id_for(id(second)) == scope.site_id_for(dead_id)  # stable while alive


def test_an_id_of_no_live_module_has_no_site_id():
    not_a_module = object()
    assert scope.site_id_for(id(not_a_module)) is None


def test_a_tagged_modules_state_is_released_when_it_dies():
    module = _attention()
    scope.tag(module, "attn", MAC)
    site = scope.site_id_of(module)
    state.site_state(site, "demo", (), lambda: (torch.zeros(1), torch.zeros(1)))
    del module
    gc.collect()
    assert state.get(site) is None


def test_graphs_that_may_hold_macopt_sites_are_never_served_from_the_fx_graph_cache(
        isolated_scope):
    # A cached graph reruns no pass: its sites would have no report, and a stateful graph's
    # baked-in site ids could be another model's (tests/test_two_models_state.py).
    assert MacoptPasses().uuid() is not None  # nothing tagged: nothing to rewrite
    stateless = macopt.optimize(_model(), macopt.ExactConfig())
    assert MacoptPasses().uuid() is None
    stateful = macopt.optimize(_model(), MAC)
    assert MacoptPasses().uuid() is None
    del stateful, stateless
    gc.collect()
    assert MacoptPasses().uuid() is not None
    # The macopt backend rewrites untagged sites with its own config.
    assert MacoptPasses(default_config=macopt.ExactConfig()).uuid() is None


def test_a_new_module_with_a_dead_modules_id_inherits_none_of_its_reports():
    # Reports are kept by module id; an untagged module's (the backend path) used to outlive
    # it, so any new object given its id listed them in macopt.explain (seen in CI: a plain
    # module's "attn" report inside a GPT-J model).
    model = _model()
    _decode_through_backend(model, macopt.ExactConfig())  # stateless: no site id involved
    dead = model.blocks[0].attn
    dead_id = id(dead)
    assert scope.reports_of(dead), "the backend path recorded no report to test with"
    del model, dead
    gc.collect()
    newcomer = _attention(dead_id)
    assert id(newcomer) == dead_id
    assert scope.reports_of(newcomer) == []
