"""examples/train_tiny_lm.py end to end at toy scale on CPU: data split, tokenizer, training,
and an output directory that transformers loads."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_tiny_lm.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_tiny_lm", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY = (
    "--max-bytes 300000 --heldout-bytes 40000 --vocab-size 512 --hidden-size 64"
    " --intermediate-size 128 --layers 2 --heads 4 --kv-heads 2 --head-dim 64 --seq-len 128"
    " --short-seq-len 64 --batch-size 8 --max-steps 10 --warmup-steps 2 --lr 3e-3"
    " --eval-every 5 --log-every 2 --device cpu --seed 0"
).split()


def test_train_tiny_lm_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    out = tmp_path / "tiny"
    result = _load_script().main([*TINY, "--out", str(out)])
    assert result["result"]["steps"] == 10

    # the output loads with transformers and runs
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.bfloat16
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 64)
    assert cfg.max_position_embeddings >= 8192
    text = "def add(a, b):\n    return a + b\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == text
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()

    # held-out files are disjoint from training files, and both are non-empty
    train = set((out / "train_files.txt").read_text().split())
    heldout = set((out / "heldout_files.txt").read_text().split())
    assert train and heldout and not train & heldout
    assert all(name.endswith(".py") for name in train | heldout)

    # the loss went down: training log and held-out evaluations
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in log if r["type"] == "train"]
    evals = [r["heldout_loss"] for r in log if r["type"] in ("eval", "final")]
    assert len(train_losses) >= 3 and train_losses[-1] < train_losses[0]
    assert evals[-1] < train_losses[0]
    final = log[-1]
    assert final["type"] == "final" and final["step"] == 10

    card = (out / "MODEL_CARD.md").read_text()
    assert "`.py` files of the Python standard library" in card
    assert "Steps: **10**" in card
    assert f"tokens seen: **{final['tokens']:,}**" in card


def test_refuses_oversized_model(tmp_path):
    with pytest.raises(SystemExit, match="too large"):
        _load_script().main(["--out", str(tmp_path / "big"), "--max-mb", "1"])
    assert not (tmp_path / "big" / "train_files.txt").exists()
