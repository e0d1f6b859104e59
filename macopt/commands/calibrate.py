"""``macopt calibrate MODEL --method topk_phi --text FILE``: fit a method's learned parts.

``topk_phi`` distils the feature maps phi from the frozen model's own attention on the text
(:mod:`macopt.calibrate_phi`) and writes them next to the model (``macopt_phi.safetensors``).
MODEL is a local directory with weights and a tokenizer; nothing downloads. Interrupted runs
resume from the checkpoint file (``--checkpoint``, default: the output path + ``.ckpt``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from macopt.bench.decode import DTYPES

METHODS = ("topk_phi",)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from macopt.calibrate_phi import CalibrationConfig

    defaults = CalibrationConfig()
    parser = subparsers.add_parser("calibrate", help="fit a method's learned parts (phi maps)",
                                   description=__doc__)
    parser.add_argument("model", type=Path, help="local model directory (weights + tokenizer)")
    parser.add_argument("--method", choices=METHODS, default="topk_phi")
    parser.add_argument("--text", type=Path, required=True, help="calibration text file")
    parser.add_argument("--out", type=Path, default=None,
                        help="phi file (default MODEL/macopt_phi.safetensors)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="resumable state (default OUT.ckpt)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--sequences", type=int, default=4, help="sequences to capture")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--queries", type=int, default=defaults.queries_per_step,
                        help="query positions per step and layer")
    parser.add_argument("--d-phi", type=int, default=None, help="features (default head dim)")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--sinks", type=int, default=defaults.sinks)
    parser.add_argument("--tail", type=int, default=defaults.tail)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    try:
        out = calibrate_topk_phi(args, console)
    except (ValueError, OSError) as err:
        console.print(f"[red]macopt calibrate {args.model}:[/red] {err}")
        return 2
    console.print(f"wrote {out}")
    return 0


def load_sequences(tokenizer, text_path: Path, seq_len: int, sequences: int) -> torch.Tensor:
    """The text's tokens cut into at most ``sequences`` rows of ``seq_len`` (a shorter text
    gives one shorter row)."""
    ids = tokenizer(text_path.read_text(), return_tensors="pt")["input_ids"][0]
    if ids.numel() < seq_len:
        return ids[None]
    rows = min(sequences, ids.numel() // seq_len)
    return ids[: rows * seq_len].view(rows, seq_len)


def calibrate_topk_phi(args: argparse.Namespace, console) -> Path:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from macopt.calibrate_phi import (
        PHI_FILENAME,
        CalibrationConfig,
        calibrate_feature_maps,
        capture_attention,
    )
    from macopt.kernels.feature_maps import save_feature_maps

    out = args.out or args.model / PHI_FILENAME
    checkpoint = args.checkpoint or out.with_name(out.name + ".ckpt")
    config = CalibrationConfig(d_phi=args.d_phi, sinks=args.sinks, tail=args.tail,
                               steps=args.steps, queries_per_step=args.queries, lr=args.lr,
                               seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype],
                                                 local_files_only=True)
    model = model.to(args.device).eval().requires_grad_(False)
    tokens = load_sequences(tokenizer, args.text, args.seq_len, args.sequences)
    console.print(f"capturing attention on {tokens.shape[0]} x {tokens.shape[1]} tokens")
    captured = capture_attention(model, tokens)
    del model  # the captured queries and keys are all training needs
    columns = (TextColumn("calibrating phi"), BarColumn(), TextColumn("{task.completed}/"
               "{task.total}"), TextColumn("loss {task.fields[loss]:.4f}"),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("phi", total=config.steps, loss=float("nan"))
        maps, history = calibrate_feature_maps(
            captured, config, checkpoint,
            on_step=lambda step, loss: progress.update(task, completed=step + 1, loss=loss))
        progress.update(task, completed=config.steps, loss=history[-1])
    save_feature_maps({name: m.cpu() for name, m in maps.items()}, out)
    return out
