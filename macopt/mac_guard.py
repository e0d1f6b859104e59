"""A warning a user sees when a MAC site hits far more often than a safe setting does.

A safe ``tau`` lets a site reuse attention on a minority of its first decode steps (on SmolLM2
at the default, 1-37% of a prompt's queries per layer would match; docs/SAFE_DEFAULTS.md). A site
hitting on nearly every query right after the prompt reuses one recent query's attention for
all of them, which is how MAC drops a needle that full attention retrieves. So, once per
sequence, after :data:`GUARD_STEPS` decode steps, each site's hit rate since its prefill is
read back (one small host sync per site and sequence) and a rate above :data:`HIT_LIMIT` warns
once per site, naming it and the remedy. The check runs in the ops' Python bodies: under a
replayed CUDA graph it runs on the steps that are not replays.
"""

from __future__ import annotations

import warnings

import torch

from macopt import state
from macopt.kernels.mac_counters import COUNTERS

GUARD_STEPS = 16
HIT_LIMIT = 0.9
_ROWS = [COUNTERS.index("hits"), COUNTERS.index("queries")]


class MACHitRateWarning(UserWarning):
    """A MAC site hits on nearly every decode query: its setting is far from a safe one."""


# site id -> [decode steps since its prefill, (hits, queries) at the prefill on the device]
_WATCH: dict[int, list] = {}
_WARNED: set[int] = set()


def on_prefill(site_id: int, counters: torch.Tensor) -> None:
    """A new sequence starts at ``site_id``: remember its counters (no host sync)."""
    if site_id not in _WARNED:
        _WATCH[site_id] = [0, counters[_ROWS].sum(dim=1).clone()]


def on_decode(site_id: int, counters: torch.Tensor, config_hint: str = "") -> None:
    """One decode step at ``site_id``; at the :data:`GUARD_STEPS`-th, check the hit rate."""
    watch = _WATCH.get(site_id)
    if watch is None or state.capturing():
        return
    watch[0] += 1
    if watch[0] != GUARD_STEPS:
        return
    hits, queries = (counters[_ROWS].sum(dim=1) - watch[1]).tolist()
    del _WATCH[site_id]
    rate = hits / max(queries, 1)
    if rate > HIT_LIMIT:
        _WARNED.add(site_id)
        warnings.warn(
            f"macopt MAC: {site_name(site_id)} reused a recent query's attention on {rate:.0%} "
            f"of its queries in the first {GUARD_STEPS} decode steps (a safe setting: well "
            f"under {HIT_LIMIT:.0%}); it may lose what full attention retrieves. Remedy: a "
            f"stricter tau (closer to 1.0; tau=1.0 is exact), radius='relative' if the config "
            f"uses 'absolute', or `macopt calibrate --method mac`.{config_hint}",
            MACHitRateWarning, stacklevel=2)


def site_name(site_id: int) -> str:
    """The attention module of ``site_id`` (its qualified name while it is optimized)."""
    name = state.label_of(site_id)
    return f"attention site {site_id}" if name is None else (
        f"attention site {name!r} (site {site_id})")


def reset() -> None:
    """Forget every watch and warning (tests; a re-optimized model warns again)."""
    _WATCH.clear()
    _WARNED.clear()
