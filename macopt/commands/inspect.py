"""``macopt inspect MODEL``: a table of a model's attention sites and what macopt does there.

MODEL is a local directory with a ``config.json`` or a transformers model type (``llama``,
``qwen3``, ...). Nothing downloads: the model is built from its config with random weights,
shrunk to a few layers (head dims, head counts and RoPE are kept), optimized, and one decode
step is traced with a static cache on CPU through the ``macopt_eager`` backend (the passes
without Inductor's code generation).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

_SMALL_MLP = 256
_SMALL_VOCAB = 1024


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="table of attention sites (found/rewritten/why)",
                                   description=__doc__)
    parser.add_argument("model", help="local model directory, or a transformers model type")
    parser.add_argument("--method", default="exact", help="method config name (default exact)")
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
    console.print(explanation.table(title=f"{args.model}: attention sites ({args.method})"))
    return 0


def build_random_model(name: str, layers: int) -> torch.nn.Module:
    """A causal LM with random weights from a local config or a model type, shrunk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if Path(name).is_dir():
        config = AutoConfig.from_pretrained(name, local_files_only=True)
    else:
        try:
            config = AutoConfig.for_model(name)
        except ValueError as err:
            raise ValueError(f"{name!r} is neither a local directory nor a transformers model "
                             f"type ({err})") from None
    _shrink(config.get_text_config(), layers)
    torch.manual_seed(0)
    try:
        return AutoModelForCausalLM.from_config(config).eval()
    except ValueError as err:
        raise ValueError(f"{name!r} has no causal-LM class in transformers: {err}") from None


def _shrink(config: object, layers: int) -> None:
    """Few layers, a small MLP and vocabulary; attention shapes (what the table shows) kept."""
    heads = getattr(config, "num_attention_heads", None)
    if getattr(config, "head_dim", None) is None and heads and hasattr(config, "hidden_size"):
        config.head_dim = config.hidden_size // heads
    for attr, value in (("num_hidden_layers", layers), ("n_layer", layers),
                        ("intermediate_size", _SMALL_MLP), ("vocab_size", _SMALL_VOCAB)):
        if hasattr(config, attr):
            setattr(config, attr, value)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hasattr(config, attr):
            setattr(config, attr, 0)


@torch.no_grad()
def trace_decode_step(model: torch.nn.Module, config: object) -> None:
    """Prefill eagerly, then compile one decode step with the passes (no Inductor codegen)."""
    from transformers import CompileConfig

    import macopt

    compile_config = CompileConfig(fullgraph=True, mode="default",
                                   backend=macopt.backend(inductor=False))
    compile_config._compile_all_devices = True  # transformers only auto-compiles on GPUs
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(1, vocab, (1, 4))
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                   cache_implementation="static", compile_config=compile_config)
