"""``macopt patch`` / ``macopt.from_pretrained`` / ``macopt generate`` on tiny saved models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from model_zoo import ZOO

import macopt
from macopt.cli import main
from macopt.kernels.feature_maps import positive_random_features, save_feature_maps
from macopt.passes import scope
from macopt.pretrained import PATCH_FILE, read_patch

ATTENTION = ["model.layers.0.self_attn", "model.layers.1.self_attn"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    ZOO["llama"].build().save_pretrained(path)
    return path


def _config_file(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


def _tagged(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if scope.scope_of_module(m) is not None]


def _patch(model: Path | str, config: Path, out: Path) -> int:
    return main(["patch", str(model), "--config", str(config), "--out", str(out)])


def test_patch_links_the_model_files_and_from_pretrained_loads_it_optimized(llama_dir, tmp_path):
    out = tmp_path / "patched"
    assert _patch(llama_dir, _config_file(tmp_path, {"method": "exact"}), out) == 0
    assert (out / "model.safetensors").resolve() == (llama_dir / "model.safetensors").resolve()
    assert (out / "model.safetensors").is_symlink()
    assert json.loads((out / PATCH_FILE).read_text())["config"] == {"method": "exact"}
    model = macopt.from_pretrained(out, dtype=torch.float32)
    assert _tagged(model) == ATTENTION
    reference = ZOO["llama"].build()
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


def test_patch_keeps_overrides(llama_dir, tmp_path):
    data = {"config": {"method": "exact"}, "overrides": {ATTENTION[0]: None}}
    out = tmp_path / "patched"
    assert _patch(llama_dir, _config_file(tmp_path, data), out) == 0
    assert _tagged(macopt.from_pretrained(out)) == ATTENTION[1:]


def _phi_file(tmp_path: Path) -> Path:
    """A loadable phi maps file (patch refuses one that does not load)."""
    path = tmp_path / "phi.safetensors"
    save_feature_maps({"layer.0": positive_random_features(4, 2, 64, 8)}, path)
    return path


def test_patch_copies_the_parameter_files_the_config_names(llama_dir, tmp_path):
    maps = _phi_file(tmp_path)
    config = macopt.TopKPhiConfig(feature_maps=str(maps)).to_dict()
    out = tmp_path / "patched"
    assert _patch(llama_dir, _config_file(tmp_path, config), out) == 0
    stored = out / "phi.safetensors"
    assert not stored.is_symlink() and stored.read_bytes() == maps.read_bytes()
    assert read_patch(out).config == macopt.TopKPhiConfig(feature_maps=str(stored))


def test_patch_copies_a_nested_configs_parameter_files(llama_dir, tmp_path):
    maps = _phi_file(tmp_path)
    composed = macopt.MACTopKPhiConfig(mac=macopt.MACConfig(),
                                       topk_phi=macopt.TopKPhiConfig(feature_maps=str(maps)))
    out = tmp_path / "patched"
    assert _patch(llama_dir, _config_file(tmp_path, composed.to_dict()), out) == 0
    stored = out / "phi.safetensors"
    assert stored.read_bytes() == maps.read_bytes()
    data = json.loads((out / PATCH_FILE).read_text())
    assert data["files"] == {"topk_phi.feature_maps": "phi.safetensors"}
    assert data["config"]["topk_phi"]["feature_maps"] == "phi.safetensors"
    assert read_patch(out).config.topk_phi.feature_maps == str(stored)


def test_patch_of_a_config_only_directory_saves_random_weights(tmp_path):
    source = tmp_path / "config-only"
    ZOO["qwen3"].build().config.save_pretrained(source)
    out = tmp_path / "patched"
    assert _patch(source, _config_file(tmp_path, {"method": "exact"}), out) == 0
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors").is_symlink()
    assert _tagged(macopt.from_pretrained(out)) == ATTENTION


def test_patch_refuses_a_method_the_model_cannot_take_and_writes_nothing(tmp_path, capsys):
    gpt2 = tmp_path / "gpt2"
    ZOO["gpt2"].build().save_pretrained(gpt2)
    out = tmp_path / "patched"
    assert _patch(gpt2, _config_file(tmp_path, {"method": "mac"}), out) == 2
    assert "has no RoPE" in capsys.readouterr().out
    assert not out.exists() and list(tmp_path.iterdir()) == [gpt2, tmp_path / "config.json"]


def test_patch_refuses_an_unknown_method(llama_dir, tmp_path, capsys):
    assert _patch(llama_dir, _config_file(tmp_path, {"method": "nope"}), tmp_path / "o") == 2
    assert "unknown method 'nope'" in capsys.readouterr().out


def test_patch_never_overwrites_a_directory(llama_dir, tmp_path, capsys):
    out = tmp_path / "patched"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _patch(llama_dir, _config_file(tmp_path, {"method": "exact"}), out) == 2
    assert "not empty" in capsys.readouterr().out and (out / "keep.txt").read_text() == "mine"


def test_from_pretrained_of_a_plain_directory_says_what_to_do(llama_dir):
    with pytest.raises(ValueError, match="not a patched model directory.*macopt patch"):
        macopt.from_pretrained(llama_dir)


def _generated_ids(output: str) -> list[int]:
    """The streamed ids: the line of numbers after the header line."""
    line = next(line for line in output.splitlines() if re.fullmatch(r"(\d+ )+", line))
    return [int(x) for x in line.split()]


@torch.no_grad()
def _reference_tokens(prompt: list[int], new: int) -> list[int]:
    model = ZOO["llama"].build()
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=new, do_sample=False, disable_compile=True,
                         cache_implementation="static")
    return out[0, len(prompt):].tolist()


def test_generate_compiled_streams_the_unmodified_models_tokens_and_reports(llama_dir, tmp_path,
                                                                            capsys):
    out = tmp_path / "patched"
    assert _patch(llama_dir, _config_file(tmp_path, {"method": "exact"}), out) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6",
                 "--compile"]) == 0
    printed = capsys.readouterr().out
    assert _generated_ids(printed) == _reference_tokens([5, 6, 7, 8], 6)
    assert re.search(r"6 tokens: prefill [\d.]+ ms, first decode step [\d.]+ ms \(compiles\), "
                     r"then [\d.]+ tokens/s", printed)
    assert printed.count("rewritten") == 2  # explain: both decode sites


def test_generate_eager_with_a_method_says_where_the_report_comes_from(llama_dir, capsys):
    assert main(["generate", str(llama_dir), "--method", "exact", "--prompt-ids", "5,6,7,8",
                 "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert _generated_ids(printed) == _reference_tokens([5, 6, 7, 8], 4)
    assert "pass --compile" in printed


def test_generate_without_a_tokenizer_encodes_text_as_bytes(llama_dir, capsys):
    assert main(["generate", str(llama_dir), "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    assert "3 tokens: prefill" in capsys.readouterr().out


def test_generate_refuses_token_ids_outside_the_vocabulary(llama_dir, capsys):
    assert main(["generate", str(llama_dir), "--prompt-ids", "1,999", "--max-new-tokens", "2"]) == 2
    assert "expected 1+ token ids in [0, 256)" in capsys.readouterr().out


def test_generate_refuses_an_unknown_method(llama_dir, capsys):
    assert main(["generate", str(llama_dir), "--method", "nope", "--prompt-ids", "1"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().out
