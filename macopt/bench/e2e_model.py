"""``macopt bench e2e --model DIR``: a trained local model decoding real text.

What changes against the synthetic model (:mod:`macopt.bench.e2e`): the weights are the
directory's (``from_pretrained``, bf16 on CUDA), the shape is its config's, and each point's
prompt is held-out text (``DIR/heldout.txt.gz``, else the standard library's ``email``
sources, as ``macopt eval`` reads), tokenized by the directory's tokenizer: row ``r`` of a
batch is tokens ``[r C, (r + 1) C)``. The whole prompt runs as one real prefill from position
0 (no seeded K/V prefix), so the rings, summaries and hit rates are what real text gives.
Contexts stay within the model's positions: ``C + warm-up + steps <= max_position_embeddings``.

``mac:calibrated`` is ``DIR/mac_calibrated.json`` (``macopt calibrate --method mac``): its
config and per-layer thresholds, as in ``macopt eval``. Defaults with ``--model``: the methods
:data:`DEFAULT_METHODS`, contexts :func:`default_contexts` (2K, 4K and 7936 for the 8K tiny
model), and a batch-1 prefill at the longest context for :data:`DEFAULT_PREFILL_METHODS`.

    macopt bench e2e --model examples/tiny-lm --json tiny_e2e.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DEFAULT_METHODS = ("unmodified", "exact", "mac:calibrated", "mac:0.45", "topk_phi:0.02")
DEFAULT_PREFILL_METHODS = ("unmodified", "exact", "mac:calibrated", "mac:0.45")
CACHE_ROUNDING = 256  # static caches are allocated in multiples of this many tokens
CHARS_PER_TOKEN = 6  # more than any tokenizer's mean: a text prefix this long is enough


def model_config(path: str | Path) -> Any:
    """The text config of a local model directory."""
    from macopt.model_source import load_config

    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"--model {path}: not a model directory (no config.json)")
    return load_config(path).get_text_config()


def default_contexts(max_positions: int, decode_steps: int) -> tuple[int, ...]:
    """The longest context that fits with the decode steps (a multiple of 256), and the two
    powers of two below it: 2K, 4K and 7936 for an 8K model."""
    longest = (max_positions - decode_steps) // CACHE_ROUNDING * CACHE_ROUNDING
    if longest < CACHE_ROUNDING:
        raise ValueError(f"the model has {max_positions} positions: too few to decode "
                         f"{decode_steps} steps after a prompt of {CACHE_ROUNDING} tokens")
    powers = [1 << n for n in range(10, longest.bit_length()) if (1 << n) < longest]
    return (*powers[-2:], longest)


def check_contexts(contexts: tuple[int, ...], max_positions: int, decode_steps: int) -> None:
    too_long = [c for c in contexts if c + decode_steps > max_positions]
    if too_long:
        raise ValueError(f"--contexts {too_long}: with {decode_steps} warm-up and timed steps "
                         f"they pass the model's {max_positions} positions")


def load_model(path: str | Path, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The directory's weights in ``dtype`` on ``device``, in eval mode."""
    from macopt.model_source import has_weights, load_causal_lm

    if not has_weights(path):
        raise ValueError(f"--model {path}: no weights in the directory")
    return load_causal_lm(path, dtype=dtype).to(device).eval()


class HeldOutText:
    """Token ids of real text for prompts, tokenized as far as asked (tokenizing a whole
    held-out file takes seconds)."""

    def __init__(self, model_dir: str | Path):
        from macopt.evaluation.text import held_out_file, read_text, stdlib_text_files
        from macopt.model_source import load_tokenizer

        self.tokenizer = load_tokenizer(model_dir)
        if self.tokenizer is None:
            raise ValueError(f"--model {model_dir}: no tokenizer in the directory")
        held_out = held_out_file(model_dir)
        self.source = str(held_out) if held_out is not None else "the stdlib email package"
        self.text = read_text([held_out] if held_out is not None else stdlib_text_files())
        self.ids: list[int] = []
        self.chars = 0

    def tokens(self, count: int) -> list[int]:
        """The first ``count`` token ids of the text."""
        while len(self.ids) < count and self.chars < len(self.text):
            self.chars = min(len(self.text), max(2 * self.chars, count * CHARS_PER_TOKEN))
            self.ids = self.tokenizer(self.text[: self.chars], add_special_tokens=False,
                                      verbose=False)["input_ids"]
        if len(self.ids) < count:
            raise ValueError(f"{self.source} holds {len(self.ids)} tokens; a prompt of "
                             f"{count} tokens (batch x context) needs more text")
        return self.ids[:count]

    def prompt(self, batch: int, context: int, device: str) -> torch.Tensor:
        """``[batch, context]`` ids: row ``r`` is tokens ``[r context, (r + 1) context)``."""
        ids = torch.tensor(self.tokens(batch * context), dtype=torch.long)
        return ids.view(batch, context).to(device)


def default_methods(model_dir: str | Path) -> tuple[str, ...]:
    """:data:`DEFAULT_METHODS`, less ``mac:calibrated`` where the model has no calibration."""
    from macopt.calibrate_mac import CALIBRATED_FILENAME

    if (Path(model_dir) / CALIBRATED_FILENAME).is_file():
        return DEFAULT_METHODS
    return tuple(m for m in DEFAULT_METHODS if m != "mac:calibrated")
