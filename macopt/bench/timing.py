"""Timing and bandwidth helpers shared by macopt's benchmarks.

On CUDA, times are medians from ``triton.testing.do_bench`` (device events; it also flushes the
L2 before every repetition). On CPU (tests, smoke runs) they are ``time.perf_counter`` medians.
Benchmarks should still rotate among several input sets when one set fits in the L2, so that
nothing they time is served from the cache (:func:`rotation_count`, :func:`rotating`).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import itertools
import math
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

H100_L2_BYTES = 50 * 2**20
COPY_BYTES_CUDA = 2**30  # large enough that launch and tail effects vanish
COPY_BYTES_CPU = 2**24


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def median_ms(
    fn: Callable[[], object],
    device: torch.device | str,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
) -> float:
    """Median time of ``fn()`` in milliseconds (warm-up excluded).

    >>> median_ms(lambda: sum(range(100)), "cpu") > 0
    True
    """
    if is_cuda(device):
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return cpu_median_ms(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)


def cpu_median_ms(
    fn: Callable[[], object], warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 5
) -> float:
    """Host-clock median of ``fn()``: warm up for ``warmup_ms``, then repeat for ``rep_ms``."""
    _repeat_for(fn, warmup_ms / 1e3, min_reps=1)
    return statistics.median(_repeat_for(fn, rep_ms / 1e3, min_reps=min_reps)) * 1e3


def _repeat_for(fn: Callable[[], object], budget_s: float, min_reps: int) -> list[float]:
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_reps or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def capture_graph(fn: Callable[[], object], warmup_calls: int = 3) -> Callable[[], None]:
    """Capture ``fn()`` into a CUDA graph and return its replay.

    Warm-up runs on a side stream first, as CUDA graph capture requires (allocator pools,
    lazy initialisation and compilation must happen outside the capture).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def graph_median_ms(fn: Callable[[], object], warmup_ms: float = 25.0, rep_ms: float = 100.0):
    """Median time of one CUDA-graph replay of ``fn()``: launch gaps mostly removed."""
    return median_ms(capture_graph(fn), "cuda", warmup_ms, rep_ms)


def rotation_count(
    set_bytes: int, l2_bytes: int = H100_L2_BYTES, factor: int = 4, max_sets: int = 64
) -> int:
    """How many input sets of ``set_bytes`` to rotate among so that together they exceed the
    L2 ``factor`` times over (1 when one set already does)."""
    if set_bytes <= 0 or l2_bytes <= 0:
        return 1
    return max(1, min(max_sets, math.ceil(factor * l2_bytes / set_bytes)))


def rotating(calls: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """One callable that runs ``calls[0]``, ``calls[1]``, ... in turn, one per invocation."""
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


def bandwidth_gbps(n_bytes: int, ms: float) -> float:
    """Bytes moved per second, in GB/s (1e9 bytes)."""
    return n_bytes / (ms * 1e-3) / 1e9


def copy_bandwidth_gbps(device: torch.device | str, n_bytes: int | None = None) -> float:
    """Measured device-to-device copy bandwidth: a large clone, bytes read + written / time."""
    if n_bytes is None:
        n_bytes = COPY_BYTES_CUDA if is_cuda(device) else COPY_BYTES_CPU
    ms = _copy_ms(n_bytes, device)
    if is_cuda(device):
        torch.cuda.empty_cache()  # give the two buffers back before the benchmark allocates
    return bandwidth_gbps(2 * n_bytes, ms)


def _copy_ms(n_bytes: int, device: torch.device | str) -> float:
    src = torch.randn(n_bytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    return median_ms(lambda: dst.copy_(src), device)


def environment(device: torch.device | str, argv: Sequence[str] | None = None,
                commit: str | None = None) -> dict:
    """What a result depends on: device, library versions, date, command line, git commit
    (``commit``, else HEAD of the checkout the code runs from)."""
    # sys.orig_argv keeps "python -m macopt.cli ..." as typed; an explicit argv came from main().
    command = shlex.join(sys.orig_argv) if argv is None else shlex.join(["macopt", *argv])
    env = {
        "device": _device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if is_cuda(device) else None,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "git_commit": commit or _git_commit(),
    }
    if is_cuda(device):
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["sm_count"] = props.multi_processor_count
    return env


def _device_name(device: torch.device | str) -> str:
    if is_cuda(device):
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """HEAD of the working tree if it is a git checkout (a copy whose ``.git`` is not the
    code's reports that: pass ``commit`` to :func:`environment` there)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
