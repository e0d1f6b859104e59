"""``macopt bench mac``: one MAC-Attention decode layer at forced hit rates, against the exact
decode kernel, PyTorch SDPA (flash / cuDNN, ``enable_gqa``) and FlexAttention.

Llama-3.1-8B layout by default (32 query heads, 8 KV heads, D = 128, bf16), ring M = 512,
offset S = 256. For each (batch, context) the K/V cache is random and every row attends all of
it (``t = N - 1``). Hit rates are forced per (row, query head) by constructing the ring: every
slot holds a valid entry (positions ``[t - M, t)``, finite states) whose pre-RoPE query is far
from the current one, so the match scans a full ring and misses; for the chosen share of
(row, head) pairs one entry, at ``j = t - M / 2`` (a band of ``M / 2`` keys to recompute), holds
exactly the current query, so it hits. The achieved hit fraction is read from the step's hit
output. A step writes slot ``t mod M`` only, never the planted one, so repeated calls keep the
same decisions. On CUDA every variant is timed as a CUDA-graph replay (``do_bench`` medians, L2
flushed between repetitions); on CPU (smoke test) host-clock medians of tiny shapes.

The MAC time is the kernel step (:func:`macopt.kernels.mac.mac_decode_step`: match, attention,
finalize with ring write): the attention phase of one layer, as the exact kernel's.

>>> report = run(MACBenchConfig(batches=(1,), contexts=(512,), device="cpu"))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from macopt.bench import decode, timing
from macopt.kernels.mac_reference import MACRing

Tensor = torch.Tensor

DEFAULT_CONTEXTS = (8192, 16384, 32768, 65536, 131072)
DEFAULT_BATCHES = (1, 16, 64)
DEFAULT_HIT_RATES = (0.0, 0.9, 0.95, 0.99, 1.0)
DEFAULT_FLEX_BATCHES = (1,)  # FlexAttention compiles per shape (10-30 s): batch 1 by default
BASELINES = ("exact", "flash", "cudnn", "flex")


@dataclasses.dataclass
class MACBenchConfig:
    batches: tuple[int, ...] = DEFAULT_BATCHES
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    hit_rates: tuple[float, ...] = DEFAULT_HIT_RATES
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: torch.dtype = torch.bfloat16
    ring_size: int = 512
    offset: int = 256
    tau: float = 0.45
    max_depth: int = 16
    device: str = "cuda"
    skip: tuple[str, ...] = ()
    flex_batches: tuple[int, ...] = DEFAULT_FLEX_BATCHES
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    seed: int = 0


@dataclasses.dataclass
class Layer:
    """One layer's decode inputs: the query of position ``t = N - 1`` for every row."""

    q: Tensor
    q_pre: Tensor
    k: Tensor
    v: Tensor
    positions: Tensor
    starts: Tensor
    scale: float


def make_layer(config: MACBenchConfig, batch: int, context: int) -> Layer:
    gen = torch.Generator(config.device).manual_seed(config.seed)
    device, dtype = torch.device(config.device), config.dtype

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=dtype)

    kv = (batch, config.kv_heads, context, config.head_dim)
    return Layer(
        q=randn(batch, config.q_heads, config.head_dim),
        q_pre=randn(batch, config.q_heads, config.head_dim),
        k=randn(*kv), v=randn(*kv),
        positions=torch.full((batch,), context - 1, dtype=torch.int32, device=device),
        starts=torch.zeros(batch, dtype=torch.int32, device=device),
        scale=config.head_dim**-0.5,
    )


def forced_ring(layer: Layer, ring_size: int, hit_rate: float, seed: int = 0) -> MACRing:
    """A full ring where a ``hit_rate`` share of (row, head) pairs has one entry equal to the
    current pre-RoPE query (at ``j = t - M / 2``) and every other entry is far from it."""
    batch, q_heads, head_dim = layer.q_pre.shape
    device = layer.q_pre.device
    t = layer.positions.long()
    ring = MACRing.empty(batch, q_heads, ring_size, head_dim, layer.q_pre.dtype, device)
    positions = t[:, None] - ring_size + torch.arange(ring_size, device=device)  # [B, M]
    slots = positions % ring_size
    ring.pos.scatter_(2, slots[:, None].expand(-1, q_heads, -1).contiguous(),
                      positions.to(torch.int32)[:, None].expand(-1, q_heads, -1).contiguous())
    ring.q.copy_((-layer.q_pre[:, :, None] + 8.0).expand_as(ring.q))  # distance >> radius
    ring.o.normal_()
    ring.lse.fill_(1.0)
    gen = torch.Generator().manual_seed(seed)
    n_pairs = batch * q_heads
    chosen = torch.randperm(n_pairs, generator=gen)[: round(hit_rate * n_pairs)].to(device)
    rows, heads = chosen // q_heads, chosen % q_heads
    hit_slot = (t[rows] - ring_size // 2) % ring_size
    ring.q[rows, heads, hit_slot] = layer.q_pre[rows, heads]
    return ring


def _mac_step(config: MACBenchConfig, layer: Layer, ring: MACRing) -> Callable[[], object]:
    from macopt.kernels import mac

    def step() -> object:
        return mac.mac_decode_step(
            layer.q, layer.q_pre, layer.k, layer.v, ring, layer.positions, layer.starts,
            layer.scale, offset=config.offset, tau=config.tau, t_min=0,
            max_depth=config.max_depth)

    return step


def _baseline(name: str, config: MACBenchConfig, layer: Layer, batch: int, context: int):
    """The exact op, an SDPA backend or FlexAttention, through :mod:`macopt.bench.decode`."""
    inputs = decode.DecodeInputs(layer.q, layer.k, layer.v, layer.starts, layer.positions + 1,
                                 layer.scale)
    shape = decode.LayerShape(batch, context, config.q_heads, config.kv_heads, config.head_dim,
                              config.dtype)
    builders = {"exact": decode._build_macopt, **{v.name: v.build for v in decode.VARIANTS}}
    attend = builders["macopt" if name == "exact" else name](shape, inputs)
    return lambda: attend(inputs)


def _time(fn: Callable[[], object], config: MACBenchConfig) -> tuple[float, str]:
    fn()  # compile / autotune outside the graph
    if timing.is_cuda(config.device):
        return timing.graph_median_ms(fn, config.warmup_ms, config.rep_ms), "cuda-graph replay"
    return timing.median_ms(fn, config.device, config.warmup_ms, config.rep_ms), "host clock"


def measure(config: MACBenchConfig, batch: int, context: int) -> list[dict]:
    """Every baseline and hit rate at one (batch, context); MAC ratios vs the exact kernel."""
    layer = make_layer(config, batch, context)
    records, exact_ms = [], None
    base = {"batch": batch, "context": context}
    for name in BASELINES:
        record = {**base, "variant": name, "hit_rate": None, "status": "ok"}
        if name in config.skip or (name == "flex" and batch not in config.flex_batches):
            record["status"] = "skipped"
        else:
            try:
                record["median_ms"], record["timer"] = _time(
                    _baseline(name, config, layer, batch, context), config)
            except decode.Unavailable as err:
                record.update(status="unavailable", detail=decode.first_line(err))
            except Exception as err:  # noqa: BLE001  (a refused backend is a result, not a crash)
                record.update(status="refused", detail=decode.first_line(err))
        if name == "exact" and record["status"] == "ok":
            exact_ms = record["median_ms"]
        records.append(record)
    for rate in config.hit_rates:
        ring = forced_ring(layer, config.ring_size, rate, config.seed)
        step = _mac_step(config, layer, ring)
        _, hit, keys_read = step()
        record = {**base, "variant": "mac", "hit_rate": rate, "status": "ok",
                  "achieved_hit_rate": float(hit.float().mean()),
                  "mean_keys_read": float(keys_read.float().mean())}
        record["median_ms"], record["timer"] = _time(step, config)
        records.append(record)
    for record in records:
        if exact_ms and record.get("median_ms"):
            record["speedup_vs_exact"] = exact_ms / record["median_ms"]
    return records


def run(config: MACBenchConfig, json_path: Path | None = None, echo=print) -> dict:
    """Measure every (batch, context); write JSON when asked; return the report."""
    started = time.perf_counter()
    records = []
    for batch in config.batches:
        for context in config.contexts:
            records += measure(config, batch, context)
            if timing.is_cuda(config.device):
                torch.cuda.empty_cache()
            echo(f"batch {batch} context {context}: {time.perf_counter() - started:.0f} s")
    report = {"environment": timing.environment(config.device),
              "config": {**dataclasses.asdict(config), "dtype": str(config.dtype)},
              "records": records, "elapsed_s": time.perf_counter() - started}
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1))
    return report


def table(report: dict):
    """A rich table: one row per (batch, context), ms per variant, MAC speedups vs exact."""
    from rich.table import Table

    rates = report["config"]["hit_rates"]
    out = Table(title="MAC decode layer: ms (speedup vs exact kernel)")
    for column in ("batch", "context", *BASELINES, *(f"mac@{r:g}" for r in rates)):
        out.add_column(column, justify="right")
    rows: dict[tuple[int, int], dict[str, dict]] = {}
    for r in report["records"]:
        key = r["variant"] if r["hit_rate"] is None else f"mac@{r['hit_rate']:g}"
        rows.setdefault((r["batch"], r["context"]), {})[key] = r
    for (batch, context), cells in rows.items():
        out.add_row(str(batch), f"{context // 1024}K" if context >= 1024 else str(context),
                    *(_cell(cells.get(c)) for c in (*BASELINES, *(f"mac@{r:g}" for r in rates))))
    return out


def _cell(record: dict | None) -> str:
    if record is None or record["status"] != "ok":
        return "-" if record is None else record["status"]
    text = f"{record['median_ms']:.3f}"
    if record["variant"] != "exact" and record.get("speedup_vs_exact"):
        text += f" ({record['speedup_vs_exact']:.1f}x)"
    if record.get("achieved_hit_rate") is not None:
        text += f" h={record['achieved_hit_rate']:.2f}"
    return text


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "mac", help="MAC-Attention decode layer at forced hit rates vs exact/SDPA/Flex",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=decode.parse_sizes, default=DEFAULT_CONTEXTS)
    parser.add_argument("--batches", type=decode.parse_sizes, default=DEFAULT_BATCHES)
    parser.add_argument("--hit-rates", type=lambda s: tuple(float(x) for x in s.split(",")),
                        default=DEFAULT_HIT_RATES)
    decode.add_layer_arguments(parser)
    parser.add_argument("--ring-size", type=int, default=512)
    parser.add_argument("--offset", type=int, default=256)
    parser.add_argument("--skip", type=_parse_baselines, default=(),
                        help=f"baselines to skip, comma-separated: {','.join(BASELINES)}")
    parser.add_argument("--flex-batches", type=decode.parse_sizes, default=DEFAULT_FLEX_BATCHES)
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.set_defaults(func=_main)
    return parser


def _parse_baselines(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown baseline(s) {unknown}; choose among "
                                         f"{', '.join(BASELINES)}")
    return names


def _main(args: argparse.Namespace) -> int:
    from rich.console import Console

    if not timing.is_cuda(args.device) and os.environ.get("TRITON_INTERPRET") != "1":
        # Without a GPU, Triton fails deep in its driver; say what is needed instead.
        print(f"macopt bench mac: times MAC's Triton kernels, which need a CUDA GPU (device "
              f"{args.device!r}). Run it on a GPU; on CPU they run only under Triton's "
              "interpreter (TRITON_INTERPRET=1: a correctness check, not a timing).",
              file=sys.stderr)
        return 2
    config = MACBenchConfig(
        batches=args.batches, contexts=args.contexts, hit_rates=args.hit_rates,
        q_heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
        dtype=decode.DTYPES[args.dtype], ring_size=args.ring_size, offset=args.offset,
        device=args.device, skip=args.skip, flex_batches=args.flex_batches)
    console = Console()
    report = run(config, args.json, echo=console.print)
    console.print(table(report))
    return 0
