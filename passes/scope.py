"""Which modules the passes may touch, with which config, and what they found there.

``macopt.optimize`` tags attention modules here; the passes find a site's module through
dynamo's ``nn_module_stack`` (keyed by module id) and record one report per site.
"""

from __future__ import annotations

import weakref
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


def tag(module: torch.nn.Module, qualname: str, config: object) -> None:
    """Put ``module`` in scope of the passes with ``config``."""
    key = id(module)
    _TAGGED[key] = (weakref.ref(module, lambda _: _forget(key)), Scope(qualname, config))
    _REPORTS.pop(key, None)


def untag(module: torch.nn.Module) -> None:
    _TAGGED.pop(id(module), None)


def _forget(key: int) -> None:
    _TAGGED.pop(key, None)
    _REPORTS.pop(key, None)


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
    rows = []
    for ref, scope in _TAGGED.values():
        module = ref()
        if module is not None:
            config = scope.config
            key = config.cache_key() if hasattr(config, "cache_key") else repr(config)
            rows.append(f"{type(module).__qualname__}|{scope.qualname}|{key}")
    return "\n".join(sorted(rows))


def record(module_id: int, report: SiteReport) -> None:
    """Keep the latest report per (layer, phase, query length) of a module (by id)."""
    _REPORTS.setdefault(module_id, {})[(report.layer, report.phase, report.query_len)] = report


def reports_of(module: torch.nn.Module) -> list[SiteReport]:
    return list(_REPORTS.get(id(module), {}).values())
