"""Per-site state of stateful methods (MAC rings, Top-K + phi summaries), by site id.

The graph passes bake an integer site id into every rewritten graph (one per attention
module, see :mod:`macopt.passes.scope`, which names each site here and releases its state);
the ops look their state up here. Site ids are never reused, and a module's state is released
when the module is garbage collected, so a new model never starts from a dead one's state. A
site's state is allocated once, at its first use (a warm-up step, outside any CUDA-graph
capture and outside the graphs' memory pool), and never moves afterwards, so graphs captured
later keep valid addresses. Allocating while a CUDA graph is being captured is refused with
an error instead, and so is reallocating a state that a captured graph reads (another spec: a
new prompt length into a dynamic cache, another batch capacity). Each site also holds
device-side counters that its ops update in place (no host sync); :func:`macopt.stats` reads
them.

>>> state = site_state(7, "demo", ("spec",), lambda: ([torch.zeros(3)], torch.zeros(2)))
>>> site_state(7, "demo", ("spec",), lambda: None) is state  # same spec: the same buffers
True
>>> release(7)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor


@dataclass
class SiteState:
    """One site's buffers (method-specific), its counters, and what they were allocated for."""

    method: str
    spec: tuple  # shapes, dtype, device, capacity: a different spec reallocates
    buffers: Any
    counters: Tensor  # int64, updated in place by the ops
    captured: bool = False  # a CUDA graph was recorded reading these buffers: they must stay

    def nbytes(self) -> int:
        """Bytes held by the buffers and counters."""
        tensors = [self.counters, *_tensors(self.buffers)]
        return sum(t.numel() * t.element_size() for t in tensors)


_STATES: dict[int, SiteState] = {}
_LABELS: dict[int, str] = {}  # site id -> its module's qualified name (messages)


def site_state(
    site_id: int, method: str, spec: tuple, allocate: Callable[[], tuple[Any, Tensor]]
) -> SiteState:
    """The state of ``site_id``; ``allocate() -> (buffers, counters)`` runs on first use or
    when ``spec`` changed (a re-optimized model, another dtype or device)."""
    state = _STATES.get(site_id)
    if state is not None and state.method == method and state.spec == spec:
        note_capture(state)
        return state
    if capturing():
        raise RuntimeError(
            f"macopt: the state of attention site {site_id} would be allocated during CUDA-graph "
            "capture, where its address would not survive. Run one step of the optimized model "
            "before capturing (torch.compile's mode='reduce-overhead' does this warm-up itself).")
    if state is not None and state.captured:
        # The graph would go on reading the old buffers' freed memory: refuse, loudly.
        raise RuntimeError(
            f"macopt: attention site {site_id}'s {state.method} state was recorded into a CUDA "
            f"graph, and this call needs it reallocated for another shape ({state.spec} -> "
            f"{spec}). Replaying that graph would read freed memory. Keep the state's shape "
            "fixed across sequences: a static cache (its length, not the prompt's, sizes the "
            "Top-K + phi state) and one batch capacity; or optimize and compile a fresh model.")
    buffers, counters = outside_graph_pools(allocate)
    _STATES[site_id] = SiteState(method, spec, buffers, counters)
    return _STATES[site_id]


def outside_graph_pools(allocate: Callable[[], Any]) -> Any:
    """``allocate()`` (tensors, or what holds them) with its CUDA memory from the caching
    allocator's ordinary pool: for what outlives the call that allocates it.

    A CUDA-graph tree's warm-up (``torch.compile(mode="reduce-overhead")``, and generate()'s
    own compile, whose chunked prefill runs the compiled forward) routes every allocation of
    its thread into the graphs' private pool. A tensor first allocated there and kept alive
    stops the tree's next recording: "Detected N tensor(s) in the cudagraph pool not tracked
    as outputs" (BENCHMARKS.md 22). Another thread allocates from the ordinary pool, on its own
    default stream: it starts after the caller's queued work (what ``allocate`` may read) and
    waits for its own kernels (the zero fills) before handing over. Never under capture
    (:func:`site_state` refuses that first).
    """
    if not torch.cuda.is_initialized():
        return allocate()
    torch.cuda.synchronize()
    result: list = []

    def run() -> None:
        try:
            allocated = allocate()
            for device in {t.device for t in _tensors(allocated) if t.is_cuda}:
                torch.cuda.synchronize(device)
            result.append(allocated)
        except BaseException as error:  # re-raised on the caller's thread
            result.append(error)

    worker = threading.Thread(target=run, name="macopt-state-allocation")
    worker.start()
    worker.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def get(site_id: int) -> SiteState | None:
    """The state of ``site_id`` if it was allocated, else None (an op about to read it)."""
    state = _STATES.get(site_id)
    if state is not None:
        note_capture(state)
    return state


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph (called on every op's
    state lookup: without an initialized CUDA context it asks nothing of the driver)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def note_capture(state: SiteState) -> None:
    """Mark ``state`` as read by a CUDA graph when the caller runs under capture: from then on
    a different spec is refused instead of reallocated (:func:`site_state`)."""
    if capturing():
        state.captured = True


_RELEASE_HOOKS: list[Callable[[int], None]] = []


def on_release(hook: Callable[[int], None]) -> None:
    """Call ``hook(site_id)`` whenever a site is released: for modules that keep entries of
    their own per site (:mod:`macopt.mac_guard`)."""
    _RELEASE_HOOKS.append(hook)


def release(site_id: int) -> None:
    """Drop the state of ``site_id`` (its memory is freed once no graph holds it)."""
    _STATES.pop(site_id, None)
    _LABELS.pop(site_id, None)
    for hook in _RELEASE_HOOKS:
        hook(site_id)


def label(site_id: int, name: str) -> None:
    """Name ``site_id`` for messages (the passes give its module's qualified name)."""
    _LABELS[site_id] = name


def label_of(site_id: int) -> str | None:
    return _LABELS.get(site_id)


def _tensors(buffers: Any) -> list[Tensor]:
    if isinstance(buffers, Tensor):
        return [buffers]
    if hasattr(buffers, "tensors"):
        return list(buffers.tensors())
    if isinstance(buffers, list | tuple):
        return [t for b in buffers for t in _tensors(b)]
    return []

