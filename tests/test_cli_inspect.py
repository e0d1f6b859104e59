"""``macopt inspect MODEL_TYPE`` prints the attention-site table for each family of the passes
issue (random weights from transformers' default config, shrunk to 2 layers; no download)."""

from __future__ import annotations

import pytest
import torch

from macopt import cli


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each inspect is a process of its own on the command line: transformers' shared forward
    wrapper would otherwise reach dynamo's recompile limit after a few model classes."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()

# model type -> (rewritten, skipped) decode sites with ExactConfig at 2 layers
FAMILIES = {
    "llama": (2, 0), "mistral": (2, 0), "qwen2": (2, 0), "qwen3": (2, 0), "phi3": (2, 0),
    "gpt_neox": (2, 0), "olmo2": (2, 0), "cohere": (2, 0), "glm": (2, 0), "gptj": (2, 0),
    "gpt2": (2, 0),
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_inspect_prints_the_sites_and_decisions(model_type, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "400")  # one table row per line
    assert cli.main(["inspect", model_type]) == 0
    out = capsys.readouterr().out
    decode_rows = [line for line in out.splitlines() if "decode (q=1)" in line]
    rewritten, skipped = FAMILIES[model_type]
    assert sum("rewritten" in line for line in decode_rows) == rewritten, out
    assert sum("skipped" in line for line in decode_rows) == skipped, out


def test_inspect_reports_a_sliding_window_layer_as_skipped(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "400")
    assert cli.main(["inspect", "gemma3_text", "--layers", "6"]) == 0
    decode_rows = [line for line in capsys.readouterr().out.splitlines()
                   if "decode (q=1)" in line]
    assert any("skipped" in line and "sliding" in line for line in decode_rows)
    assert any("rewritten" in line for line in decode_rows)


def test_inspect_of_an_unknown_model_type_says_so(capsys):
    assert cli.main(["inspect", "not_a_model_type"]) == 2
    assert "not_a_model_type" in capsys.readouterr().out
