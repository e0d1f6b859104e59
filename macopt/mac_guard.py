"""A warning a user sees when a MAC site hits far more often than a safe setting does and its
reused attention is far from exact.

A site hitting on nearly every query right after the prompt reuses one recent query's
attention for all of them, which is how MAC drops a needle that full attention retrieves. So,
once per sequence, after :data:`GUARD_STEPS` decode steps, each site's hit rate since its
prefill is read back (one small host sync per site and sequence). A rate above
:data:`HIT_LIMIT` alone is not enough: on SmolLM2 the defaults' first layers hit on 93-99% of
their first decode steps (GPU, bf16) with every answer kept, their attention being nearly the
same from one step to the next. Such a site's output at that step is measured against exact
attention over the same keys (one exact decode, MAC's op only); above :data:`ERROR_LIMIT`
(relative L1) it warns once per site, naming it, the error and the remedy. The limit comes
from SmolLM2 on a 4K passkey prompt (examples/safe_defaults/guard_errors.py,
docs/SAFE_DEFAULTS.md 11): the defaults' sites measured at most 0.030 and kept the answer;
forced hits measured 0.057-0.50 (median ~0.2) and lost it. A MAC + Top-K + phi site is
measured against the same step with every head missing (Top-K + phi over the prefix, the
exact tail): what reuse adds to Top-K + phi's own error, which is approximate by design. The
check runs in the ops' Python bodies: under a replayed CUDA graph it runs on the steps that
are not replays.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from macopt import state
from macopt.kernels.mac_counters import COUNTERS

GUARD_STEPS = 16
HIT_LIMIT = 0.9
ERROR_LIMIT = 0.05  # between SmolLM2's defaults (<= 0.030) and forced hits (>= 0.057)
_ROWS = [COUNTERS.index("hits"), COUNTERS.index("queries")]


class MACHitRateWarning(UserWarning):
    """A MAC site hits on nearly every decode query: its setting is far from a safe one."""


# site id -> [decode steps since its prefill, (hits, queries) at the prefill on the device]
_WATCH: dict[int, list] = {}
# site id -> the device buffer those (hits, queries) are copied into: allocated once, outside
# any CUDA-graph pool (a copy made in a graph tree's warm-up would stay alive in its pool)
_BASELINES: dict[int, torch.Tensor] = {}
_WARNED: set[int] = set()
# site id -> (hit rate, measured output error or None) of each site checked over the hit limit
CHECKS: dict[int, tuple[float, float | None]] = {}


def on_prefill(site_id: int, counters: torch.Tensor) -> None:
    """A new sequence starts at ``site_id``: remember its counters (no host sync)."""
    if site_id in _WARNED:
        return
    baseline = _BASELINES.get(site_id)
    if baseline is None or baseline.device != counters.device:
        baseline = state.outside_graph_pools(lambda: counters.new_zeros(len(_ROWS)))
        _BASELINES[site_id] = baseline
    for i, row in enumerate(_ROWS):  # int indices: a list index copies from the host (no capture)
        baseline[i].copy_(counters[row].sum())
    _WATCH[site_id] = [0, baseline]


def on_decode(site_id: int, counters: torch.Tensor, config_hint: str = "",
              measure: Callable[[], float] | None = None,
              against: str = "exact attention") -> None:
    """One decode step at ``site_id``; at the :data:`GUARD_STEPS`-th, check the hit rate.
    ``measure()``: this step's output error against ``against`` (what the step computes with
    no reuse), asked only of a site over the hit limit; an error within :data:`ERROR_LIMIT`
    keeps it quiet."""
    watch = _WATCH.get(site_id)
    if watch is None or state.capturing():
        return
    watch[0] += 1
    if watch[0] != GUARD_STEPS:
        return
    hits, queries = (counters[_ROWS].sum(dim=1) - watch[1]).tolist()
    del _WATCH[site_id]
    rate = hits / max(queries, 1)
    if rate <= HIT_LIMIT:
        return
    error = None if measure is None else measure()
    CHECKS[site_id] = (rate, error)
    if error is not None and error <= ERROR_LIMIT:
        return
    _WARNED.add(site_id)
    measured = "" if error is None else (
        f" and its output was {error:.0%} away from {against} (relative L1) at step "
        f"{GUARD_STEPS}")
    warnings.warn(
        f"macopt MAC: {site_name(site_id)} reused a recent query's attention on {rate:.0%} "
        f"of its queries in the first {GUARD_STEPS} decode steps{measured}; it may lose what "
        f"full attention retrieves. Remedy: a stricter tau (closer to 1.0; tau=1.0 is exact), "
        f"radius='relative' if the config uses 'absolute', or `macopt calibrate --method "
        f"mac`.{config_hint}",
        MACHitRateWarning, stacklevel=2)


def measures_next(site_id: int) -> bool:
    """Whether the next :func:`on_decode` of ``site_id`` is its guard step, where a site over
    the hit limit is measured (an op that needs a copy of its state for the measurement takes
    it only then). A host-side count: no sync."""
    watch = _WATCH.get(site_id)
    return watch is not None and watch[0] + 1 == GUARD_STEPS and not state.capturing()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``sum |got - want| / sum |want|`` in fp32 (a host sync): what a measurement returns."""
    want = want.float()
    return ((got.float() - want).abs().sum() / want.abs().sum().clamp(min=1e-30)).item()


def site_name(site_id: int) -> str:
    """The attention module of ``site_id`` (its qualified name while it is optimized)."""
    name = state.label_of(site_id)
    return f"attention site {site_id}" if name is None else (
        f"attention site {name!r} (site {site_id})")


def forget(site_id: int) -> None:
    """Drop ``site_id``'s watch, baseline buffer and check (its module was released)."""
    _WATCH.pop(site_id, None)
    _BASELINES.pop(site_id, None)
    _WARNED.discard(site_id)
    CHECKS.pop(site_id, None)


state.on_release(forget)


def reset() -> None:
    """Forget every watch, check and warning (tests; a re-optimized model warns again)."""
    _WATCH.clear()
    _WARNED.clear()
    CHECKS.clear()
