"""Which modules the passes may touch, with which config, and what they found there.

``macopt.optimize`` tags attention modules here; the passes find a site's module through
dynamo's ``nn_module_stack`` (keyed by module id) and record one report per site.

Methods with per-site state (MAC rings, Top-K+phi summaries) key it by a small integer *site
id*, one per attention module, assigned when the module is tagged (or first seen by a backend
pass) and baked into the rewritten graph as a constant: the same id in the prefill and the
decode graphs of a module, never a per-token value. Ids are assigned in tagging order, so a
graph from Inductor's FX graph cache (keyed on the ids too) points at the same modules.
"""

from __future__ import annotations

import gc
import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.fx import Node

from macopt.passes._compat import module_ids_in_stack
from macopt.passes.report import SiteReport


@dataclass(frozen=True)
class Scope:
    """A tagged module: its qualified name in the model and its method config."""

    qualname: str
    config: object


_TAGGED: dict[int, tuple[weakref.ref, Scope]] = {}
_REPORTS: dict[int, dict[tuple[str, str, str], SiteReport]] = {}
_SITE_IDS: dict[int, int] = {}  # module id -> site id
_NEXT_SITE_ID = itertools.count()
_FORGET_HOOKS: list[Callable[[int], None]] = []  # called with a dead module's site id


def tag(module: torch.nn.Module, qualname: str, config: object) -> None:
    """Put ``module`` in scope of the passes with ``config``."""
    key = id(module)
    _TAGGED[key] = (weakref.ref(module, lambda _: _forget(key)), Scope(qualname, config))
    _REPORTS.pop(key, None)
    site_id_for(key)


def site_id_for(module_id: int) -> int:
    """The site id of the module with ``id(module) == module_id`` (assigned on first call)."""
    if module_id not in _SITE_IDS:
        _SITE_IDS[module_id] = next(_NEXT_SITE_ID)
    return _SITE_IDS[module_id]


def site_id_of(module: torch.nn.Module) -> int | None:
    """The site id of a tagged module, or None."""
    return _SITE_IDS.get(id(module)) if scope_of_module(module) is not None else None


def on_forget(hook: Callable[[int], None]) -> None:
    """Call ``hook(site_id)`` when a tagged module is garbage collected (frees its state)."""
    _FORGET_HOOKS.append(hook)


def untag(module: torch.nn.Module) -> None:
    _TAGGED.pop(id(module), None)


def _forget(key: int) -> None:
    _TAGGED.pop(key, None)
    _REPORTS.pop(key, None)
    site_id = _SITE_IDS.pop(key, None)
    if site_id is not None:
        for hook in _FORGET_HOOKS:
            hook(site_id)


def scope_of(node: Node) -> tuple[torch.nn.Module, Scope] | None:
    """The innermost tagged module around ``node`` and its scope, or None."""
    for module_id, _, _ in reversed(module_ids_in_stack(node)):
        entry = _TAGGED.get(module_id) if module_id is not None else None
        module = entry[0]() if entry else None
        if module is not None:
            return module, entry[1]
    return None


def scope_of_module(module: torch.nn.Module) -> Scope | None:
    entry = _TAGGED.get(id(module))
    return entry[1] if entry and entry[0]() is module else None


def cache_description() -> str:
    """Every live tag, sorted (what a compiled graph's rewrite depends on besides the graph)."""
    # Collect first: an optimized model the program dropped keeps its tags until the garbage
    # collector runs, so without this the key (and FX-graph-cache hits) would depend on GC
    # timing, e.g. a dropped model collected between two compiles of the same graph.
    gc.collect()
    rows = []
    for ref, scope in _TAGGED.values():
        module = ref()
        if module is not None:
            config = scope.config
            key = config.cache_key() if hasattr(config, "cache_key") else repr(config)
            if getattr(config, "keeps_state", False):  # the graph bakes the site id in
                key += f"|site {_SITE_IDS.get(id(module))}"
            rows.append(f"{type(module).__qualname__}|{scope.qualname}|{key}")
    return "\n".join(sorted(rows))


def record(module_id: int, report: SiteReport) -> None:
    """Keep the latest report per (layer, phase, query length) of a module (by id)."""
    _REPORTS.setdefault(module_id, {})[(report.layer, report.phase, report.query_len)] = report


def forget_reports(module_id: int) -> None:
    """Drop the reports kept for a module id."""
    _REPORTS.pop(module_id, None)


def reports_of(module: torch.nn.Module) -> list[SiteReport]:
    return list(_REPORTS.get(id(module), {}).values())
