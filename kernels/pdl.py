"""Programmatic dependent launch (PDL, compute capability 9.0+) for macopt's decode chains.

A decode step is a chain of small dependent launches (MAC: match, attention, finalize; exact:
split, merge) whose cost at batch 1 is mostly the gap between them, not their work. Launched
with PDL, a kernel may be scheduled while the kernel before it still runs: the earlier one says
so with ``griddepcontrol.launch_dependents``, and the later one blocks in
``griddepcontrol.wait`` until the whole earlier grid has finished and its writes are visible.
So every kernel launched this way calls :func:`pdl_prologue` before its first load.

``MACOPT_PDL=0`` turns it off (for measuring it, or for a driver that refuses it in a CUDA
graph). The interpreter and pre-Hopper GPUs never use it.

>>> pdl_launch_options(torch.device("cpu"))
{}
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ENV = "MACOPT_PDL"


@functools.cache
def _capable(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` are launched with PDL (read at each launch)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return os.environ.get(ENV, "1") != "0" and _capable(device)


def pdl_launch_options(device: torch.device) -> dict[str, bool]:
    """Keyword arguments for a launch of a kernel that takes ``USE_PDL`` and calls
    :func:`pdl_prologue`: ``{"USE_PDL": True, "launch_pdl": True}`` or nothing."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl_enabled(device) else {}


@triton.jit
def pdl_prologue(USE_PDL: tl.constexpr):
    """Wait for the previous kernel's writes, then let the next kernel be scheduled (its own
    prologue waits for this whole grid, so releasing it early is safe)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
