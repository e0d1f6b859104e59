"""``macopt eval MODEL``: methods side by side on one causal LM, with what they cost.

MODEL is a local directory (weights and tokenizer; a config only: random weights) or a
transformers model type built with random weights (as ``macopt generate``). Without a
tokenizer, text is byte-level (each UTF-8 byte a token id). ``--methods`` lists the methods:
``exact``, ``mac`` or ``mac:TAU``, ``topk_phi`` or ``topk_phi:BUDGET``; the unmodified model
always runs first and is the reference. Each method runs eagerly on a fresh copy of the model.

Measures (see :mod:`macopt.evaluation.harness`): held-out perplexity on ``--text`` in chunks of
``--context`` tokens whose last ``--ppl-decode`` tokens are decode steps; passkey and multi-key
retrieval accuracy over the same text at ``--lengths`` x ``--depths`` (seeded); top-1
agreement with the unmodified model's greedy generation (teacher-forced), first divergence
and max logit error; per-layer hit rate and keys read for stateful methods.

``--text`` defaults to the Python sources of the standard library's ``email`` package (real
text present everywhere); pass held-out files of the model's own domain instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="quality of methods side by side (perplexity, "
                                   "retrieval, agreement, stats)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model directory or model type")
    parser.add_argument("--methods", default="exact,mac:0.45,mac:0.3",
                        help="comma-separated methods (default exact,mac:0.45,mac:0.3)")
    parser.add_argument("--context", type=int, default=1024,
                        help="perplexity chunk and agreement prompt length in tokens")
    parser.add_argument("--ppl-chunks", type=int, default=4)
    parser.add_argument("--ppl-decode", type=int, default=64,
                        help="tokens at each chunk's end scored as decode steps")
    parser.add_argument("--lengths", type=_ints, default=[1024],
                        help="task prompt lengths in tokens, comma-separated")
    parser.add_argument("--depths", type=_floats, default=[0.1, 0.5, 0.9],
                        help="needle depths in [0, 1], comma-separated")
    parser.add_argument("--kinds", default="passkey,multikey", help="task kinds")
    parser.add_argument("--samples", type=int, default=1, help="tasks per (kind, length, depth)")
    parser.add_argument("--agreement-steps", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", type=Path, nargs="+", help="held-out text files")
    parser.add_argument("--json", type=Path, help="write the full results here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--layers", type=int, default=2,
                        help="layers of a random model built from a config (default 2)")
    parser.set_defaults(func=run)


def _ints(value: str) -> list[int]:
    return [int(x) for x in value.split(",") if x.strip()]


def _floats(value: str) -> list[float]:
    return [float(x) for x in value.split(",") if x.strip()]


def default_text_files() -> list[Path]:
    import email

    return sorted(Path(email.__file__).parent.glob("*.py"))


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from macopt.evaluation.harness import evaluate, parse_methods, table, work_units
    from macopt.model_source import load_causal_lm, load_tokenizer

    out = out or sys.stdout
    console = Console(file=out, width=None if out.isatty() else 160)
    try:
        methods = parse_methods(args.methods)
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        files = args.text or default_text_files()
        text = "\n".join(Path(f).read_text(errors="replace") for f in files)
        dtype = _DTYPES[args.dtype] if args.dtype else (
            torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32)
        model = load_causal_lm(args.model, layers=args.layers, dtype=dtype).to(args.device)
        tokenizer = load_tokenizer(args.model)
        n_tasks = len(kinds) * len(args.lengths) * len(args.depths) * args.samples
        console.print(f"[bold]{args.model}[/bold]: {len(methods)} methods, context "
                      f"{args.context}, {n_tasks} tasks, {args.device}, eager")
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            bar = progress.add_task("eval", total=work_units(
                len(methods), ppl_chunks=args.ppl_chunks, n_tasks=n_tasks))

            def tick(what: str) -> None:
                progress.update(bar, advance=1, description=what)

            result = evaluate(model, tokenizer, methods, text=text, context=args.context,
                              ppl_chunks=args.ppl_chunks, ppl_decode=args.ppl_decode,
                              lengths=args.lengths, depths=args.depths, kinds=kinds,
                              samples=args.samples, agreement_steps=args.agreement_steps,
                              seed=args.seed, progress=tick)
    except (ValueError, OSError) as err:
        console.print(f"[red]macopt eval {args.model}:[/red] {err}")
        return 2
    result["settings"].update(model=str(args.model), text=[str(f) for f in files],
                              device=str(args.device), dtype=str(dtype).removeprefix("torch."))
    console.print(table(result, title=f"macopt eval {args.model}"))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
        console.print(f"wrote {args.json}")
    return 0
