"""``macopt eval [MODEL]``: methods side by side on one causal LM, with what they cost.

MODEL is a local directory (weights and tokenizer; a config only: random weights) or a
transformers model type built with random weights (as ``macopt generate``); without MODEL, the
tiny trained model of the source checkout (``examples/tiny-lm``). Without a tokenizer, text is
byte-level (each UTF-8 byte a token id). ``--methods`` lists the methods: ``exact``, ``mac``,
``mac:TAU``, ``mac:FILE.json`` or ``mac:calibrated`` (``MODEL/mac_calibrated.json``, written by
``macopt calibrate --method mac``), ``topk:BUDGET`` (Top-K only), ``topk_phi:BUDGET``
(a budget is a token count or a fraction of the cache) and ``mac_topk_phi:BUDGET[:MAC]`` (MAC
whose misses use Top-K + phi of that budget; ``MAC`` as after ``mac:``, e.g.
``mac_topk_phi:0.02:calibrated``); the unmodified model always runs first and is the
reference. Each method runs eagerly on a fresh copy of the model.

Measures (see :mod:`macopt.evaluation.harness`): held-out perplexity on ``--text`` in chunks of
``--context`` tokens whose last ``--ppl-decode`` tokens are decode steps (the decode steps'
perplexity is the one methods change); passkey and multi-key retrieval over the same text at
``--lengths`` x ``--depths`` (seeded; ``--needles code`` for models of source code, ``chat``,
the default for a model with a chat template, asks through the template); top-1
agreement with the unmodified model's greedy generation (teacher-forced), first divergence and
max logit error; hit rate and keys read per decode step past ``t_min`` vs full attention; for
Top-K (+ phi), the attention-output error per layer and head, and (``topk:B`` beside
``topk_phi:B``) the Top-K bar on the heads of above-median attention entropy. Top-K + phi
methods use the feature maps of ``--phi`` (default ``MODEL/macopt_phi.safetensors`` when
present). ``--json`` writes everything, ``--plot`` an SVG of quality against keys read.

``--text`` defaults to the model directory's ``heldout.txt.gz`` when it has one (the tiny
model does), else to the Python sources of the standard library's ``email`` package.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_CONTEXT = 1024
DEFAULT_METHODS = "exact,mac:calibrated,mac:0.45,mac:0.3,topk:0.02,topk_phi:0.02,topk_phi:0.1"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="quality of methods side by side (perplexity, "
                                   "retrieval, agreement, keys read)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None,
                        help="model directory or model type (default: examples/tiny-lm)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated methods (default {DEFAULT_METHODS}; "
                        "mac:calibrated only where the model has the file)")
    parser.add_argument("--context", type=int, default=None,
                        help="perplexity chunk and agreement prompt length in tokens "
                        f"(default: enough for every decode step to lie past the MAC "
                        f"methods' t_min, at least {MIN_CONTEXT})")
    parser.add_argument("--ppl-chunks", type=int, default=4)
    parser.add_argument("--ppl-decode", type=int, default=64,
                        help="tokens at each chunk's end scored as decode steps")
    parser.add_argument("--lengths", type=_ints, default=None,
                        help="task prompt lengths in tokens, comma-separated; \"\" runs no "
                        "retrieval task (default: the "
                        "context)")
    parser.add_argument("--depths", type=_floats, default=[0.1, 0.5, 0.9],
                        help="needle depths in [0, 1], comma-separated")
    parser.add_argument("--kinds", default="passkey,multikey", help="task kinds")
    parser.add_argument("--needles", choices=("prose", "code", "chat"), default=None,
                        help="needle style (default: code for the tiny model, chat for a "
                        "model directory with a chat template, else prose)")
    parser.add_argument("--samples", type=int, default=1, help="tasks per (kind, length, depth)")
    parser.add_argument("--agreement-steps", type=int, default=64)
    parser.add_argument("--topk-queries", type=int, default=16,
                        help="decode queries per layer for the Top-K output error")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", type=Path, nargs="+",
                        help="held-out text files or directories (.gz too)")
    parser.add_argument("--phi", default=None,
                        help="feature maps (`macopt calibrate --method topk_phi`) for every "
                        "topk_phi / mac_topk_phi method; default MODEL/macopt_phi.safetensors "
                        "when present, 'none': seeded random features")
    parser.add_argument("--json", type=Path, help="write the full results here")
    parser.add_argument("--plot", type=Path, help="write an SVG of quality vs keys read here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--layers", type=int, default=2,
                        help="layers of a random model built from a config (default 2)")
    parser.set_defaults(func=run)


def _ints(value: str) -> list[int]:
    return [int(x) for x in value.split(",") if x.strip()]


def _floats(value: str) -> list[float]:
    return [float(x) for x in value.split(",") if x.strip()]


def default_text_files() -> list[Path]:
    from macopt.evaluation.text import stdlib_text_files

    return stdlib_text_files()


def mac_t_min(method: object) -> int | None:
    """The largest ``t_min`` of a method's MAC parts (config and per-layer overrides); None
    for a method without MAC."""
    from macopt.config import MACConfig, MACTopKPhiConfig

    configs = [method.config, *(method.overrides or {}).values()]
    macs = [c.mac if isinstance(c, MACTopKPhiConfig) else c for c in configs]
    t_mins = [c.t_min for c in macs if isinstance(c, MACConfig)]
    return max(t_mins) if t_mins else None


def default_context(methods: list, ppl_decode: int) -> int:
    """A context whose scored decode steps all lie past every MAC method's ``t_min`` (before
    it MAC never matches, so its rows would only repeat exact attention's)."""
    t_mins = [t for t in map(mac_t_min, methods) if t is not None]
    return max([MIN_CONTEXT] + [t + ppl_decode for t in t_mins])


def short_context_warnings(methods: list, context: int, ppl_decode: int,
                           lengths: list[int]) -> list[str]:
    """One line per MAC method that the chosen lengths leave before its ``t_min``."""
    warnings = []
    for method in methods:
        t_min = mac_t_min(method)
        if t_min is None:
            continue
        if context - ppl_decode < t_min:
            warnings.append(f"{method.name}: t_min {t_min} > {context - ppl_decode}, where the "
                            f"decode steps of --context {context} start: MAC never matches "
                            "there (hit rate '-', keys read 1.00x); raise --context to at "
                            f"least {t_min + ppl_decode}")
        short = [n for n in lengths if n < t_min]
        if short:
            warnings.append(f"{method.name}: task --lengths {short} are below t_min {t_min}: "
                            "MAC never matches in those tasks")
    return warnings


def resolve_phi(phi: str | None, model: str) -> Path | None:
    """The feature-map file for Top-K + phi methods (see ``--phi``)."""
    from macopt.phi_files import PHI_FILENAME

    if phi == "none":
        return None
    if phi is not None:
        if not Path(phi).is_file():
            raise ValueError(f"--phi: no file {phi}")
        return Path(phi)
    default = Path(model) / PHI_FILENAME
    return default if default.is_file() else None


def has_chat_template(model_dir: str | Path) -> bool:
    """Whether a saved tokenizer carries a chat template (its own file or its config's)."""
    path = Path(model_dir)
    if (path / "chat_template.jinja").is_file():
        return True
    config = path / "tokenizer_config.json"
    return config.is_file() and "chat_template" in json.loads(config.read_text())


def resolve(args: argparse.Namespace) -> tuple[str, list[Path], str, str]:
    """(model, text files, methods, needle style) with the defaults filled in."""
    from macopt.calibrate_mac import CALIBRATED_FILENAME
    from macopt.evaluation.text import default_model, held_out_file, tiny_model_dir

    model = args.model or str(default_model())
    is_dir = Path(model).is_dir()
    files = args.text or ([held_out_file(model)] if is_dir and held_out_file(model)
                          else default_text_files())
    methods = args.methods
    if methods is None:
        has_calibration = is_dir and (Path(model) / CALIBRATED_FILENAME).is_file()
        methods = DEFAULT_METHODS if has_calibration else DEFAULT_METHODS.replace(
            "mac:calibrated,", "")
    tiny = is_dir and Path(model).resolve() == tiny_model_dir()
    needles = args.needles or ("code" if tiny else "chat" if is_dir and has_chat_template(
        model) else "prose")
    return model, list(files), methods, needles


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from macopt.evaluation import report
    from macopt.evaluation.harness import evaluate, parse_methods, work_units
    from macopt.evaluation.text import read_text
    from macopt.model_source import load_causal_lm, load_tokenizer

    out = out or sys.stdout
    console = Console(file=out, width=None if out.isatty() else 160)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model_name, files, spec, needles = resolve(args)
        phi = resolve_phi(args.phi, model_name)
        methods = parse_methods(spec, model_name if Path(model_name).is_dir() else None, phi)
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        context = args.context or default_context(methods, args.ppl_decode)
        lengths = [context] if args.lengths is None else args.lengths  # "": no tasks
        text = read_text(files)
        dtype = _DTYPES[args.dtype] if args.dtype else (
            torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32)
        model = load_causal_lm(model_name, layers=args.layers, dtype=dtype).to(args.device)
        tokenizer = load_tokenizer(model_name)
        n_tasks = len(kinds) * len(lengths) * len(args.depths) * args.samples
        console.print(f"[bold]{model_name}[/bold]: {len(methods)} methods, context "
                      f"{context}, {n_tasks} tasks ({needles} needles), {args.device}, "
                      f"{str(dtype).removeprefix('torch.')}, eager")
        for warning in short_context_warnings(methods, context, args.ppl_decode, lengths):
            console.print(f"[yellow]warning: {warning}[/yellow]")
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            bar = progress.add_task("eval", total=work_units(
                methods, ppl_chunks=args.ppl_chunks, n_tasks=n_tasks))

            def tick(what: str) -> None:
                progress.update(bar, advance=1, description=what)
                if not out.isatty():  # a log: one line per step
                    progress.console.print(what)

            result = evaluate(model, tokenizer, methods, text=text, context=context,
                              ppl_chunks=args.ppl_chunks, ppl_decode=args.ppl_decode,
                              lengths=lengths, depths=args.depths, kinds=kinds,
                              samples=args.samples, agreement_steps=args.agreement_steps,
                              needles=needles, topk_queries=args.topk_queries,
                              seed=args.seed, progress=tick)
    except (ValueError, OSError) as err:
        console.print(f"[red]macopt eval {args.model or ''}:[/red] {err}")
        return 2
    result["settings"].update(model=str(model_name), text=[str(f) for f in files],
                              methods=spec, phi=None if phi is None else str(phi),
                              device=str(args.device),
                              dtype=str(dtype).removeprefix("torch."))
    result["bar"] = report.bar(result)
    result["topk_bar"] = report.topk_bar(result)
    console.print(report.table(result, title=f"macopt eval {model_name}"))
    if result["bar"]:
        console.print(report.bar_table(result))
    if result["topk_bar"]:
        console.print(report.topk_bar_table(result))
    errors = report.topk_error_table(result)
    if errors is not None:
        console.print(errors)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
        console.print(f"wrote {args.json}")
    if args.plot is not None:
        args.plot.write_text(report.quality_chart(result))
        console.print(f"wrote {args.plot}")
    return 0
