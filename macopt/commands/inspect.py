"""``macopt inspect MODEL``: a table of a model's attention sites and what macopt does there.

MODEL is a local directory with a ``config.json`` or a transformers model type (``llama``,
``qwen3``, ...). Nothing downloads: the model is built from its config with random weights,
shrunk to a few layers (head dims, head counts and RoPE are kept), optimized, and one decode
step is traced with a static cache on CPU through the ``macopt_eager`` backend (the passes
without Inductor's code generation).
"""

from __future__ import annotations

import argparse

import torch

from macopt._hf_compat import cache_kwargs, returned_cache
from macopt.config import MethodConfig, method_names
from macopt.model_source import build_random_model
from macopt.report import WIDE_COLUMNS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="table of attention sites (found/rewritten/why)",
                                   description=__doc__)
    parser.add_argument("model", help="local model directory, or a transformers model type")
    parser.add_argument("--method", default="exact",
                        help=f"method, default settings: {', '.join(method_names())} "
                        "(default exact)")
    parser.add_argument("--layers", type=int, default=2, help="layers to build (default 2)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    import macopt

    console = Console()
    try:
        model = build_random_model(args.model, args.layers)
        config = macopt.MethodConfig.from_dict({"method": args.method})
        macopt.optimize(model, config)
        trace_decode_step(model, config)
        explanation = macopt.explain(model)
    except ValueError as err:
        console.print(f"[red]macopt inspect {args.model}:[/red] {err}")
        return 2
    console.print(explanation.table(title=f"{args.model}: attention sites ({args.method})",
                                    compact=console.width < WIDE_COLUMNS))
    return 0


@torch.no_grad()
def trace_decode_step(model: torch.nn.Module, config: MethodConfig) -> None:
    """Prefill eagerly, then compile one decode step with the passes (no Inductor codegen).

    A model whose ``generate()`` compiles nothing (no static cache: MPT keeps its own tuple
    cache) has its forward compiled instead, on its own cache, so its sites are reported too.
    """
    from transformers import CompileConfig

    import macopt

    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(1, vocab, (1, 4))
    if not getattr(model, "_can_compile_fullgraph", False):
        _trace_on_own_cache(model, ids)
        return
    compile_config = CompileConfig(fullgraph=True, mode="default",
                                   backend=macopt.backend(inductor=False))
    compile_config._compile_all_devices = True  # transformers only auto-compiles on GPUs
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                   cache_implementation="static", compile_config=compile_config)


def _trace_on_own_cache(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """A prefill and one decode step through the forward compiled with the passes, on the
    cache the model returns."""
    import macopt

    forward = torch.compile(model.forward, backend=macopt.backend(inductor=False))
    out = forward(ids, use_cache=True)
    forward(ids[:, -1:], **cache_kwargs(model, returned_cache(out)), use_cache=True)
