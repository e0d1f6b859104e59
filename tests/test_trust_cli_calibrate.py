"""Issue 17, B4 and B6: a calibrated file is usable end to end (calibrate -> optimize ->
generate, per calibrating method, on a GQA model), and calibrate never overwrites a file."""

from __future__ import annotations

import pytest
import torch
from model_zoo import ZOO
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import macopt
from macopt import cli
from macopt.pretrained import parse_config_file

WORDS = [f"w{i}" for i in range(200)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """ZOO's llama (GQA: 4 query heads, 2 KV heads) with a word-level tokenizer and text."""
    directory = tmp_path_factory.mktemp("gqa")
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(
        directory)
    ZOO["llama"].build().save_pretrained(directory)
    gen = torch.Generator().manual_seed(0)
    (directory / "calib.txt").write_text(
        " ".join(WORDS[i] for i in torch.randint(0, 200, (400,), generator=gen)))
    return directory


def _generate(model_dir, config, overrides=None, use_cache=True) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    macopt.optimize(model, config, overrides=overrides or {})
    prompt = torch.randint(1, 200, (1, 48), generator=torch.Generator().manual_seed(1))
    return model.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=use_cache)


def test_calibrated_phi_maps_generate_on_a_gqa_model(model_dir, tmp_path):
    out = tmp_path / "phi.safetensors"
    assert cli.main(["calibrate", str(model_dir), "--method", "topk_phi", "--text",
                     str(model_dir / "calib.txt"), "--seq-len", "128", "--sequences", "2",
                     "--d-phi", "16", "--out", str(out), "--device", "cpu",
                     "--dtype", "float32"]) == 0
    config = macopt.TopKPhiConfig(feature_maps=str(out), budget=8)
    # Without a cache every forward is a prefill whose site sees repeat_kv's keys (one per
    # query head), while calibration wrote one phi_k per KV head.
    for use_cache in (False, True):
        assert _generate(model_dir, config, use_cache=use_cache).shape == (1, 51)


def test_calibrated_mac_config_generates(model_dir, tmp_path):
    out = tmp_path / "mac.json"
    assert cli.main(["calibrate", str(model_dir), "--method", "mac", "--text",
                     str(model_dir / "calib.txt"), "--prefill", "64", "--decode", "8",
                     "--sequences", "1", "--t-min", "16", "--ring-size", "16", "--offset", "8",
                     "--shares", "0.5", "--out", str(out), "--device", "cpu"]) == 0
    config, overrides = parse_config_file(out)
    assert config.method == "mac"
    for use_cache in (False, True):
        assert _generate(model_dir, config, overrides, use_cache).shape == (1, 51)


@pytest.mark.parametrize("method", ["mac", "topk_phi"])
def test_calibrate_refuses_to_overwrite_without_force(model_dir, tmp_path, capsys, method):
    out = tmp_path / "existing"
    out.write_text("keep me")
    argv = ["calibrate", str(model_dir), "--method", method, "--text",
            str(model_dir / "calib.txt"), "--out", str(out), "--device", "cpu",
            "--seq-len", "128", "--prefill", "64", "--decode", "8", "--t-min", "16"]
    assert cli.main(argv) == 2
    assert out.read_text() == "keep me"
    assert "--force" in capsys.readouterr().out


def test_phi_calibration_at_its_default_prints_no_empty_progress(model_dir, tmp_path, capsys):
    # --steps defaults to 0 (the probe init is the result): no "0/0 loss nan" bar.
    assert cli.main(["calibrate", str(model_dir), "--method", "topk_phi", "--text",
                     str(model_dir / "calib.txt"), "--seq-len", "128", "--sequences", "1",
                     "--out", str(tmp_path / "phi.safetensors"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "0/0" not in out and "nan" not in out, out
    assert "no gradient steps" in out
