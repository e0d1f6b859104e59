"""``macopt.stats(model)``: what the stateful methods did, per attention layer.

Counters live on the device and are updated by the ops without a host sync; reading them here
is the one sync, and it happens only when asked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from rich import box
from rich.table import Table

from macopt import state
from macopt.config import MethodConfig
from macopt.kernels.mac_counters import COUNTERS
from macopt.passes import scope
from macopt.report import render
from macopt.topk_phi_site import STEP_COUNTERS


@dataclass(frozen=True)
class LayerStats:
    """One attention site since its state was allocated.

    ``hit_rate``: share of (row, query head) decode steps that reused a ring entry;
    ``head_hit_rates``: the same per query head; ``keys_read`` / ``keys_full``: keys attended vs
    what full attention would have attended (summed over rows and heads); ``nbytes``: memory
    held by the site's state (ring + counters). MAC + Top-K + phi sites (``mac_topk_phi``)
    count like MAC; a miss's keys read are its tail plus the keys its Top-K + phi prefix state
    attended (sinks, retrieved, the prompt's last keys before the tail). Top-K + phi sites
    count their ``decode_steps`` and ``prefills`` only: their hit and key counts are None.
    """

    layer: str
    method: str
    decode_steps: int | None
    prefills: int | None
    hit_rate: float | None
    head_hit_rates: tuple[float, ...]
    keys_read: int | None
    keys_full: int | None
    nbytes: int
    tau: str | None = None  # MAC sites: the tau in use and its radius (MACConfig.tau_source)

    @property
    def read_fraction(self) -> float | None:
        """Keys read as a fraction of full attention's (1.0: no saving; None: not counted)."""
        if self.keys_read is None:
            return None
        return self.keys_read / self.keys_full if self.keys_full else 1.0


class Stats(list[LayerStats]):
    """Per-layer stats, printable as a table (``print(macopt.stats(model))``)."""

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self)

    @property
    def hit_rate(self) -> float:
        steps = [(s.hit_rate, s.decode_steps) for s in self if s.decode_steps]
        return sum(r for r, _ in steps) / len(steps) if steps else 0.0

    def table(self, title: str = "macopt stats") -> Table:
        # Compact (no edge, one space of padding) so that it fits 80 columns whole.
        table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False)
        for column in ("layer", "method", "decode\nsteps", "prefills", "hit\nrate",
                       "read /\nfull", "state\nMB"):
            table.add_column(column, no_wrap=True, overflow="fold")
        for s in self:
            table.add_row(s.layer, s.method, _text(s.decode_steps), _text(s.prefills),
                          _text(s.hit_rate), _text(s.read_fraction), f"{s.nbytes / 2**20:.1f}")
        return table

    def __rich__(self) -> Table:
        return self.table()

    def __str__(self) -> str:
        return render(self.table())


def stats(model: torch.nn.Module) -> Stats:
    """Per-layer statistics of the stateful sites of an optimized model (one host sync).

    >>> import macopt
    >>> print(macopt.stats(model)[0].hit_rate)  # doctest: +SKIP
    0.93
    """
    sites = []
    for name, module in model.named_modules():
        found = scope.scope_of_module(module)
        site_id = scope.site_id_of(module)
        site = state.get(site_id) if site_id is not None else None
        if found is not None and site is not None:
            sites.append((found.qualname or name, site, _tau_source(found.config)))
    counted = [site for _, site, _ in sites if _has_counters(site) or _counts_steps(site)]
    counts = []
    if counted:
        device = counted[0].counters.device
        counts = torch.cat([s.counters.flatten().to(device) for s in counted]).cpu().tolist()
    out, offset = Stats(), 0
    for layer, site, tau in sites:
        if not (_has_counters(site) or _counts_steps(site)):
            out.append(LayerStats(layer, site.method, None, None, None, (), None, None,
                                  site.nbytes()))
            continue
        size = site.counters.numel()
        flat = counts[offset:offset + size]
        offset += size
        if _counts_steps(site):
            steps = dict(zip(STEP_COUNTERS, flat, strict=True))
            out.append(LayerStats(layer, site.method, steps["steps"], steps["prefills"], None,
                                  (), None, None, site.nbytes()))
            continue
        heads = site.counters.shape[1]
        rows = [flat[i * heads:(i + 1) * heads] for i in range(len(COUNTERS))]
        out.append(dataclasses.replace(
            _layer_stats(layer, site, dict(zip(COUNTERS, rows, strict=True))), tau=tau))
    return out


def _tau_source(config: MethodConfig | None) -> str | None:
    """Which tau a MAC site uses (its own config: a calibrated override or the model's)."""
    mac = getattr(config, "mac", config)
    return mac.tau_source() if hasattr(mac, "tau_source") else None


def _has_counters(site: state.SiteState) -> bool:
    """Whether the site keeps the per-head counters of :data:`COUNTERS` (MAC does)."""
    return site.counters.dim() == 2 and site.counters.shape[0] == len(COUNTERS)


def _counts_steps(site: state.SiteState) -> bool:
    """Whether the site keeps only :data:`STEP_COUNTERS` (Top-K + phi does)."""
    return site.counters.dim() == 1 and site.counters.numel() == len(STEP_COUNTERS)


def _text(value: float | int | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _layer_stats(layer: str, site: state.SiteState, c: dict[str, list[int]]) -> LayerStats:
    queries = c["queries"][0]
    heads = tuple(h / queries if queries else 0.0 for h in c["hits"])
    return LayerStats(
        layer=layer,
        method=site.method,
        decode_steps=c["steps"][0],
        prefills=c["prefills"][0],
        hit_rate=sum(heads) / len(heads) if heads else 0.0,
        head_hit_rates=heads,
        keys_read=sum(c["keys_read"]),
        keys_full=sum(c["keys_full"]),
        nbytes=site.nbytes(),
    )
