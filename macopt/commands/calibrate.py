"""``macopt calibrate MODEL --method topk_phi|mac --text FILE...``: fit a method to one model.

``topk_phi`` distils the feature maps phi from the frozen model's own attention on the text
(:mod:`macopt.calibrate_phi`) and writes them next to the model (``macopt_phi.safetensors``);
interrupted runs resume from the checkpoint file (``--checkpoint``, default: the output path +
``.ckpt``).

``mac`` chooses MAC's threshold tau (per layer by default; with ``--offsets``, each layer's
offset S too) for a target quality loss (:mod:`macopt.calibrate_mac`: the method, step by
step): the fewest keys read whose decode steps' expected perplexity increase,
``exp(KL(exact || MAC)) - 1``, stays within ``--target`` (default 0.005) on the text. It
writes a config file (default ``MODEL/mac_calibrated.json``) that ``macopt patch --config``
and ``macopt eval --methods mac:FILE`` read. Calibrate on text like the model's training text
and *not* on the text you evaluate on.

MODEL is a local directory with weights and a tokenizer (default: the tiny model of the source
checkout, ``examples/tiny-lm``); nothing downloads. ``--text`` takes files (``.gz`` too) or
directories (their ``.py``/``.txt``/``.md``/``.gz`` files).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from macopt.bench.decode import DTYPES

METHODS = ("topk_phi", "mac")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from macopt.calibrate_mac import MACCalibration
    from macopt.calibrate_phi import INITS, CalibrationConfig
    from macopt.config import MACConfig, TopKPhiConfig

    defaults, mac = CalibrationConfig(), MACCalibration()
    parser = subparsers.add_parser("calibrate", help="fit a method to a model (phi maps, MAC "
                                   "threshold)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, nargs="?", default=None,
                        help="local model directory (weights + tokenizer; default: the tiny "
                        "model)")
    parser.add_argument("--method", choices=METHODS, default="topk_phi")
    parser.add_argument("--text", type=Path, nargs="+", required=True,
                        help="calibration text files or directories")
    parser.add_argument("--out", type=Path, default=None,
                        help="output file (default MODEL/macopt_phi.safetensors or "
                        "MODEL/mac_calibrated.json)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an existing output file (default: refuse)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default bfloat16 (mac on CPU: float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    phi = parser.add_argument_group("topk_phi")
    phi.add_argument("--checkpoint", type=Path, default=None,
                     help="resumable state (default OUT.ckpt)")
    phi.add_argument("--seq-len", type=int, default=None,
                     help="tokens per sequence (default: the model's context, at most 8192: "
                     "maps fitted on shorter sequences than a cache holds can fail there)")
    phi.add_argument("--sequences", type=int, default=4,
                     help="sequences to capture (mac: calibration windows)")
    phi.add_argument("--init", choices=INITS, default=defaults.init,
                     help="probe: centred probe features measured on the text (default); prf: "
                     "data-free positive random features")
    phi.add_argument("--margin", type=float, default=defaults.margin,
                     help="probe init: standard deviations of the calibration log-mass error "
                     f"kept under its mean (default {defaults.margin:g})")
    phi.add_argument("--steps", type=int, default=defaults.steps,
                     help="gradient steps of the paper's loss after the init (default "
                     f"{defaults.steps}: the probe init alone)")
    phi.add_argument("--queries", type=int, default=defaults.queries_per_step,
                     help="query positions per step and layer")
    phi.add_argument("--d-phi", type=int, default=None, help="features (default head dim)")
    phi.add_argument("--lr", type=float, default=defaults.lr)
    phi.add_argument("--sinks", type=int, default=defaults.sinks)
    phi.add_argument("--tail", type=int, default=defaults.tail)
    phi.add_argument("--switch-budget", type=_budget_arg, default=TopKPhiConfig().budget,
                     help="the budget (tokens, or a fraction of the sequence) at which each "
                     "head's completion is kept only where it lowers the output error against "
                     "Top-K alone, recorded in the file (macopt.phi_switch; default "
                     f"{TopKPhiConfig().budget:g}); 0: no switch, every head completes")
    group = parser.add_argument_group("mac")
    group.add_argument("--target", type=float, default=mac.target,
                       help=f"largest decode-step perplexity increase (default {mac.target})")
    group.add_argument("--prefill", type=int, default=None,
                       help="prompt tokens per window (default: the model's context minus "
                       "the decode steps, at most 8192)")
    group.add_argument("--decode", type=int, default=mac.decode,
                       help=f"teacher-forced decode steps per window (default {mac.decode})")
    group.add_argument("--families", default=",".join(mac.families),
                       help="per_layer and/or global (comma-separated)")
    group.add_argument("--shares", default=",".join(f"{x:g}" for x in mac.shares),
                       help="hit shares whose radii are tried per layer (comma-separated, "
                       "in (0, 1)); a finer grid gives the allocation more choices")
    group.add_argument("--t-min", type=int, default=MACConfig().t_min)
    group.add_argument("--ring-size", type=int, default=MACConfig().ring_size)
    group.add_argument("--offset", type=int, default=MACConfig().offset,
                       help="offset S (the most recent keys a hit recomputes; the global "
                       "family's, and the per-layer one when --offsets is not given)")
    group.add_argument("--offsets", default=None,
                       help="offsets S tried per layer with each share (comma-separated ints "
                       ">= 0, e.g. 128,256,1024; default: --offset alone)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from macopt.evaluation.text import default_model

    console = Console()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.model = args.model or default_model()
        args.out = output_path(args)
        out = (calibrate_mac if args.method == "mac" else calibrate_topk_phi)(args, console)
    except (ValueError, OSError) as err:
        console.print(f"[red]macopt calibrate {args.model or ''}:[/red] {err}")
        return 2
    console.print(f"wrote {out}")
    return 0


def output_path(args: argparse.Namespace) -> Path:
    """Where the result goes; an existing file is an error without ``--force`` (the bundled
    model's calibrated file backs the README's numbers)."""
    from macopt.calibrate_mac import CALIBRATED_FILENAME
    from macopt.phi_files import PHI_FILENAME

    default = CALIBRATED_FILENAME if args.method == "mac" else PHI_FILENAME
    out = Path(args.out or Path(args.model) / default)
    if out.exists() and not args.force:
        raise ValueError(f"{out} already exists; pass --force to overwrite it or --out to "
                         "write elsewhere")
    return out


def load_sequences(tokenizer, text_paths: list[Path], seq_len: int, sequences: int
                   ) -> torch.Tensor:
    """The text's tokens cut into at most ``sequences`` rows of ``seq_len`` (a shorter text
    gives one shorter row)."""
    from macopt.evaluation.text import read_text

    ids = tokenizer(read_text(text_paths), return_tensors="pt")["input_ids"][0]
    if ids.numel() < seq_len:
        return ids[None]
    rows = min(sequences, ids.numel() // seq_len)
    return ids[: rows * seq_len].view(rows, seq_len)


def spread_windows(ids: torch.Tensor, length: int, count: int) -> list[torch.Tensor]:
    """``count`` windows of ``length`` tokens spread evenly over ``ids`` without overlap
    (fewer when the text is short; an error when not even one fits)."""
    fits = ids.numel() // length
    if fits == 0:
        raise ValueError(f"the calibration text has {ids.numel()} tokens; a window needs "
                         f"{length}: give more text or a shorter --prefill")
    count = min(count, fits)
    stride = ids.numel() // count
    return [ids[i * stride:i * stride + length] for i in range(count)]


def calibrate_mac(args: argparse.Namespace, console) -> Path:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from macopt.calibrate_mac import (
        MACCalibration,
        calibrate_mac,
        search_steps,
        write_result,
    )
    from macopt.config import MACConfig
    from macopt.evaluation.text import expand, read_text
    from macopt.model_source import load_causal_lm, load_tokenizer

    dtype = DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32)
    model = load_causal_lm(args.model, dtype=dtype).to(args.device)
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; calibration reads text")
    context = getattr(model.config.get_text_config(), "max_position_embeddings", 8192)
    prefill = args.prefill or min(context, 8192) - args.decode - 1
    base = MACConfig(ring_size=args.ring_size, offset=args.offset, t_min=args.t_min)
    offsets = None if args.offsets is None else tuple(int(x) for x in args.offsets.split(","))
    settings = MACCalibration(target=args.target, prefill=prefill, decode=args.decode,
                              families=tuple(f.strip() for f in args.families.split(",")),
                              shares=tuple(float(x) for x in args.shares.split(",")),
                              base=base, offsets=offsets)
    files = expand(args.text)
    ids = tokenizer(read_text(files), return_tensors="pt")["input_ids"][0]
    windows = spread_windows(ids, prefill + args.decode + 1, args.sequences)
    layers = model.config.get_text_config().num_hidden_layers
    console.print(f"[bold]{args.model}[/bold]: MAC calibration on {len(windows)} windows of "
                  f"{prefill} + {args.decode} tokens from {len(files)} files ({ids.numel()} "
                  f"tokens), {args.device}, {str(dtype).removeprefix('torch.')}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("calibrating", total=len(windows) + search_steps(settings,
                                                                                   layers))

        def tick(what: str) -> None:
            progress.update(bar, advance=1, description=what)
            progress.console.print(what)

        result = calibrate_mac(model, windows, settings, progress=tick)
        progress.update(bar, completed=progress.tasks[0].total)
    out = args.out
    write_result(result, out, model=str(args.model), text=[str(f) for f in files],
                 text_tokens=int(ids.numel()), device=str(args.device),
                 dtype=str(dtype).removeprefix("torch."))
    chosen = result.to_json()["calibration"]["chosen"]
    if chosen is None:
        console.print(f"[yellow]no setting met the target {args.target}: wrote tau = 1.0 "
                      "(never match)[/yellow]")
    else:
        console.print(json.dumps({k: chosen[k] for k in ("kind", "taus", "offsets",
                                                         "expected_ppl_ratio", "ppl_ratio",
                                                         "hit_rate", "read_fraction")},
                                 indent=1))
    return out


def calibrate_topk_phi(args: argparse.Namespace, console) -> Path:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from macopt.calibrate_phi import (
        CalibrationConfig,
        calibrate_feature_maps,
        capture_attention,
    )
    from macopt.kernels.feature_maps import save_feature_maps
    from macopt.phi_files import CALIBRATED_TOKENS

    out = args.out
    checkpoint = args.checkpoint or out.with_name(out.name + ".ckpt")
    config = CalibrationConfig(d_phi=args.d_phi, sinks=args.sinks, tail=args.tail,
                               steps=args.steps, queries_per_step=args.queries, lr=args.lr,
                               init=args.init, margin=args.margin,
                               seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model,
                                                 dtype=DTYPES[args.dtype or "bfloat16"],
                                                 local_files_only=True)
    model = model.to(args.device).eval().requires_grad_(False)
    # On SmolLM2, maps from 2K sequences gave exp(KL) 76-91 at 8K (docs/REAL_MODEL.md).
    context = getattr(model.config.get_text_config(), "max_position_embeddings", 8192)
    tokens = load_sequences(tokenizer, args.text, args.seq_len or min(context, 8192),
                            args.sequences)
    console.print(f"capturing attention on {tokens.shape[0]} x {tokens.shape[1]} tokens")
    provenance = {CALIBRATED_TOKENS: str(tokens.shape[1])}
    switching = args.switch_budget != 0
    captured = capture_attention(model, tokens, values=switching)  # values: the switch's errors
    del model  # the captured queries and keys are all training needs
    if config.steps == 0:  # the default: the init is the result, there is nothing to train
        maps, _ = calibrate_feature_maps(captured, config, checkpoint)
        console.print(f"{config.init} init of {len(maps)} layers, no gradient steps "
                      "(--steps N trains from it)")
        save_feature_maps({name: m.cpu() for name, m in maps.items()}, out, provenance)
        if switching:
            _record_switch(captured, out, args, console)
        return out
    columns = (TextColumn("calibrating phi"), BarColumn(), TextColumn("{task.completed}/"
               "{task.total}"), TextColumn("loss {task.fields[loss]:.4f}"),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("phi", total=config.steps, loss=float("nan"))
        maps, history = calibrate_feature_maps(
            captured, config, checkpoint,
            on_step=lambda step, loss: progress.update(task, completed=step + 1, loss=loss))
        progress.update(task, completed=config.steps,
                        loss=history[-1] if history else float("nan"))
    save_feature_maps({name: m.cpu() for name, m in maps.items()}, out, provenance)
    if switching:
        _record_switch(captured, out, args, console)
    return out


def _budget_arg(text: str) -> int | float:
    """``--switch-budget``: tokens (an int) or a fraction in (0, 1]; 0 turns the switch off."""
    value = int(text) if text.isdigit() else float(text)
    if value < 0 or (isinstance(value, float) and value > 1):
        raise argparse.ArgumentTypeError(f"expected tokens or a fraction in (0, 1], got {text}")
    return value


def _record_switch(captured, out: Path, args: argparse.Namespace, console) -> None:
    """Decide and record per head whether the completion helps (macopt.phi_switch)."""
    from macopt.config import TopKPhiConfig
    from macopt.phi_switch import decide_switch, write_switch

    config = TopKPhiConfig(budget=args.switch_budget, sinks=args.sinks, tail=args.tail)
    switch = decide_switch(captured, out, config)
    write_switch(out, switch, args.switch_budget)
    on = sum(sum(flags) for flags in switch.values())
    total = sum(len(flags) for flags in switch.values())
    console.print(f"completion kept on {on} of {total} query heads (where it lowered the output "
                  f"error against Top-K alone at budget {args.switch_budget:g}, "
                  f"{config.selector} selection)")
