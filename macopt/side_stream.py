"""A second CUDA stream for work that can run beside the model's own: the MAC match.

The MAC match needs only the pre-RoPE query and the ring, so the pass places it right after the
query projection (:mod:`macopt.passes.mac_rewrite`) and the op runs it here, forked from the
current stream: it overlaps the layer's K/V projections, RoPE and cache writes instead of
delaying the attention launch. The decode op joins before it reads the result. A fork and a join
are event waits between the two streams, so a CUDA-graph capture (``torch.compile`` with
``mode="reduce-overhead"``) records both branches as one graph.

Memory rules. Outputs are allocated on the current stream before the fork (the side stream
never allocates). Inputs read on the side stream are held until the join: once the current
stream has waited for the side stream, anything it later queues into their memory runs after
the side stream's reads, so freeing them then is safe, with no allocator event to poll (what
``record_stream`` would leave behind in a CUDA-graph pool). (The CUDA-graph-tree error a
user's own ``mode="reduce-overhead"`` compile of MAC met was not the stream's but a skipped
prefill: BENCHMARKS.md 17.)

``MACOPT_SIDE_STREAM=0`` runs the forked work on the current stream instead (same results;
for A/B timing and debugging).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

Tensor = torch.Tensor

_STREAMS: dict[int, torch.cuda.Stream] = {}
_HELD: dict[int, list[Tensor]] = {}  # device index -> tensors the side stream may still read


def enabled(device: torch.device) -> bool:
    """Whether forked work on ``device`` goes to a side stream (CUDA, not switched off)."""
    return device.type == "cuda" and os.environ.get("MACOPT_SIDE_STREAM", "1") != "0"


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The device's side stream, created on first use."""
    index = _index(device)
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(device=index)
    return _STREAMS[index]


@contextmanager
def forked(device: torch.device, *reads: Tensor) -> Iterator[None]:
    """Run the block's launches on the side stream after everything queued so far on the
    current stream; ``reads``: the tensors the block reads that the current stream owns."""
    if not enabled(device):
        yield
        return
    main, side = torch.cuda.current_stream(device), side_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        yield
    _HELD.setdefault(_index(device), []).extend(reads)


def join(device: torch.device) -> None:
    """Make the current stream wait for everything forked so far; the forked work's inputs
    may be freed from here on."""
    if enabled(device):
        torch.cuda.current_stream(device).wait_stream(side_stream(device))
        _HELD.pop(_index(device), None)
