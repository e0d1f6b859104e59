"""``macopt bench generate``: decode speed on the user's path, ``model.generate()``.

What a user runs, and nothing else: ``macopt.optimize(model, config)`` (none for
``unmodified``), then ``model.generate(ids, max_new_tokens=N, cache_implementation="static")``.
transformers allocates the static cache, runs the prefill (for MAC and Top-K + phi macopt's
routed ``macopt_eager`` graph), and compiles the decode step itself (``torch.compile`` of the
model's call, ``mode="reduce-overhead"``: CUDA graphs). The model is Llama-3.1-8B-shaped with
random bf16 weights (``--layers`` of them; 8 by default, to keep 128K prefills and cold compiles
within one GPU call), prompts are random token ids.

Per (batch, method, context): one untimed ``generate`` (compiles, records CUDA graphs), then a
timed one of the same shapes. A logits processor records a CUDA event each time generate asks
for the next token's scores, without synchronising: the intervals between consecutive events
are decode steps as generate runs them (model step, sampling, stopping checks, host gaps), the
first event closes the prefill. ``median_ms`` is the median interval. MAC hit rates are
measured over the timed call (deltas of ``macopt.stats``), never assumed.

The unmodified model runs first, then each method; every (method, batch) gets a fresh model with
the same weights (``optimize`` works in place, and MAC's state is sized for one batch capacity).
Compile health per timed call: graphs dynamo compiled during it (0 after the untimed call),
CUDA-graph skips, decode sites macopt rewrote (``macopt.explain``).
Tokens against the unmodified model's: equal or not, and where they first differ, the
unmodified model's logit margin there beside the largest logit difference of the two runs (from
the untimed calls, which keep their logits): a near-tie flipped by bf16 rounding has a margin
within that difference (:func:`first_divergence`). The unmodified model's own row says whether
its timed call repeats its untimed one. ``--prefill-chunk N``: every method's prompt prefilled
in chunks of N tokens (transformers' ``prefill_chunk_size``), for prompts whose one-shot
prefill does not fit the card (the unmodified model's at 128K, batch 2, on 80 GB: chunks of
4096 fit, 16384 did not, BENCHMARKS.md 21; the unmodified model's chunked prefill there took
108 s against ~14 s for a one-shot one at 96K); macopt's state after a chunked prefill is the
one-shot prefill's, MAC's when the last chunk covers its ring (``tests/test_chunked_prefill.py``;
128K in chunks of 4096 does). ``--warmup-chunks K``: the untimed call prefills only the first K
chunks, into a static cache of the timed call's size (``max_length``, and a stopping criterion
after the same new tokens): the same graphs compile and record (the timed call's compile
health columns say if not), the timed call is unchanged, and a 128K point costs one long
prefill instead of two (``untimed_prompt_tokens`` in each record).

    macopt bench generate --contexts 8192,131072 --batches 1,2 --json generate.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from macopt.bench.decode import parse_sizes
from macopt.bench.e2e import (
    ModelShape,
    _compile_counts,
    build_model,
    decode_sites_rewritten,
    parse_method,
    prefill_sites_causal,
)
from macopt.passes.causal_prefill import under_inductor

DEFAULT_METHODS = ("unmodified", "exact", "mac:all", "mac:1")


class StepClock:
    """A logits processor recording a CUDA event per generated token (no synchronisation)."""

    def __init__(self) -> None:
        self.events: list[torch.cuda.Event] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events.append(event)
        return scores


def timed_generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int,
                   keep_logits: bool = False, prefill_chunk: int = 0,
                   cache_tokens: int = 0) -> dict:
    """One ``generate`` call as a user makes it; per-step intervals from :class:`StepClock`.
    ``keep_logits``: also return each step's logits ``[steps, B, V]`` on the CPU (the untimed
    call only: the timed one runs exactly what a user runs). ``prefill_chunk``: transformers'
    ``prefill_chunk_size`` (0: the prompt in one forward). ``cache_tokens`` (the untimed call
    only): size the static cache for that many tokens (``max_length``) and stop after
    ``new_tokens`` all the same, so that a shorter prompt compiles and records the graphs of
    a longer one (0: ``max_new_tokens``, the cache sized for this prompt)."""
    from transformers import LogitsProcessorList, MaxLengthCriteria, StoppingCriteriaList

    chunking = {"prefill_chunk_size": prefill_chunk} if prefill_chunk else {}
    length = {"max_new_tokens": new_tokens} if not cache_tokens else {
        "max_length": cache_tokens,
        # replaces generate()'s own MaxLengthCriteria (from max_length): the cache keeps its size
        "stopping_criteria": StoppingCriteriaList([MaxLengthCriteria(ids.shape[1] + new_tokens)])}
    clock = StepClock()
    start = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         min_new_tokens=new_tokens, cache_implementation="static",
                         logits_processor=LogitsProcessorList([clock]),
                         output_logits=keep_logits, return_dict_in_generate=keep_logits,
                         **length, **chunking)
    torch.cuda.synchronize()
    steps = [a.elapsed_time(b) for a, b in zip(clock.events, clock.events[1:], strict=False)]
    sequences = out.sequences if keep_logits else out
    result = {"prefill_ms": start.elapsed_time(clock.events[0]), "median_ms":
              statistics.median(steps), "mean_ms": statistics.fmean(steps), "steps": len(steps),
              "tokens": sequences[:, ids.shape[1]:].cpu()}
    if keep_logits:
        result["logits"] = torch.stack(out.logits).float().cpu()
    return result


def first_divergence(ref_tokens: torch.Tensor, ref_logits: torch.Tensor, tokens: torch.Tensor,
                     logits: torch.Tensor) -> dict | None:
    """Where greedy tokens ``[B, T]`` first differ from the reference's (None: they never do),
    with what explains it: at that step the two runs saw the same tokens, so ``margin`` (the
    reference's top-1 minus top-2 logit for that row) against ``logit_diff`` (the largest
    difference of the two runs' logits there) tells a near-tie flipped by rounding (margin
    within the difference) from a real change (a margin far above it)."""
    differs = ref_tokens != tokens
    if not differs.any():
        return None
    step = int(differs.any(dim=0).nonzero()[0])
    row = int(differs[:, step].nonzero()[0])
    top2 = ref_logits[step, row].topk(2).values
    return {"step": step, "row": row, "margin": float(top2[0] - top2[1]),
            "logit_diff": float((ref_logits[step, row] - logits[step, row]).abs().max())}


def mac_hits(model: torch.nn.Module) -> tuple[int, int]:
    """(hits, queries) summed over MAC sites, 0s when none."""
    import macopt

    layers = [s for s in macopt.stats(model) if s.decode_steps]
    hits = sum(round(s.hit_rate * s.decode_steps) for s in layers)
    return hits, sum(s.decode_steps for s in layers)


def run(args: argparse.Namespace) -> list[dict]:
    import macopt
    from macopt.passes._compat import count_cudagraph_recordings

    if not torch.cuda.is_available():
        raise SystemExit("macopt bench generate: needs a CUDA GPU (the path it measures compiles "
                         "generate()'s decode step with CUDA graphs).")
    shape = ModelShape(layers=args.layers)
    longest = max(args.contexts) + args.new_tokens
    methods = [parse_method(m) for m in args.methods]
    order = [m for m in methods if m.config is None] + [m for m in methods if m.config]
    records: list[dict] = []
    # (tokens, logits) of the unmodified model's untimed call per (batch, context)
    unmodified_runs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    with count_cudagraph_recordings() as recordings:
        for method in order:
            for batch in args.batches:
                # A fresh model (same seed: same weights) per method and batch, as a user who
                # serves one batch size: MAC's state is allocated for one batch capacity, and
                # CUDA graphs recorded over it must never see it move.
                model = build_model(shape, "cuda", torch.bfloat16, args.seed, longest)
                if method.config is not None:
                    macopt.optimize(model, method.config_for(batch),
                                    overrides=method.overrides_for(batch))
                for context in args.contexts:
                    record = _measure(model, method, batch, context, args, shape, recordings,
                                      unmodified_runs)
                    records.append(record)
                    print(_line(record), flush=True)
                    if args.json:
                        Path(args.json).write_text(json.dumps(
                            {"environment": _environment(args), "records": records}, indent=1))
                del model
                _release_compiled_state()
    return records


def _measure(model: torch.nn.Module, method: Any, batch: int, context: int,
             args: argparse.Namespace, shape: ModelShape, recordings: list,
             unmodified_runs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]
             ) -> dict:
    """One point: an untimed ``generate`` (compiles, records CUDA graphs), then a timed one."""
    ids = torch.randint(2, shape.vocab, (batch, context), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(context))
    torch.cuda.reset_peak_memory_stats()  # the peak of this point's calls alone
    warm = args.warmup_chunks * args.prefill_chunk
    short = 0 < warm < context  # the untimed call prefills only the first chunks
    first = time.perf_counter()
    untimed = timed_generate(model, ids[:, :warm] if short else ids, args.new_tokens,
                             keep_logits=True, prefill_chunk=args.prefill_chunk,
                             cache_tokens=context + args.new_tokens if short else 0)
    first_s = time.perf_counter() - first
    before, recorded = _compile_counts(), len(recordings)
    stateful = method.config is not None
    hits_before = mac_hits(model) if stateful else (0, 0)
    result = timed_generate(model, ids, args.new_tokens, prefill_chunk=args.prefill_chunk)
    after = _compile_counts()
    tokens = result.pop("tokens")
    if not stateful:
        unmodified_runs[batch, context] = untimed["tokens"], untimed["logits"]
    hits = [a - b for a, b in zip(mac_hits(model) if stateful else (0, 0), hits_before,
                                  strict=True)]
    base = unmodified_runs.get((batch, context))
    divergence = None if base is None or not stateful else first_divergence(
        base[0], base[1], untimed["tokens"], untimed["logits"])
    kernels = decode_kernels(model, ids, args.new_tokens, args.prefill_chunk) \
        if args.profile_kernels else None
    return {
        "method": method.label, "batch": batch, "context": context, **result,
        "first_call_s": round(first_s, 2),
        "untimed_prompt_tokens": warm if short else context,
        "hit_rate": hits[0] / hits[1] if hits[1] else None,
        "recompiles_in_timed_call": after["graphs"] - before["graphs"],
        "cudagraph_recordings_in_timed_call": len(recordings) - recorded,
        "cudagraph_skips_total": after["cudagraph_skips"],
        "decode_sites_rewritten": decode_sites_rewritten(model) if stateful else 0,
        "prefill_sites_causal": prefill_sites_causal(model) if stateful else 0,
        # a method: its untimed call's tokens against the unmodified model's (the calls the
        # divergence compares); the unmodified model: its timed call against its untimed one
        "tokens_equal_unmodified": None if base is None else (
            divergence is None if stateful else bool(torch.equal(base[0], tokens))),
        "first_divergence": divergence,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "kernels_per_step": kernels,
    }


def decode_kernels(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int,
                   prefill_chunk: int = 0, top: int = 30) -> dict[str, list[float]]:
    """``{kernel: [launches, us]}`` per decode step of one more ``generate`` call (CUDA
    profiler; the prefill's kernels are spread over the steps too, so profile short prompts),
    the ``top`` largest by time: where a step's time goes, kernel by kernel."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        timed_generate(model, ids, new_tokens, prefill_chunk=prefill_chunk)
    steps = max(new_tokens - 1, 1)
    total: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            entry = total.setdefault(event.name[:60], [0.0, 0.0])
            entry[0] += 1 / steps
            entry[1] += event.device_time_total / steps
    ranked = sorted(total.items(), key=lambda item: -item[1][1])[:top]
    return {name: [round(n, 2), round(us, 2)] for name, (n, us) in ranked}


def _release_compiled_state() -> None:
    """Drop the last model's compiled code and CUDA-graph pools before the next model: every
    fresh model compiles the same ``forward`` code object, and Dynamo's per-code recompile limit
    would otherwise send a later model down the eager path."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _line(r: dict) -> str:
    hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.2f}"
    return (f"{r['method']:>11} b{r['batch']} {r['context']:>7}: {r['median_ms']:7.3f} ms/token "
            f"(mean {r['mean_ms']:.3f}) prefill {r['prefill_ms'] / 1000:.2f} s hit {hit} "
            f"sites {r['decode_sites_rewritten']} causal-prefill {r['prefill_sites_causal']} "
            f"recompiles {r['recompiles_in_timed_call']} "
            f"cg-rec {r['cudagraph_recordings_in_timed_call']} cg-skips "
            f"{r['cudagraph_skips_total']} equal {r['tokens_equal_unmodified']}"
            + _divergence_text(r.get("first_divergence")))


def _divergence_text(d: dict | None) -> str:
    if not d:
        return ""
    return (f" (first differs at step {d['step']}, row {d['row']}: margin {d['margin']:.4f}, "
            f"logit diff {d['logit_diff']:.4f})")


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    import transformers
    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "transformers": transformers.__version__,
            "compiled_causal_prefill": under_inductor(),
            "args": {k: v for k, v in vars(args).items() if k != "func"}}


def summary(records: list[dict]) -> list[str]:
    """Per (batch, context): each method's ms/token and its ratio to exact and unmodified."""
    rows = ["| batch | context | method | ms/token | vs exact | vs unmodified | hit rate |",
            "|---|---|---|---|---|---|---|"]
    by_point: dict[tuple[int, int], dict[str, dict]] = {}
    for r in records:
        by_point.setdefault((r["batch"], r["context"]), {})[r["method"]] = r
    for (batch, context), point in sorted(by_point.items()):
        exact, plain = point.get("exact"), point.get("unmodified")
        for label, r in point.items():
            hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.2f}"
            rows.append(f"| {batch} | {context} | {label} | {r['median_ms']:.3f} | "
                        f"{_speedup(exact, r)} | {_speedup(plain, r)} | {hit} |")
    return rows


def _speedup(reference: dict | None, record: dict) -> str:
    return f"{reference['median_ms'] / record['median_ms']:.2f}x" if reference else "-"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate", help="decode speed through model.generate() after macopt.optimize (GPU)",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", type=lambda s: tuple(s.split(",")), default=DEFAULT_METHODS,
                        help="unmodified, exact, mac:all (forced hits), mac:TAU (mac:1: no "
                             "hit), topk_phi:BUDGET; default " + ",".join(DEFAULT_METHODS))
    parser.add_argument("--contexts", type=parse_sizes, default=(8192, 131072))
    parser.add_argument("--batches", type=parse_sizes, default=(1, 2))
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--layers", type=int, default=8,
                        help="Llama-3.1-8B-shaped layers (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--prefill-chunk", type=int, default=0,
                        help="prefill the prompt in chunks of this many tokens (transformers' "
                             "prefill_chunk_size; 0: one forward), for prompts whose one-shot "
                             "prefill does not fit the card, e.g. 128K at batch 2 on 80 GB; "
                             "the decode steps timed are the same")
    parser.add_argument("--warmup-chunks", type=int, default=0,
                        help="with --prefill-chunk: the untimed call (compile, CUDA-graph "
                             "recording) prefills only the prompt's first K chunks into a "
                             "static cache sized as the timed call's (0: the whole prompt). "
                             "The timed call is unchanged; the token comparison with the "
                             "unmodified model is then over those chunks. Saves a long prefill "
                             "per method (107 s at 128K, batch 2 on an H100)")
    parser.add_argument("--profile-kernels", action="store_true",
                        help="also record each decode step's kernels (one more profiled call)")
    parser.set_defaults(func=_main)
    return parser


def _main(args: argparse.Namespace) -> int:
    records = run(args)
    print("\n".join(summary(records)))
    return 0
