"""Which modules the passes may touch, with which config, and what they found there.

``macopt.optimize`` tags attention modules here; the passes find a site's module through
dynamo's ``nn_module_stack`` (keyed by module id) and record one report per site.

Methods with per-site state (MAC rings, Top-K+phi summaries) key it by a small integer *site
id*, one per attention module, baked into the rewritten graph as a constant: the same id in the
prefill and the decode graphs of a module, never a per-token value. A module gets its site id
when it is tagged, or when a backend pass first meets it untagged, and keeps it while it lives;
ids come from one counter and are never handed out twice, so a new module never inherits a dead
one's state, even where Python reuses the dead module's ``id()``. When a module is garbage
collected its site id is retired and its state released (:func:`macopt.state.release`). While
any module
is tagged, no graph is served from Inductor's FX graph cache (:func:`any_tag`; two models of one
class trace to the same graph, so no key could say whose site ids it holds), and
``macopt.optimize`` adds a guard on each stateful module's site id so that dynamo compiles a
model's own graph instead of replaying another model's.
"""

from __future__ import annotations

import functools
import gc
import itertools
import weakref
from dataclasses import dataclass

import torch
from torch.fx import Node

from macopt import state
from macopt.config import MethodConfig
from macopt.passes._compat import module_ids_in_stack
from macopt.passes.report import SiteReport


@dataclass(frozen=True)
class Scope:
    """A tagged module: its qualified name in the model and its method config."""

    qualname: str
    config: MethodConfig


@dataclass
class _Known:
    """A live module the passes know: its site id, and its scope while it is tagged."""

    ref: weakref.ref
    site_id: int
    scope: Scope | None = None


_KNOWN: dict[int, _Known] = {}  # by id(module), only while the module lives
_REPORTS: dict[int, dict[tuple[str, str, str], SiteReport]] = {}
_NEXT_SITE_ID = itertools.count()
# Every live module at the last scan of the heap, by id (entries vanish as modules die).
_LIVE_MODULES: weakref.WeakValueDictionary[int, torch.nn.Module] = weakref.WeakValueDictionary()


def tag(module: torch.nn.Module, qualname: str, config: MethodConfig) -> None:
    """Put ``module`` in scope of the passes with ``config``."""
    known = _known(module)
    known.scope = Scope(qualname, config)
    state.label(known.site_id, qualname)
    _REPORTS.pop(id(module), None)


def untag(module: torch.nn.Module) -> None:
    """Take ``module`` out of scope (it keeps its site id)."""
    known = _KNOWN.get(id(module))
    if known is not None and known.ref() is module:
        known.scope = None


def site_id_for(module_id: int) -> int | None:
    """The site id of the live module with ``id(module) == module_id``, assigned on first
    sight; None when no live module has that id.

    Only a live object has a given id, and the passes run while the graph's modules are being
    compiled (alive), so the id names the module the graph came from.
    """
    known = _KNOWN.get(module_id)
    if known is not None and known.ref() is not None:
        return known.site_id
    module = _LIVE_MODULES.get(module_id)
    if module is None:
        # First sight of this id: find its module among the live objects (type() only, so no
        # object's own code runs).
        _LIVE_MODULES.update((id(o), o) for o in gc.get_objects()
                             if issubclass(type(o), torch.nn.Module))
        module = _LIVE_MODULES.get(module_id)
    return _known(module).site_id if module is not None else None


def site_id_of(module: torch.nn.Module) -> int | None:
    """The site id of a tagged module, or None."""
    known = _KNOWN.get(id(module))
    tagged = known is not None and known.scope is not None and known.ref() is module
    return known.site_id if tagged else None


def _known(module: torch.nn.Module) -> _Known:
    """What scope knows about ``module``; a module met for the first time gets a fresh site id."""
    key = id(module)
    known = _KNOWN.get(key)
    if known is None or known.ref() is not module:
        known = _KNOWN[key] = _Known(weakref.ref(module, functools.partial(_forget, key)),
                                     next(_NEXT_SITE_ID))
    return known


def _forget(key: int, ref: weakref.ref) -> None:
    known = _KNOWN.get(key)
    if known is None or known.ref is not ref:
        return
    del _KNOWN[key]
    _REPORTS.pop(key, None)
    state.release(known.site_id)  # a garbage-collected module frees its site's state


def scope_of(node: Node) -> tuple[torch.nn.Module, Scope] | None:
    """The innermost tagged module around ``node`` and its scope, or None."""
    for module_id, _, _ in reversed(module_ids_in_stack(node)):
        known = _KNOWN.get(module_id) if module_id is not None else None
        module = known.ref() if known is not None and known.scope is not None else None
        if module is not None:
            return module, known.scope
    return None


def scope_of_module(module: torch.nn.Module) -> Scope | None:
    known = _KNOWN.get(id(module))
    return known.scope if known is not None and known.ref() is module else None


def any_tag() -> bool:
    """Whether any live module is tagged."""
    # Collect first: a model the program dropped keeps its tags until the garbage collector
    # runs, and whether a graph may be cached must not depend on GC timing.
    gc.collect()
    return any(known.ref() is not None and known.scope is not None
               for known in list(_KNOWN.values()))


def record(module_id: int, report: SiteReport) -> None:
    """Keep the latest report per (layer, phase, query length) of a module (by id), for as
    long as that module lives: a dead module's id may be reused by any new object, which must
    not inherit its reports (an untagged module's are otherwise never dropped)."""
    if site_id_for(module_id) is None:  # no live module has this id: nothing to report on
        return
    _REPORTS.setdefault(module_id, {})[(report.layer, report.phase, report.query_len)] = report


def forget_reports(module_id: int) -> None:
    """Drop the reports kept for a module id."""
    _REPORTS.pop(module_id, None)


def reports_of(module: torch.nn.Module) -> list[SiteReport]:
    return list(_REPORTS.get(id(module), {}).values())
