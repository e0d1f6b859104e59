"""``macopt bench decode``: one decode-attention layer, macopt against PyTorch's ways of doing it.

For each (batch, context) it times every variant on the same random inputs: macopt's exact op,
SDPA with ``enable_gqa=True`` under each backend, the transformers way (``repeat_kv`` then
masked SDPA) and compiled FlexAttention. Achieved bandwidth counts the K and V bytes read once;
it is compared with a device-to-device copy measured at the start of the run.

The module runs on CPU too (tiny shapes, host-clock medians) so that tests can exercise it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from macopt.bench import timing
from macopt.kernels import reference

Tensor = torch.Tensor

DEFAULT_CONTEXTS = (4096, 8192, 16384, 32768, 65536, 131072)
DEFAULT_BATCHES = (1, 8, 32)
# Compiling FlexAttention costs 10-30 s per shape: keep it to small batches and a time budget.
DEFAULT_FLEX_BATCHES = (1, 8)
DEFAULT_FLEX_BUDGET_S = 150.0
DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "float32": torch.float32, "fp32": torch.float32,
}
# Largest relative error ||out - ref|| / ||ref|| accepted against the fp32 reference.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-3}
MEMORY_HEADROOM = 0.9  # use at most this share of the free device memory


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One decode-attention layer: ``q[batch, q_heads, head_dim]``, K/V ``[batch, kv_heads,
    context, head_dim]``."""

    batch: int
    context: int
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: torch.dtype = torch.bfloat16

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def kv_bytes(self) -> int:
        """Bytes of K plus V: what one decode step must read at least."""
        return 2 * self.batch * self.kv_heads * self.context * self.head_dim * self.itemsize

    @property
    def set_bytes(self) -> int:
        """Bytes of one input set (q, K, V) plus its output."""
        return self.kv_bytes + 2 * self.batch * self.q_heads * self.head_dim * self.itemsize


@dataclasses.dataclass
class DecodeInputs:
    """One input set; every key of every row is attended (``starts = 0``, ``ends = N``)."""

    q: Tensor
    k: Tensor
    v: Tensor
    starts: Tensor
    ends: Tensor
    scale: float


def make_inputs(shape: LayerShape, device: torch.device, generator: torch.Generator):
    """Random normal inputs (never zeros: they hide wrong indexing and can time faster)."""

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=generator, device=device, dtype=shape.dtype)

    kv_size = (shape.batch, shape.kv_heads, shape.context, shape.head_dim)
    return DecodeInputs(
        q=randn(shape.batch, shape.q_heads, shape.head_dim),
        k=randn(*kv_size),
        v=randn(*kv_size),
        starts=torch.zeros(shape.batch, dtype=torch.int32, device=device),
        ends=torch.full((shape.batch,), shape.context, dtype=torch.int32, device=device),
        scale=shape.head_dim**-0.5,
    )


# ---------------------------------------------------------------------------------------------
# Variants: each builder gets the shape and a sample input set (flex compiles on it) and returns
# a function computing o[B, Hq, D] for any input set of that shape.

Attend = Callable[[DecodeInputs], Tensor]


class Unavailable(Exception):
    """The variant cannot run on this device or PyTorch build (not a failure of the shape)."""


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    build: Callable[[LayerShape, DecodeInputs], Attend]
    torch_baseline: bool  # counts toward "fastest PyTorch"
    failure_status: str = "error"  # SDPA backends "refuse" shapes they do not support
    extra_bytes: Callable[[LayerShape], int] = lambda shape: 0  # memory beyond the inputs


def _build_macopt(shape: LayerShape, sample: DecodeInputs) -> Attend:
    def attend(x: DecodeInputs) -> Tensor:
        return torch.ops.macopt.decode_attention(x.q, x.k, x.v, x.starts, x.ends, None, x.scale)

    return attend


def _build_sdpa(backend_name: str, cuda_only: bool, shape: LayerShape, sample: DecodeInputs):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if cuda_only and not timing.is_cuda(sample.q.device):
        raise Unavailable(f"SDPA's {backend_name} backend is CUDA-only")
    backend = getattr(SDPBackend, backend_name)

    def attend(x: DecodeInputs) -> Tensor:
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(
                x.q.unsqueeze(2), x.k, x.v, scale=x.scale, enable_gqa=True
            )
        return o.squeeze(2)

    return attend


def repeat_kv(hidden: Tensor, n_rep: int) -> Tensor:
    """transformers' ``repeat_kv``: ``[B, Hkv, N, D] -> [B, Hkv * n_rep, N, D]`` as a copy."""
    batch, n_kv_heads, n_keys, head_dim = hidden.shape
    if n_rep == 1:
        return hidden
    hidden = hidden[:, :, None].expand(batch, n_kv_heads, n_rep, n_keys, head_dim)
    return hidden.reshape(batch, n_kv_heads * n_rep, n_keys, head_dim)


def _build_repeat_kv(shape: LayerShape, sample: DecodeInputs) -> Attend:
    # A static-cache HF decode passes a boolean mask [B, 1, 1, N]; here every key is valid.
    mask = torch.ones(shape.batch, 1, 1, shape.context, dtype=torch.bool, device=sample.q.device)

    def attend(x: DecodeInputs) -> Tensor:
        k, v = repeat_kv(x.k, shape.group), repeat_kv(x.v, shape.group)
        o = F.scaled_dot_product_attention(x.q.unsqueeze(2), k, v, attn_mask=mask, scale=x.scale)
        return o.squeeze(2)

    return attend


def _raise_recompile_limits() -> None:
    """Never let dynamo fall back to eager silently: a hit limit becomes an error."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(64, getattr(config, name)))
    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True


def _build_flex(shape: LayerShape, sample: DecodeInputs) -> Attend:
    if not timing.is_cuda(sample.q.device):
        raise Unavailable("FlexAttention is benchmarked on CUDA only")
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()  # compile once per shape, from a clean cache
    _raise_recompile_limits()
    compiled = torch.compile(flex_attention, fullgraph=True, dynamic=False)

    def attend(x: DecodeInputs) -> Tensor:
        o = compiled(x.q.unsqueeze(2), x.k, x.v, scale=x.scale, enable_gqa=True)
        return o.squeeze(2)

    graphs_before = counters["stats"]["unique_graphs"]
    attend(sample)
    if counters["stats"]["unique_graphs"] <= graphs_before:
        raise RuntimeError("flex_attention ran without compiling a graph (eager fallback)")
    return attend


def _math_extra_bytes(shape: LayerShape) -> int:
    # enable_gqa in the math backend repeats K and V; scores and probabilities are fp32.
    scores = shape.batch * shape.q_heads * shape.context * 4
    return shape.group * shape.kv_bytes + 3 * scores


VARIANTS: tuple[Variant, ...] = (
    Variant("macopt", _build_macopt, torch_baseline=False),
    Variant("flash", functools.partial(_build_sdpa, "FLASH_ATTENTION", False), True, "refused"),
    Variant("cudnn", functools.partial(_build_sdpa, "CUDNN_ATTENTION", True), True, "refused"),
    Variant("efficient", functools.partial(_build_sdpa, "EFFICIENT_ATTENTION", True), True,
            "refused"),
    Variant("math", functools.partial(_build_sdpa, "MATH", False), True, "refused",
            _math_extra_bytes),
    Variant("repeat_kv", _build_repeat_kv, torch_baseline=False,
            extra_bytes=lambda shape: shape.group * shape.kv_bytes),
    Variant("flex", _build_flex, torch_baseline=True),
)
VARIANT_NAMES = tuple(variant.name for variant in VARIANTS)
VARIANT_BY_NAME = {variant.name: variant for variant in VARIANTS}


def is_torch_baseline(name: str) -> bool:
    variant = VARIANT_BY_NAME.get(name)
    return variant is not None and variant.torch_baseline
VARIANT_HELP = {
    "macopt": "torch.ops.macopt.decode_attention (exact), starts=0, ends=N",
    "flash": "SDPA enable_gqa=True, FLASH_ATTENTION backend",
    "cudnn": "SDPA enable_gqa=True, CUDNN_ATTENTION backend",
    "efficient": "SDPA enable_gqa=True, EFFICIENT_ATTENTION backend",
    "math": "SDPA enable_gqa=True, MATH backend",
    "repeat_kv": "transformers' repeat_kv, then SDPA with a bool mask (default backend choice)",
    "flex": "flex_attention enable_gqa=True, torch.compile'd once per shape",
}


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclasses.dataclass
class DecodeBenchConfig:
    batches: tuple[int, ...] = DEFAULT_BATCHES
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"
    skip: tuple[str, ...] = ()
    flex_batches: tuple[int, ...] = DEFAULT_FLEX_BATCHES
    flex_budget_s: float = DEFAULT_FLEX_BUDGET_S
    cuda_graphs: bool = False  # time CUDA-graph replays instead of eager calls
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    seed: int = 0

    def shapes(self) -> list[LayerShape]:
        return [
            LayerShape(b, n, self.q_heads, self.kv_heads, self.head_dim, self.dtype)
            for b in self.batches
            for n in self.contexts
        ]


@dataclasses.dataclass
class Record:
    """One (batch, context, variant) result; ``status`` is one of ``ok``, ``refused``, ``oom``,
    ``unavailable``, ``skipped``, ``error``."""

    batch: int
    context: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    variant: str
    status: str
    detail: str = ""
    median_ms: float | None = None
    kv_bytes: int = 0
    bandwidth_gbps: float | None = None
    copy_fraction: float | None = None
    rel_err: float | None = None  # set at the shape where the variant was checked
    correct: bool | None = None  # False: failed the check (at any earlier shape)
    setup_s: float | None = None  # build + first call (FlexAttention: its compilation)
    input_sets: int = 1
    timer: str = ""
    speedup_vs_fastest_torch: float | None = None  # macopt rows only
    fastest_torch: str | None = None
    speedup_vs_repeat_kv: float | None = None


@dataclasses.dataclass
class Check:
    rel_err: float
    correct: bool


@dataclasses.dataclass
class RunState:
    """What carries across shapes: check results and FlexAttention's compile time spent."""

    checks: dict[str, Check] = dataclasses.field(default_factory=dict)
    flex_compile_s: float = 0.0


def first_line(err: BaseException | str, limit: int = 160) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def relative_error(out: Tensor, ref: Tensor) -> float:
    err = torch.linalg.vector_norm(out.float() - ref) / torch.linalg.vector_norm(ref)
    return float(err)


def reference_output(x: DecodeInputs) -> Tensor:
    """fp32 attention of every row, one row at a time (bounded memory at long contexts)."""
    rows = [
        reference.attention(x.q[b : b + 1].float(), x.k[b : b + 1].float(), x.v[b : b + 1].float(),
                            x.scale)
        for b in range(x.q.shape[0])
    ]
    return torch.cat(rows)


def check_variant(attend: Attend, x: DecodeInputs, dtype: torch.dtype) -> Check:
    rel_err = relative_error(attend(x), reference_output(x))
    return Check(rel_err, math.isfinite(rel_err) and rel_err <= TOLERANCE[dtype])


def free_bytes(device: torch.device) -> float:
    if not timing.is_cuda(device):
        return math.inf
    return float(torch.cuda.mem_get_info(device)[0])


def input_set_count(shape: LayerShape, device: torch.device) -> int:
    """Rotate among enough sets to exceed the L2 (CUDA only), as many as memory allows."""
    if not timing.is_cuda(device):
        return 1
    wanted = timing.rotation_count(shape.set_bytes)
    fits = int(MEMORY_HEADROOM * free_bytes(device) // shape.set_bytes)
    return min(wanted, fits)


def skip_reason(variant: Variant, shape: LayerShape, config: DecodeBenchConfig, state: RunState):
    if variant.name != "flex":
        return None
    if shape.batch not in config.flex_batches:
        return f"flex timed at batches {','.join(map(str, config.flex_batches))} (--flex-batches)"
    if state.flex_compile_s > config.flex_budget_s:
        return f"flex compile budget of {config.flex_budget_s:.0f} s spent (--flex-budget-s)"
    return None


def _timed_calls(attend: Attend, sets: Sequence[DecodeInputs], cuda_graphs: bool):
    calls = [functools.partial(attend, x) for x in sets]
    if cuda_graphs:
        calls = [timing.capture_graph(call) for call in calls]
    return timing.rotating(calls)


def measure_variant(
    variant: Variant,
    shape: LayerShape,
    sets: Sequence[DecodeInputs],
    config: DecodeBenchConfig,
    state: RunState,
) -> Record:
    """Build, check (the first time it runs), and time one variant at one shape."""
    device = sets[0].q.device
    record = _blank_record(shape, variant.name, "ok")
    record.input_sets = len(sets)
    if variant.extra_bytes(shape) > MEMORY_HEADROOM * free_bytes(device):
        record.status = "oom"
        record.detail = f"needs ~{variant.extra_bytes(shape) / 1e9:.1f} GB beyond the inputs"
        return record
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            attend = variant.build(shape, sets[0])
            attend(sets[0])
        _synchronize(device)
        record.setup_s = time.perf_counter() - started
        if variant.name not in state.checks:
            state.checks[variant.name] = check_variant(attend, sets[0], shape.dtype)
            record.rel_err = state.checks[variant.name].rel_err
        record.correct = state.checks[variant.name].correct
        fn = _timed_calls(attend, sets, config.cuda_graphs)
        record.median_ms = timing.median_ms(fn, device, config.warmup_ms, config.rep_ms)
        record.timer = _timer_name(device, config.cuda_graphs)
    except Unavailable as err:
        record.status, record.detail = "unavailable", first_line(err)
    except torch.cuda.OutOfMemoryError as err:
        record.status, record.detail = "oom", first_line(err)
    except Exception as err:  # a backend refusing a shape must not end the run
        record.status = variant.failure_status
        record.detail = _failure_detail(err, caught)
    finally:
        if variant.name == "flex":
            state.flex_compile_s += time.perf_counter() - started
    if record.status != "ok":
        _release(device)  # a failed call's traceback may have held large buffers
    if record.median_ms is not None:
        record.bandwidth_gbps = timing.bandwidth_gbps(shape.kv_bytes, record.median_ms)
    return record


def _failure_detail(err: Exception, caught: list[warnings.WarningMessage]) -> str:
    # SDPA says only "No available kernel"; its warnings say why each backend declined.
    reasons = dict.fromkeys(first_line(str(w.message), 120) for w in caught)
    detail = f"{type(err).__name__}: {first_line(err)}"
    return f"{detail} ({'; '.join(list(reasons)[:3])})" if reasons else detail


def _timer_name(device: torch.device, cuda_graphs: bool) -> str:
    if not timing.is_cuda(device):
        return "perf_counter median"
    return "do_bench median" + (" of CUDA graph replays" if cuda_graphs else "")


def _blank_record(shape: LayerShape, variant: str, status: str, detail: str = "") -> Record:
    return Record(
        batch=shape.batch, context=shape.context, q_heads=shape.q_heads,
        kv_heads=shape.kv_heads, head_dim=shape.head_dim, dtype=str(shape.dtype).split(".")[-1],
        variant=variant, status=status, detail=detail, kv_bytes=shape.kv_bytes,
    )


def _synchronize(device: torch.device) -> None:
    if timing.is_cuda(device):
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if timing.is_cuda(device):
        torch.cuda.empty_cache()


def measure_shape(
    shape: LayerShape, variants: Sequence[Variant], config: DecodeBenchConfig, state: RunState,
    generator: torch.Generator,
) -> list[Record]:
    """All variants at one shape on the same input sets (all ``oom`` when one set won't fit)."""
    device = torch.device(config.device)
    n_sets = input_set_count(shape, device)
    if n_sets < 1:
        detail = f"one input set needs {shape.set_bytes / 1e9:.1f} GB"
        return [_blank_record(shape, v.name, "oom", detail) for v in variants]
    try:
        sets = [make_inputs(shape, device, generator) for _ in range(n_sets)]
    except torch.cuda.OutOfMemoryError as err:
        _release(device)
        return [_blank_record(shape, v.name, "oom", first_line(err)) for v in variants]
    records = []
    for variant in variants:
        reason = skip_reason(variant, shape, config, state)
        if reason:
            records.append(_blank_record(shape, variant.name, "skipped", reason))
            continue
        records.append(measure_variant(variant, shape, sets, config, state))
    del sets
    _release(device)
    return records


def add_ratios(records: Sequence[Record], copy_gbps: float) -> None:
    """Fill each record's copy fraction and, on macopt's row, its speed-ups."""
    for record in records:
        if record.bandwidth_gbps is not None:
            record.copy_fraction = record.bandwidth_gbps / copy_gbps
    timed = {r.variant: r for r in records if r.median_ms is not None and r.correct is not False}
    macopt = timed.get("macopt")
    if macopt is None:
        return
    baselines = [r for name, r in timed.items() if is_torch_baseline(name)]
    if baselines:
        fastest = min(baselines, key=lambda r: r.median_ms)
        macopt.fastest_torch = fastest.variant
        macopt.speedup_vs_fastest_torch = fastest.median_ms / macopt.median_ms
    if "repeat_kv" in timed:
        macopt.speedup_vs_repeat_kv = timed["repeat_kv"].median_ms / macopt.median_ms


def run(config: DecodeBenchConfig, json_path: Path | None = None, echo=print) -> dict:
    """Run the grid; return (and write to ``json_path`` after every shape) the report."""
    device = torch.device(config.device)
    variants = [v for v in VARIANTS if v.name not in config.skip]
    copy_gbps = timing.copy_bandwidth_gbps(device)
    echo(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)")
    report = {
        "benchmark": "decode",
        "environment": timing.environment(device),
        "config": _config_dict(config),
        "copy_bandwidth_gbps": copy_gbps,
        "variants": {v.name: VARIANT_HELP[v.name] for v in variants},
        "records": [],
    }
    state = RunState()
    generator = torch.Generator(device=device).manual_seed(config.seed)
    for shape in config.shapes():
        records = measure_shape(shape, variants, config, state, generator)
        add_ratios(records, copy_gbps)
        report["records"].extend(dataclasses.asdict(r) for r in records)
        echo(progress_line(shape, records))
        if json_path is not None:
            write_json(report, json_path)
    return report


def progress_line(shape: LayerShape, records: Sequence[Record]) -> str:
    cells = [f"{r.variant}={_cell(r)}" for r in records]
    return f"batch {shape.batch} x {shape.context}: " + " ".join(cells)


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")


def _config_dict(config: DecodeBenchConfig) -> dict:
    out = dataclasses.asdict(config)
    out["dtype"] = str(config.dtype).split(".")[-1]
    return out


# ---------------------------------------------------------------------------------------------
# Report

STATUS_CELL = {"refused": "refused", "oom": "oom", "unavailable": "n/a", "skipped": "-",
               "error": "error"}


def _cell(record: Record | dict) -> str:
    r = record if isinstance(record, dict) else dataclasses.asdict(record)
    if r["median_ms"] is None:
        return STATUS_CELL.get(r["status"], r["status"])
    return f"{r['median_ms']:.3f}" + ("!" if r["correct"] is False else "")


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary: one row per (batch, context), ms per variant."""
    names = list(report["variants"])
    header = ["batch", "context", "KV MB", *names, "macopt %BW", "best torch %BW",
              "vs fastest torch", "vs repeat_kv"]
    by_shape: dict[tuple[int, int], dict[str, dict]] = {}
    for r in report["records"]:
        by_shape.setdefault((r["batch"], r["context"]), {})[r["variant"]] = r
    rows = []
    for (batch, context), cells in by_shape.items():
        any_row = next(iter(cells.values()))
        macopt = cells.get("macopt", {})
        rows.append([
            str(batch), _context_label(context), f"{any_row['kv_bytes'] / 1e6:.0f}",
            *(_cell(cells[n]) if n in cells else "" for n in names),
            _percent(macopt.get("copy_fraction")),
            _percent(_best_torch_fraction(cells)),
            _ratio(macopt.get("speedup_vs_fastest_torch"))
            + (f" ({macopt['fastest_torch']})" if macopt.get("fastest_torch") else ""),
            _ratio(macopt.get("speedup_vs_repeat_kv")),
        ])
    return header, rows


def _best_torch_fraction(cells: dict[str, dict]) -> float | None:
    fractions = [
        r["copy_fraction"] for name, r in cells.items()
        if is_torch_baseline(name) and r["copy_fraction"] is not None
        and r["correct"] is not False
    ]
    return max(fractions, default=None)


def _context_label(context: int) -> str:
    return f"{context // 1024}K" if context % 1024 == 0 else str(context)


def report_notes(report: dict, details_per_status: int = 2) -> list[str]:
    """Footnotes: the check results, then why variants did not time (a few reasons each)."""
    notes = []
    checked = [r for r in report["records"] if r["rel_err"] is not None]
    if checked:
        parts = [f"{r['variant']} {r['rel_err']:.1e}{'' if r['correct'] else ' WRONG'}"
                 f" (at {r['batch']}x{_context_label(r['context'])})" for r in checked]
        notes.append("check vs fp32 reference, ||out - ref|| / ||ref||: " + ", ".join(parts))
    shown: dict[tuple[str, str], list[str]] = {}
    for r in report["records"]:
        details = shown.setdefault((r["variant"], r["status"]), [])
        if r["detail"] and r["detail"] not in details and len(details) < details_per_status:
            details.append(r["detail"])
            notes.append(f"{r['variant']} {r['status']}: {r['detail']}")
    notes.append("! = failed the correctness check; times in ms (median); %BW = K+V bytes / time"
                 " / measured copy bandwidth")
    return notes


def print_report(report: dict) -> None:
    """Print the summary table (rich when installed, plain text otherwise) and its notes."""
    header, rows = table_rows(report)
    env = report["environment"]
    title = (f"decode attention, {env['device']}, copy {report['copy_bandwidth_gbps']:.0f} GB/s,"
             f" {_shape_label(report['config'])}")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(format_plain_table(header, rows))
        print("\n".join(report_notes(report)))
        return
    console = Console(width=None if Console().is_terminal else 200)
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for note in report_notes(report):
        console.print(note, markup=False, highlight=False)


def format_plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
             for row in (header, *rows)]
    return "\n".join(lines)


def _shape_label(config: dict) -> str:
    return (f"{config['q_heads']} q heads / {config['kv_heads']} kv heads, "
            f"head dim {config['head_dim']}, {config['dtype']}")


# ---------------------------------------------------------------------------------------------
# Command line


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"4K,8K,100"`` -> ``(4096, 8192, 100)`` (K = 1024, M = 1024**2).

    >>> parse_sizes("4K,128k,1M,7")
    (4096, 131072, 1048576, 7)
    """
    units = {"K": 1024, "M": 1024**2}
    sizes = []
    for item in text.split(","):
        item = item.strip().upper()
        factor = units.get(item[-1:], 1)
        digits = item[:-1] if item[-1:] in units else item
        if not digits.isdigit() or int(digits) == 0:
            raise argparse.ArgumentTypeError(f"expected sizes like 4K,8K,100; got {text!r}")
        sizes.append(int(digits) * factor)
    return tuple(sizes)


def parse_names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in VARIANT_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {unknown}; choose among {', '.join(VARIANT_NAMES)}"
        )
    return names


def add_layer_arguments(parser: argparse.ArgumentParser) -> None:
    """The attention-layer flags every one-layer benchmark shares (Llama-3.1-8B defaults)."""
    parser.add_argument("--heads", type=int, default=32, help="query heads (default 32)")
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim (default 128)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    """Timing, seed and report flags shared by the one-layer benchmarks."""
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``decode`` under ``macopt bench``."""
    parser = subparsers.add_parser(
        "decode",
        help="time one decode-attention layer: macopt vs SDPA backends, repeat_kv, FlexAttention",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--contexts", type=parse_sizes, default=DEFAULT_CONTEXTS,
                        help="context lengths (default 4K,8K,16K,32K,64K,128K)")
    parser.add_argument("--batches", type=parse_sizes, default=DEFAULT_BATCHES,
                        help="batch sizes (default 1,8,32)")
    add_layer_arguments(parser)
    parser.add_argument("--skip", type=parse_names, default=(),
                        help=f"variants to leave out, comma-separated: {','.join(VARIANT_NAMES)}")
    parser.add_argument("--flex-batches", type=parse_sizes, default=DEFAULT_FLEX_BATCHES,
                        help="batches at which FlexAttention is compiled and timed (default 1,8)")
    parser.add_argument("--flex-budget-s", type=float, default=DEFAULT_FLEX_BUDGET_S,
                        help="stop compiling FlexAttention once this much time went into it")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time CUDA-graph replays of each variant instead of eager calls")
    add_timing_arguments(parser)
    parser.set_defaults(func=main)
    return parser


def config_from_args(args: argparse.Namespace) -> DecodeBenchConfig:
    return DecodeBenchConfig(
        batches=args.batches, contexts=args.contexts, q_heads=args.heads,
        kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=DTYPES[args.dtype],
        device=args.device, skip=args.skip, flex_batches=args.flex_batches,
        flex_budget_s=args.flex_budget_s, cuda_graphs=args.cuda_graphs,
        warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, seed=args.seed,
    )


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if config.cuda_graphs and not timing.is_cuda(config.device):
        raise SystemExit("--cuda-graphs needs a CUDA device")
    report = run(config, args.json)
    print_report(report)
    if args.json is not None:
        print(f"wrote {args.json}")
    wrong = [r["variant"] for r in report["records"] if r["correct"] is False]
    return 1 if "macopt" in wrong else 0
