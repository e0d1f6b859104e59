"""MAC per-site state: one ring per attention site for ``batch_capacity`` rows, and counters.

Memory per site: ``rows * Hq * M * (D * (q bytes + 4) + 12)`` bytes for the ring (pre-RoPE
queries in the model dtype, fp32 states, lse, position, depth) plus ``7 * Hq`` int64 counters;
``rows`` is ``MACConfig.batch_capacity`` (or the first batch). Nothing grows with the context.
"""

from __future__ import annotations

import torch

from macopt import state
from macopt.kernels.mac_counters import COUNTER_ROWS
from macopt.kernels.mac_reference import MACRing

Tensor = torch.Tensor


def ring_for(site_id: int, q_pre: Tensor, ring_size: int, capacity: int) -> tuple[MACRing, Tensor]:
    """The ring (its first ``B`` rows, a view at a fixed address) and counters of ``site_id``
    for queries ``q_pre[B, Hq, (N,) D]``; allocated for ``capacity`` rows (0: ``B``) on first
    use. A batch beyond the allocated rows is an error: the ring must not move."""
    batch, q_heads, head_dim = q_pre.shape[0], q_pre.shape[1], q_pre.shape[-1]
    spec = (q_heads, head_dim, ring_size, q_pre.dtype, q_pre.device, capacity)

    def allocate() -> tuple[MACRing, Tensor]:
        rows = capacity or batch
        ring = MACRing.empty(rows, q_heads, ring_size, head_dim, q_pre.dtype, q_pre.device)
        counters = torch.zeros(COUNTER_ROWS, q_heads, dtype=torch.int64, device=q_pre.device)
        return ring, counters

    site = state.site_state(site_id, "mac", spec, allocate)
    ring: MACRing = site.buffers
    rows = ring.pos.shape[0]
    if batch > rows:
        raise ValueError(
            f"macopt MAC: batch {batch} exceeds the {rows} rows the rings were allocated for at "
            f"their first use. Set MACConfig(batch_capacity={batch}) (or larger) and optimize the "
            "model again, before its first step.")
    view = MACRing(*(t[:batch] for t in ring.tensors())) if batch < rows else ring
    return view, site.counters
