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

from macopt import distributed, state
from macopt.config import MethodConfig
from macopt.kernels.mac_counters import COUNTERS
from macopt.passes import scope
from macopt.report import render
from macopt.topk_phi_ops import STEP_COUNTERS


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
    ``short_continued_chunks`` (MAC sites): prefill chunks shorter than the ring that
    continued a sequence (``prefill_chunk_size`` < ``ring_size``): each left the ring only its
    own positions, so decoding missed until it refilled the ring.
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
    # Top-K + phi sites: whether the completion runs and why (TopKPhiConfig.completion_source)
    completion: str | None = None
    short_continued_chunks: int | None = None

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

    @property
    def notes(self) -> list[str]:
        """What the user should know beyond the table's numbers (printed under it)."""
        # every chunk passes every MAC site: the most any site counted is the chunks
        short = max((s.short_continued_chunks or 0 for s in self), default=0)
        if not short:
            return []
        chunks = "chunk" if short == 1 else "chunks"
        return [f"{short} prefill {chunks} shorter than MAC's ring continued a sequence: the "
                "ring kept only the last chunk's positions, so decoding missed until it "
                "refilled the ring; use prefill_chunk_size >= MACConfig.ring_size (512 by "
                "default)."]

    def table(self, title: str = "macopt stats") -> Table:
        # Compact (no edge, one space of padding) so that it fits 80 columns whole.
        table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False,
                      caption="\n".join(self.notes) or None, caption_justify="left")
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


def stats(model: torch.nn.Module, *, gather: bool | None = None) -> Stats:
    """Per-layer statistics of the stateful sites of an optimized model (one host sync).

    A tensor-parallel model (transformers' ``tp_plan`` under torch.distributed): each rank's
    state holds its own heads. ``gather`` (default: whenever the model is sharded and
    torch.distributed is initialised) collects every rank's per-head counters over the TP group,
    so that every rank gets the whole model's stats (``head_hit_rates`` over all query heads,
    keys and ``nbytes`` summed over ranks); a collective: call it on every rank.
    ``gather=False``: this rank's heads and memory only.

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
            sites.append((found.qualname or name, site, _sources(found.config), name))
    counters = _site_counters(model, sites, gather)
    out = Stats()
    for (layer, site, sources, _), (flat, nbytes) in zip(sites, counters, strict=True):
        if flat is None:
            out.append(LayerStats(layer, site.method, None, None, None, (), None, None, nbytes,
                                  **sources))
        elif _counts_steps(site):
            steps = dict(zip(STEP_COUNTERS, flat.tolist(), strict=True))
            out.append(LayerStats(layer, site.method, steps["steps"], steps["prefills"], None,
                                  (), None, None, nbytes, **sources))
        else:
            rows = dict(zip(COUNTERS, flat.tolist(), strict=True))
            out.append(dataclasses.replace(_layer_stats(layer, site, rows), nbytes=nbytes,
                                           **sources))
    return out


def _site_counters(model: torch.nn.Module, sites: list[tuple], gather: bool | None
                   ) -> list[tuple[torch.Tensor | None, int]]:
    """Each site's counters on the host (None: it keeps none) and its state bytes; gathered
    over the tensor-parallel group when asked or, by default, when the model is sharded."""
    local = _local_counters([site for _, site, _, _ in sites])
    layout = distributed.tensor_parallel(model) if gather is not False else None
    if layout is None:
        if gather:
            raise ValueError("macopt.stats(gather=True): the model is not tensor-parallel "
                             "(no sharded attention, or torch.distributed is not initialised)")
        return local
    # Per-head counters (MAC) go to their global heads; step counts are the same on every rank.
    per_head = [(name, c if c is not None and c.dim() == 2 else None, n)
                for (_, _, _, name), (c, n) in zip(sites, local, strict=True)]
    gathered = distributed.gather_head_counters(layout, per_head)
    return [(c if g is None else g, n) for (c, _), (g, n) in zip(local, gathered, strict=True)]


def _local_counters(sites: list[state.SiteState]) -> list[tuple[torch.Tensor | None, int]]:
    """This rank's counters of each site on the host, in one device-to-host copy."""
    counted = [s for s in sites if _has_counters(s) or _counts_steps(s)]
    host = []
    if counted:
        device = counted[0].counters.device
        flat = torch.cat([s.counters.flatten().to(device) for s in counted]).cpu()
        host = [t.view(s.counters.shape) for t, s in
                zip(flat.split([s.counters.numel() for s in counted]), counted, strict=True)]
    out = []
    for site in sites:
        keeps = _has_counters(site) or _counts_steps(site)
        out.append((host.pop(0) if keeps else None, site.nbytes()))
    return out


def _sources(config: MethodConfig | None) -> dict[str, str | None]:
    """Which tau a MAC site uses and whether a Top-K + phi site completes (from the site's own
    config: a calibrated override or the model's)."""
    mac = getattr(config, "mac", config)
    topk = getattr(config, "topk_phi", config)
    return {"tau": mac.tau_source() if hasattr(mac, "tau_source") else None,
            "completion": (topk.completion_source() if hasattr(topk, "completion_source")
                           else None)}


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
        short_continued_chunks=c["short_continued_chunks"][0],
    )
