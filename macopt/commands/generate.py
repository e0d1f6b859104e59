"""``macopt generate MODEL|DIR``: stream a greedy generation, then tokens/s and per-layer stats.

MODEL is a local directory (weights, or only a config: random weights), a directory written by
``macopt patch`` (loaded with its method config), or a transformers model type built with
random weights. ``--method`` (or ``--config CFG.json``) picks the method; a patched
directory's own config is the default. The decode step runs with a static cache; ``--compile``
compiles it (``fullgraph=True``; CUDA graphs on a GPU), which is where macopt rewrites it.

Prompts: ``--prompt TEXT`` or ``--prompt-file F`` go through the model's tokenizer. A model
without one (random configs) gets a byte-level tokenizer: each UTF-8 byte is its own token id
(the vocabulary must hold 256 ids). ``--prompt-ids 1,2,3`` gives token ids directly; without a
tokenizer the generated ids are printed as numbers.
"""

from __future__ import annotations

import argparse
import codecs
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from macopt.config import MethodConfig, method_names
from macopt.model_source import load_causal_lm, load_tokenizer
from macopt.pretrained import PATCH_FILE, parse_config_file, read_patch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="stream a generation; tokens/s, layer stats",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model directory, patched directory, or model type")
    method = parser.add_mutually_exclusive_group()
    method.add_argument("--method",
                        help=f"method, default settings: {', '.join(method_names())}")
    method.add_argument("--config", type=Path, help="method config JSON file")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-file", type=Path, help="file holding the prompt text")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="compile the decode step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--layers", type=int, default=2,
                        help="layers of a random model built from a config (default 2)")
    parser.set_defaults(func=run)


@dataclass
class GenerationResult:
    """Generated ids (prompt excluded) and when each arrived (seconds after the call)."""

    tokens: list[int]
    arrivals: list[float]

    @property
    def prefill_s(self) -> float:
        """Time to the first token (the prefill)."""
        return self.arrivals[0] if self.arrivals else float("nan")

    @property
    def first_decode_s(self) -> float:
        """The first decode step: with ``--compile`` it includes compilation."""
        return self.arrivals[1] - self.arrivals[0] if len(self.arrivals) > 1 else float("nan")

    @property
    def tokens_per_s(self) -> float:
        """Steady decode throughput: 1 / median time between tokens after the first decode
        step (which compiles), or over every step when there are too few."""
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]
        steady = gaps[1:] or gaps
        return 1.0 / statistics.median(steady) if steady else float("nan")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from rich.console import Console

    out = out or sys.stdout
    console = Console(file=out, width=None if out.isatty() else 160)
    try:
        model, config = load_optimized(args)
        tokenizer = load_tokenizer(args.model)
        ids = prompt_ids(args, tokenizer, model.config.get_text_config().vocab_size)
        console.print(f"[bold]{args.model}[/bold] method {config.method}, {args.device}, "
                      f"{'compiled' if args.compile else 'eager'}")
        printer = TokenPrinter(tokenizer, as_ids=args.prompt_ids is not None, out=out)
        result = generate(model, ids.to(args.device), args.max_new_tokens, args.compile, printer)
    except (ValueError, OSError) as err:
        console.print(f"[red]macopt generate {args.model}:[/red] {err}")
        return 2
    console.print(f"{len(result.tokens)} tokens: prefill {result.prefill_s * 1e3:.1f} ms, first "
                  f"decode step {result.first_decode_s * 1e3:.1f} ms"
                  f"{' (compiles)' if args.compile else ''}, then "
                  f"{result.tokens_per_s:.1f} tokens/s")
    print_layer_report(model, console)
    return 0


def load_optimized(args: argparse.Namespace) -> tuple[torch.nn.Module, MethodConfig]:
    """The model, optimized with the chosen config, on ``args.device`` in ``args.dtype``."""
    import macopt

    dtype = _DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32)
    patched = Path(args.model, PATCH_FILE).is_file()
    patch = read_patch(args.model) if patched else None
    if args.config is not None:
        config, overrides = parse_config_file(args.config)
    elif args.method is not None:
        config, overrides = MethodConfig.from_dict({"method": args.method}), {}
    elif patch is not None:
        config, overrides = patch.config, patch.overrides
    else:
        config, overrides = MethodConfig.from_dict({"method": "exact"}), {}
    model = load_causal_lm(args.model, layers=args.layers, dtype=dtype).to(args.device)
    macopt.optimize(model, config, overrides=overrides)
    return model, config


def prompt_ids(args: argparse.Namespace, tokenizer: Any | None, vocab_size: int) -> torch.Tensor:
    """``[1, n]`` token ids of the prompt (tokenizer, byte-level, or given directly)."""
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--prompt-ids: expected comma-separated integers, got "
                             f"{args.prompt_ids!r}") from None
    else:
        text = args.prompt if args.prompt is not None else args.prompt_file.read_text()
        if tokenizer is not None:
            ids = tokenizer(text)["input_ids"]
        elif vocab_size < 256:
            raise ValueError(f"the model has no tokenizer and a vocabulary of {vocab_size} ids, "
                             "too small for byte-level tokens; pass --prompt-ids instead")
        else:
            ids = list(text.encode("utf-8"))
    if not ids or not all(0 <= i < vocab_size for i in ids):
        raise ValueError(f"prompt: expected 1+ token ids in [0, {vocab_size}), got {ids[:16]}")
    return torch.tensor([ids])


@torch.no_grad()
def generate(model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int, compile: bool,
             printer: TokenPrinter) -> GenerationResult:
    """Greedy generation with a static cache, streamed to ``printer``, timed."""
    from macopt._hf_compat import compile_config
    from macopt.passes._compat import inductor_config

    mode = "reduce-overhead" if ids.is_cuda else "default"
    printer.start = time.perf_counter()
    # A graph from Inductor's FX graph cache reruns no pass, so the per-layer report would be
    # empty on every run after the first: compile afresh (this command is for looking).
    with inductor_config.patch(fx_graph_cache=False):
        # use_cache: a model's generation_config may turn the cache off, and then no step is
        # a decode step (nothing of macopt's decode path runs, the tokens/s would mislead).
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, cache_implementation="static",
                             use_cache=True,
                             streamer=printer, compile_config=compile_config(mode=mode),
                             disable_compile=not compile)
    return GenerationResult(out[0, ids.shape[1]:].tolist(), printer.arrivals)


def print_layer_report(model: torch.nn.Module, console: Any) -> None:
    """macopt's per-layer report: what the passes did (explain) and, for stateful methods,
    what the method did (stats)."""
    import macopt

    try:
        console.print(macopt.explain(model).table(title="macopt: attention sites"))
    except ValueError:
        console.print("per-layer report: no graph went through macopt's passes (an eager run "
                      "of a stateless method takes the unmodified path); pass --compile.")
    stats = macopt.stats(model)
    if stats:
        console.print(stats.table(title="macopt: per-layer stats"))


class TokenPrinter:
    """A generate() streamer: prints each new token as it comes and notes when it came
    (seconds after ``start``). Text through the tokenizer, UTF-8 bytes without one, or ids
    (``as_ids``)."""

    def __init__(self, tokenizer: Any | None, as_ids: bool, out: TextIO):
        self.tokenizer, self.as_ids, self.out = tokenizer, as_ids, out
        self.start = time.perf_counter()
        self.arrivals: list[float] = []
        self._seen_prompt = False
        self._ids: list[int] = []
        self._printed = 0
        self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:  # generate() hands the prompt over first
            self._seen_prompt = True
            return
        # generate() moves each token to the host before put(): the time is the step's end.
        self.arrivals.append(time.perf_counter() - self.start)
        for token in value.flatten().tolist():
            self.out.write(self._text(token))
        self.out.flush()

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()

    def _text(self, token: int) -> str:
        if self.as_ids and self.tokenizer is None:
            return f"{token} "
        if self.tokenizer is not None:
            # Decode the whole generation and print what is new: a token may complete a word.
            self._ids.append(token)
            text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
            new, self._printed = text[self._printed:], len(text)
            return new
        if token >= 256 or (token < 32 and chr(token) not in "\n\t"):
            return f"<{token}>"  # not a printable byte
        return self._bytes.decode(bytes([token]))
