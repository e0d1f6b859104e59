"""``macopt bench topk``: one decode-attention layer, Top-K + phi against exact decode.

For each (batch, context) it times ``torch.ops.macopt.decode_attention`` (exact) and
``torch.ops.macopt.topk_phi_decode`` (selection included) at each budget and selector, on
the same random inputs, as CUDA-graph replays (on CUDA). The summary and page bounds are
built once per shape (prefill work, not timed). It also measures attention-output error,
relative L1 against full attention, of Top-K alone (completion off) and Top-K + phi at the
same selection: :func:`attention_output_errors` takes any q/k/v, so captured attention data
can replace the random inputs.

Approximate by design: random inputs make near-uniform attention, where Top-K alone is poor;
the feature maps here are the uncalibrated positive-random-feature initialisation.
The module runs on CPU too (tiny shapes, host-clock medians) so that tests can exercise it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from macopt.bench import timing
from macopt.bench.decode import (
    DTYPES,
    LayerShape,
    add_layer_arguments,
    add_timing_arguments,
    make_inputs,
    parse_sizes,
)
from macopt.config import SELECTORS, TopKPhiConfig
from macopt.kernels.feature_maps import FeatureMaps, positive_random_features
from macopt.topk_phi_select import summary_token_equivalent
from macopt.topk_phi_state import TopKPhiState, decode, prefill

Tensor = torch.Tensor

DEFAULT_CONTEXTS = (8192, 16384, 32768, 65536, 131072)
DEFAULT_BATCHES = (1, 16)
DEFAULT_BUDGETS = (0.01, 0.02, 0.05)


@dataclasses.dataclass(frozen=True)
class TopKBenchConfig:
    """The grid (batches x contexts x budgets x selectors) and the layer's layout."""

    batches: tuple[int, ...] = DEFAULT_BATCHES
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    budgets: tuple[float | int, ...] = DEFAULT_BUDGETS
    selectors: tuple[str, ...] = SELECTORS
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    d_phi: int = 128
    page_size: int = 32
    budget_floor: int = TopKPhiConfig.budget_floor  # fewest keys a fraction retrieves
    summary_in_budget: bool = False  # TopKPhiConfig's: the budget pays for the summary
    sinks: int = 4
    tail: int = 16
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"
    cuda_graphs: bool = True
    qk_std: float = 1.0  # scales random q and k: smaller gives more diffuse attention
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    seed: int = 0

    def shapes(self) -> list[LayerShape]:
        return [LayerShape(b, n, self.q_heads, self.kv_heads, self.head_dim, self.dtype)
                for b in self.batches for n in self.contexts]

    def method(self, budget: float | int, selector: str) -> TopKPhiConfig:
        """The config of one column; ``selector`` may be a spec, "sketch:C:R" / "channel:C:R"
        (channels, re-rank factor; C 0: head dim / 4)."""
        from macopt.topk_phi_select import parse_selector

        name, channels, rerank = parse_selector(selector)
        ranked = {"channels": channels or None, "rerank": rerank} if rerank else {}
        return TopKPhiConfig(sinks=self.sinks, tail=self.tail, budget=budget,
                             budget_floor=self.budget_floor, page_size=self.page_size,
                             selector=name, d_phi=self.d_phi,
                             summary_in_budget=self.summary_in_budget, **ranked)


@dataclasses.dataclass
class Record:
    """One (batch, context, method) result; ``selector`` is None for the exact kernel."""

    batch: int
    context: int
    selector: str | None
    budget: float | int | None
    budget_tokens: int | None = None
    tokens_read: int | None = None  # exact keys read per row and KV head (selection rounded)
    median_ms: float | None = None
    speedup_vs_exact: float | None = None
    median_ms_topk_only: float | None = None  # the same step, every head's completion off
    speedup_topk_only: float | None = None
    rel_l1_topk: float | None = None
    rel_l1_topk_phi: float | None = None
    status: str = "ok"
    detail: str = ""
    timer: str = ""


# --- error -----------------------------------------------------------------------------------


def relative_l1(out: Tensor, ref: Tensor) -> Tensor:
    """Per query head ``sum |out - ref| / sum |ref|`` over rows and dims: ``[Hq]`` fp32."""
    diff = (out.float() - ref.float()).abs().sum(dim=(0, 2))
    return diff / ref.float().abs().sum(dim=(0, 2)).clamp_min(1e-30)


def attention_output_errors(
    q: Tensor, k: Tensor, v: Tensor, scale: float, starts: Tensor, prefill_ends: Tensor,
    ends: Tensor, maps: FeatureMaps, config: TopKPhiConfig,
) -> dict[str, list[float]]:
    """Relative L1 error per query head of Top-K alone and of Top-K + phi (same selection)
    against full attention over each row's keys ``[starts, ends)``.

    ``q[B, Hq, D]``, ``k, v[B, Hkv, N, D]``, prompts ``[starts, prefill_ends)``. Captured data
    fits as is: one row per decode query (``k``, ``v`` may be expanded views of one sequence),
    ``ends = prefill_ends = position + 1``.

    >>> errors = attention_output_errors(q, k, v, scale, starts, ends, ends, maps, config)
    >>> errors["topk"], errors["topk_phi"]  # doctest: +SKIP
    """
    reference, _ = torch.ops.macopt.decode_attention_state(q, k, v, starts, ends, None, scale)
    batch, n_q_heads, head_dim = q.shape
    errors = {}
    for name, on in (("topk", False), ("topk_phi", True)):
        state = TopKPhiState.allocate(
            batch, n_q_heads, k.shape[1], k.shape[2], head_dim, k.dtype, k.device,
            page_size=config.page_size if config.selector == "page" else None, maps=maps,
            completion=(on,) * n_q_heads, sketch=config.selector == "sketch")
        prefill(state, k, v, starts, prefill_ends, config)
        out = decode(state, q, k, v, starts, ends, scale, config)
        errors[name] = relative_l1(out, reference).tolist()
    return errors


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


# --- timing ----------------------------------------------------------------------------------


def _time(fn, device: torch.device, config: TopKBenchConfig) -> tuple[float, str]:
    if timing.is_cuda(device) and config.cuda_graphs:
        ms = timing.graph_median_ms(fn, config.warmup_ms, config.rep_ms)
        return ms, "do_bench median of CUDA graph replays"
    fn()
    ms = timing.median_ms(fn, device, config.warmup_ms, config.rep_ms)
    return ms, "do_bench median" if timing.is_cuda(device) else "perf_counter median"


def tokens_read(config: TopKPhiConfig, context: int) -> int:
    """Exact keys a decode step reads per KV head: anchors plus the (page-rounded) budget."""
    budget = config.budget_tokens(context)
    if config.selector == "page":
        budget = -(-budget // config.page_size) * config.page_size
    return min(context, config.sinks + config.tail + budget)


def measure_shape(shape: LayerShape, config: TopKBenchConfig, maps: FeatureMaps,
                  generator: torch.Generator) -> list[Record]:
    """The exact kernel and every (budget, selector) at one shape, on one input set."""
    device = torch.device(config.device)
    x = make_inputs(shape, device, generator)
    x.q.mul_(config.qk_std)
    x.k.mul_(config.qk_std)
    exact_ms, timer = _time(
        lambda: torch.ops.macopt.decode_attention(x.q, x.k, x.v, x.starts, x.ends, None,
                                                  x.scale), device, config)
    records = [Record(shape.batch, shape.context, None, None, median_ms=exact_ms, timer=timer,
                      tokens_read=shape.context, speedup_vs_exact=1.0)]
    for selector in config.selectors:
        for budget in config.budgets:
            method = config.method(budget, selector)
            record = Record(shape.batch, shape.context, selector, budget,
                            budget_tokens=method.budget_tokens(shape.context),
                            tokens_read=tokens_read(method, shape.context))
            try:
                _measure_method(record, x, shape, method, maps, device, config)
                record.speedup_vs_exact = exact_ms / record.median_ms
                record.speedup_topk_only = exact_ms / record.median_ms_topk_only
            except torch.cuda.OutOfMemoryError as err:
                record.status, record.detail = "oom", str(err).splitlines()[0]
            records.append(record)
            gc.collect()
    return records


def _measure_method(record: Record, x, shape: LayerShape, method: TopKPhiConfig,
                    maps: FeatureMaps, device: torch.device, config: TopKBenchConfig) -> None:
    # Every row's whole cache is its prompt: the current token is the last tail key.
    errors = attention_output_errors(x.q, x.k, x.v, x.scale, x.starts, x.ends, x.ends, maps,
                                     method)
    record.rel_l1_topk, record.rel_l1_topk_phi = (_mean(errors[n]) for n in ("topk",
                                                                              "topk_phi"))
    for completion in (True, False):  # Top-K + phi, then Top-K alone (no features computed)
        state = TopKPhiState.allocate(
            shape.batch, shape.q_heads, shape.kv_heads, shape.context, shape.head_dim,
            shape.dtype, device, page_size=method.page_size if method.selector == "page" else None,
            maps=maps, completion=(completion,) * shape.q_heads,
            sketch=method.selector == "sketch")
        prefill(state, x.k, x.v, x.starts, x.ends, method)
        ms, record.timer = _time(
            lambda state=state: decode(state, x.q, x.k, x.v, x.starts, x.ends, x.scale, method),
            device, config)
        if completion:
            record.median_ms = ms
        else:
            record.median_ms_topk_only = ms
        del state


def run(config: TopKBenchConfig, json_path: Path | None = None, echo=print) -> dict:
    """Run the grid; return (and write to ``json_path`` after every shape) the report."""
    device = torch.device(config.device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    maps = positive_random_features(config.q_heads, config.kv_heads, config.head_dim,
                                    config.d_phi,
                                    generator=torch.Generator().manual_seed(config.seed))
    report = {
        "benchmark": "topk",
        "environment": timing.environment(device),
        "config": _config_dict(config),
        "summary_token_equivalent": summary_token_equivalent(
            config.head_dim, config.d_phi, torch.empty((), dtype=config.dtype).element_size()),
        "records": [],
    }
    for shape in config.shapes():
        records = measure_shape(shape, config, maps, generator)
        report["records"].extend(dataclasses.asdict(r) for r in records)
        echo(progress_line(records))
        if json_path is not None:
            write_json(report, json_path)
        if timing.is_cuda(device):
            torch.cuda.empty_cache()
    return report


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")


def _config_dict(config: TopKBenchConfig) -> dict:
    out = dataclasses.asdict(config)
    out["dtype"] = str(config.dtype).split(".")[-1]
    return out


# --- report ----------------------------------------------------------------------------------


def budget_label(budget: float | int) -> str:
    """``0.02`` -> ``2%``, ``128`` -> ``K=128``."""
    return f"K={budget}" if isinstance(budget, int) else f"{100 * budget:g}%"


def _context_label(context: int) -> str:
    return f"{context // 1024}K" if context % 1024 == 0 else str(context)


def progress_line(records: Sequence[Record]) -> str:
    exact = records[0]
    cells = [f"{r.selector} {budget_label(r.budget)}={_time_cell(dataclasses.asdict(r))}"
             for r in records[1:]]
    return (f"batch {exact.batch} x {_context_label(exact.context)}: exact "
            f"{exact.median_ms:.3f} ms; " + " ".join(cells))


def _time_cell(r: dict) -> str:
    if r["median_ms"] is None:
        return r["status"]
    ratio = f" ({r['speedup_vs_exact']:.1f}x)" if r["speedup_vs_exact"] else ""
    return f"{r['median_ms']:.3f}{ratio}"


def _topk_only_cell(r: dict) -> str:
    if r.get("median_ms_topk_only") is None:
        return r["status"]
    return f"{r['median_ms_topk_only']:.3f} ({r['speedup_topk_only']:.1f}x)"


def _error_cell(r: dict) -> str:
    if r["rel_l1_topk"] is None:
        return r["status"]
    return f"{r['rel_l1_topk']:.3f} / {r['rel_l1_topk_phi']:.3f}"


def table_rows(report: dict) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """Header, timing rows (ms and speed-up vs exact), the same for Top-K alone, and error rows
    (Top-K / Top-K + phi)."""
    config = report["config"]
    methods = [(s, b) for s in config["selectors"] for b in config["budgets"]]
    header = ["batch", "context", "exact ms",
              *(f"{s} {budget_label(b)}" for s, b in methods)]
    by_shape: dict[tuple[int, int], dict] = {}
    for r in report["records"]:
        by_shape.setdefault((r["batch"], r["context"]), {})[(r["selector"], r["budget"])] = r
    times, topk_only, errors = [], [], []
    for (batch, context), cells in by_shape.items():
        label = [str(batch), _context_label(context)]
        exact = cells[(None, None)]
        times.append([*label, f"{exact['median_ms']:.3f}",
                      *(_time_cell(cells[m]) if m in cells else "" for m in methods)])
        topk_only.append([*label, f"{exact['median_ms']:.3f}",
                          *(_topk_only_cell(cells[m]) if m in cells else "" for m in methods)])
        errors.append([*label, "",
                       *(_error_cell(cells[m]) if m in cells else "" for m in methods)])
    return header, times, topk_only, errors


def print_report(report: dict) -> None:
    """Two rich tables (plain text without rich): times with ratios, then output errors."""
    header, times, topk_only, errors = table_rows(report)
    env, config = report["environment"], report["config"]
    layout = (f"{config['q_heads']} q / {config['kv_heads']} kv heads, D {config['head_dim']},"
              f" {config['dtype']}, d_phi {config['d_phi']}, page {config['page_size']}")
    notes = [
        f"times: {report['records'][0]['timer']}; (Nx) = exact ms / method ms; selection "
        "included; summary and page bounds built at prefill (not timed)",
        f"errors: relative L1 vs full attention, mean over heads, Top-K alone / Top-K + phi at "
        f"the same selection; random inputs (q, k std {config['qk_std']}), uncalibrated phi",
        f"the summary costs ~{report['summary_token_equivalent']:.0f} cached tokens of reads "
        "per KV head per step",
    ]
    tables = [(f"Top-K + phi decode ms, {env['device']}, {layout}", header, times),
              ("Top-K alone (every head's completion off: no features) ms", header, topk_only),
              ("attention-output error (rel. L1): Top-K / Top-K + phi", header, errors)]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for title, head, rows in tables:
            print(title)
            print("\n".join("  ".join(row) for row in (head, *rows)))
        print("\n".join(notes))
        return
    console = Console(width=None if Console().is_terminal else 220)
    for title, head, rows in tables:
        table = Table(title=title, title_justify="left")
        for i, name in enumerate(head):
            table.add_column(name, justify="left" if i < 2 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for note in notes:
        console.print(note, markup=False, highlight=False)


# --- command line ----------------------------------------------------------------------------


def parse_budgets(text: str) -> tuple[float | int, ...]:
    """``"1%,2%,0.05,128"`` -> ``(0.01, 0.02, 0.05, 128)`` (ints are token counts).

    >>> parse_budgets("1%, 2%,0.05,128")
    (0.01, 0.02, 0.05, 128)
    """
    budgets: list[float | int] = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        try:
            if item.endswith("%"):
                value: float | int = float(item[:-1]) / 100
            else:
                value = int(item) if item.isdigit() else float(item)
            TopKPhiConfig(budget=value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"budget {item!r}: expected a percentage (2%), a fraction (0.02) or a number "
                f"of tokens (128); {err}") from None
        budgets.append(value)
    return tuple(budgets)


def parse_selectors(text: str) -> tuple[str, ...]:
    """Comma-separated selectors; "sketch" and "channel" may carry ":C:R" (channels, re-rank).

    >>> parse_selectors("sketch,sketch:32:3,page,exact")
    ('sketch', 'sketch:32:3', 'page', 'exact')
    """
    from macopt.topk_phi_select import parse_selector

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    try:
        for name in names:
            parse_selector(name)
    except ValueError:
        names = ()
    if not names:
        raise argparse.ArgumentTypeError(f"selectors: choose among {','.join(SELECTORS)} "
                                         "('sketch:C:R' / 'channel:C:R' set channels and "
                                         "re-rank factor)")
    return names


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``topk`` under ``macopt bench``."""
    parser = subparsers.add_parser(
        "topk", help="time Top-K + phi decode against exact decode; output error of Top-K vs "
        "Top-K + phi", description=__doc__.split("\n\n")[1])
    parser.add_argument("--contexts", type=parse_sizes, default=DEFAULT_CONTEXTS,
                        help="context lengths (default 8K,16K,32K,64K,128K)")
    parser.add_argument("--batches", type=parse_sizes, default=DEFAULT_BATCHES,
                        help="batch sizes (default 1,16)")
    parser.add_argument("--budgets", type=parse_budgets, default=DEFAULT_BUDGETS,
                        help="budgets: percentages, fractions or token counts (default "
                        "1%%,2%%,5%%)")
    parser.add_argument("--selectors", type=parse_selectors, default=SELECTORS,
                        help="comma-separated among sketch, channel, page, exact; sketch "
                        "and channel take ':C:R' (channels, re-rank factor), e.g. "
                        "sketch:32:3 (default all four)")
    add_layer_arguments(parser)
    parser.add_argument("--d-phi", type=int, default=128, help="features per map (default 128)")
    parser.add_argument("--page-size", type=int, default=32, help="selector page (default 32)")
    parser.add_argument("--budget-floor", type=int, default=TopKPhiConfig.budget_floor,
                        help="fewest keys a fractional budget retrieves (default "
                             f"{TopKPhiConfig.budget_floor}, TopKPhiConfig's; 0: none)")
    parser.add_argument("--summary-in-budget", action="store_true",
                        help="the budget pays for the summary (TopKPhiConfig.summary_in_budget)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="time eager calls instead of CUDA-graph replays")
    parser.add_argument("--qk-std", type=float, default=1.0,
                        help="scale of the random q and k (smaller: more diffuse attention)")
    add_timing_arguments(parser)
    parser.set_defaults(func=main)
    return parser


def config_from_args(args: argparse.Namespace) -> TopKBenchConfig:
    return TopKBenchConfig(
        batches=args.batches, contexts=args.contexts, budgets=args.budgets,
        selectors=args.selectors, q_heads=args.heads, kv_heads=args.kv_heads,
        head_dim=args.head_dim, d_phi=args.d_phi, page_size=args.page_size,
        budget_floor=args.budget_floor,
        summary_in_budget=args.summary_in_budget, dtype=DTYPES[args.dtype], device=args.device,
        cuda_graphs=args.cuda_graphs,
        qk_std=args.qk_std, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, seed=args.seed)


def main(args: argparse.Namespace) -> int:
    report = run(config_from_args(args), args.json)
    print_report(report)
    if args.json is not None:
        print(f"wrote {args.json}")
    return 0
