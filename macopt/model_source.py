"""Where the command line gets a model: a local directory, or a config name with random weights.

Nothing downloads. ``MODEL`` is either a local directory (``config.json``, and usually weights
and a tokenizer) or a transformers model type (``llama``, ``qwen3``, ...), built from its
default config with random weights and shrunk to a few layers (head dims, head counts and
RoPE are kept: they are what macopt's passes look at).

>>> from macopt.model_source import load_causal_lm
>>> model = load_causal_lm("llama", layers=1)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SMALL_MLP = 256
SMALL_VOCAB = 1024
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def has_weights(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding model weights (not just a ``config.json``)."""
    path = Path(path)
    return path.is_dir() and any(p.suffix in _WEIGHT_SUFFIXES and "model" in p.name
                                 for p in path.iterdir())


def load_causal_lm(
    name: str | Path,
    *,
    layers: int = 2,
    random_weights: bool = False,
    **hf_kwargs: Any,
) -> torch.nn.Module:
    """A causal LM in eval mode: the weights of a local directory when it has them, otherwise
    random weights from its config (or from the model type ``name``), shrunk to ``layers``.

    ``hf_kwargs`` (``dtype``, ``device_map``, ...) go to ``from_pretrained`` for weights; a
    random model takes ``dtype`` only. ``random_weights`` ignores weights a directory has.
    """
    if has_weights(name) and not random_weights:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(name, local_files_only=True,
                                                    **hf_kwargs).eval()
    model = build_random_model(str(name), layers)
    dtype = hf_kwargs.get("dtype")
    return model.to(dtype) if dtype is not None else model


def build_random_model(name: str, layers: int) -> torch.nn.Module:
    """A causal LM with random weights from a local config or a model type, shrunk."""
    from transformers import AutoModelForCausalLM

    config = load_config(name)
    shrink(config.get_text_config(), layers)
    torch.manual_seed(0)
    try:
        return AutoModelForCausalLM.from_config(config).eval()
    except ValueError as err:
        raise ValueError(f"{name!r} has no causal-LM class in transformers: {err}") from None


def load_config(name: str | Path) -> Any:
    """The transformers config of a local directory or of a model type (its defaults)."""
    from transformers import AutoConfig

    if Path(name).is_dir():
        return AutoConfig.from_pretrained(name, local_files_only=True)
    try:
        return AutoConfig.for_model(str(name))
    except ValueError:
        # One line: transformers' own message lists every model type it knows (12 KB).
        raise ValueError(f"{str(name)!r} is neither a local directory nor a transformers model "
                         "type (such as llama, qwen3, gpt2)") from None


def shrink(config: object, layers: int) -> None:
    """Few layers, a small MLP and vocabulary; attention shapes (what the passes see) kept."""
    heads = getattr(config, "num_attention_heads", None)
    if getattr(config, "head_dim", None) is None and heads and hasattr(config, "hidden_size"):
        config.head_dim = config.hidden_size // heads
    for attr, value in (("num_hidden_layers", layers), ("n_layer", layers),
                        ("intermediate_size", SMALL_MLP), ("vocab_size", SMALL_VOCAB)):
        if hasattr(config, attr):
            setattr(config, attr, value)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hasattr(config, attr):
            setattr(config, attr, 0)


def load_tokenizer(name: str | Path) -> Any | None:
    """The tokenizer saved in a local directory, or None (random models have none)."""
    path = Path(name)
    if not path.is_dir() or not any(p.name.startswith("tokenizer") for p in path.iterdir()):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)
