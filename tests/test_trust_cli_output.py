"""Issue 17, B10: what a person reads. print(stats) / print(explain) give tables that fit 80
columns without folding names, ``--method`` help lists the methods, a model path that does not
exist is one line, and phi calibration at its default prints no empty progress."""

from __future__ import annotations

import pytest

from macopt.cli import build_parser, main
from macopt.config import method_names
from macopt.passes.report import SiteReport
from macopt.report import Explanation
from macopt.stats import LayerStats, Stats

OP = "aten._scaled_dot_product_efficient_attention.default"
LAYER = "model.layers.11.self_attn"


def _site(phase: str) -> SiteReport:
    return SiteReport(layer=LAYER, op=OP, phase=phase, query_len="1", rope_form="rotate_half",
                      pre_rope_lifted=True, gqa_form="repeat_kv", group=4, head_dim=128,
                      method="mac", decision="rewritten",
                      reason="matched the decode pattern; the rewrite reads the key range from "
                      "the mask")


@pytest.fixture(autouse=True)
def eighty_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")


def _assert_table_of_80_columns(text: str, *names: str) -> None:
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    for name in names:  # whole on one line, never folded
        assert any(name in line for line in lines), (name, text)


def test_print_explain_is_a_table_that_keeps_names_whole():
    text = str(Explanation([_site("decode"), _site("prefill")]))
    assert "SiteReport(" not in text
    _assert_table_of_80_columns(text, LAYER, "sdpa_efficient", "rewritten", "repeat_kv g=4")
    assert len(text.splitlines()) < 15, text  # no column folded into a tower of letters


def test_print_stats_is_a_table_that_keeps_names_whole():
    row = LayerStats(LAYER, "mac_topk_phi", 12, 1, 0.5, (0.5, 0.5), 30, 60, 3 * 2**20)
    text = str(Stats([row]))
    assert "LayerStats(" not in text
    _assert_table_of_80_columns(text, LAYER, "mac_topk_phi", "0.500", "3.0")
    assert len(text.splitlines()) < 8, text


@pytest.mark.parametrize("command", ["inspect", "generate"])
def test_method_help_lists_the_method_names(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in method_names())
    assert "mac_topk_phi" in help_text


@pytest.mark.parametrize("argv", [
    ["inspect", "/no/such/model"],
    ["generate", "/no/such/model", "--prompt-ids", "1,2"],
])
def test_a_model_path_that_does_not_exist_is_one_line(argv, capsys):
    assert main(argv) == 2
    out = capsys.readouterr().out.strip()
    assert "/no/such/model" in out and len(out) < 300, out
