"""``macopt bench topk`` on CPU at tiny sizes: records, error function, report, command line."""

from __future__ import annotations

import json

import pytest
import torch

from macopt import cli
from macopt.bench import topk
from macopt.config import TopKPhiConfig
from macopt.kernels.feature_maps import positive_random_features

TINY = dict(batches=(1,), contexts=(256,), budgets=(0.05, 32), q_heads=4, kv_heads=2,
            head_dim=64, d_phi=32, page_size=16, dtype=torch.float32, device="cpu",
            warmup_ms=1.0, rep_ms=3.0, selectors=("page", "exact"), budget_floor=0)


def _inputs(n_keys=192, std=0.5):
    gen = torch.Generator().manual_seed(0)
    q = std * torch.randn(2, 4, 64, generator=gen)
    k = std * torch.randn(2, 2, n_keys, 64, generator=gen)
    v = torch.randn(2, 2, n_keys, 64, generator=gen)
    ends = torch.full((2,), n_keys, dtype=torch.int32)
    maps = positive_random_features(4, 2, 64, 32, generator=gen)
    return q, k, v, 64**-0.5, torch.zeros(2, dtype=torch.int32), ends, ends, maps


@pytest.mark.parametrize("selector", ["page", "exact"])
def test_errors_vanish_when_the_budget_covers_the_context(selector):
    config = TopKPhiConfig(tail=8, page_size=16, budget=1.0, selector=selector)
    errors = topk.attention_output_errors(*_inputs(), config)
    assert max(errors["topk"]) < 1e-5 and max(errors["topk_phi"]) < 1e-5
    assert len(errors["topk"]) == 4  # one value per query head


def test_errors_of_a_small_budget_are_per_head_and_positive():
    config = TopKPhiConfig(tail=8, page_size=16, budget=16, selector="exact")
    errors = topk.attention_output_errors(*_inputs(), config)
    assert all(e > 0.01 for e in errors["topk"])
    assert sum(errors["topk_phi"]) < sum(errors["topk"])  # diffuse heads: phi helps


def test_errors_take_captured_queries_as_rows_over_one_shared_sequence():
    # Captured data: row i is the query at position p_i over the same keys [0, p_i + 1).
    q, k, v, scale, _, _, _, maps = _inputs()
    positions = torch.tensor([120, 191], dtype=torch.int32)
    shared_k, shared_v = k[:1].expand(2, -1, -1, -1), v[:1].expand(2, -1, -1, -1)
    config = TopKPhiConfig(tail=8, page_size=16, budget=1.0, selector="page")
    errors = topk.attention_output_errors(q, shared_k, shared_v, scale, torch.zeros_like(
        positions), positions + 1, positions + 1, maps, config)
    assert max(errors["topk_phi"]) < 1e-5


def test_tokens_read_rounds_page_budgets_up_to_whole_pages():
    assert topk.tokens_read(TopKPhiConfig(budget=40, page_size=32, selector="page"),
                            4096) == 20 + 64
    assert topk.tokens_read(TopKPhiConfig(budget=40, selector="exact"), 4096) == 20 + 40
    assert topk.tokens_read(TopKPhiConfig(budget=1.0), 100) == 100


def test_report_has_exact_and_every_method_with_ratios_and_errors(tmp_path):
    path = tmp_path / "topk.json"
    report = topk.run(topk.TopKBenchConfig(**TINY), path, echo=lambda line: None)
    assert json.loads(path.read_text()) == json.loads(json.dumps(report, default=str))
    records = report["records"]
    assert len(records) == 1 + 2 * 2  # exact + (2 selectors x 2 budgets)
    exact, methods = records[0], records[1:]
    assert exact["selector"] is None and exact["median_ms"] > 0
    for r in methods:
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["speedup_vs_exact"] > 0
        assert r["median_ms_topk_only"] > 0 and r["speedup_topk_only"] > 0
        assert 0 < r["rel_l1_topk"] and 0 < r["rel_l1_topk_phi"]
    assert {r["budget_tokens"] for r in methods} == {13, 32}
    header, times, topk_only, errors = topk.table_rows(report)
    assert len(times) == len(topk_only) == len(errors) == 1
    assert len(times[0]) == len(topk_only[0]) == len(header) == 3 + 4


def test_cli_runs_end_to_end(tmp_path, capsys):
    path = tmp_path / "topk.json"
    argv = ["bench", "topk", "--contexts", "128", "--batches", "1", "--heads", "4",
            "--kv-heads", "2", "--head-dim", "64", "--d-phi", "16", "--page-size", "16",
            "--budgets", "10%", "--selectors", "page", "--dtype", "float32", "--device", "cpu",
            "--warmup-ms", "1", "--rep-ms", "3", "--json", str(path)]
    assert cli.main(argv) == 0
    report = json.loads(path.read_text())
    assert report["config"]["budgets"] == [0.1] and report["config"]["selectors"] == ["page"]
    out = capsys.readouterr().out
    assert "Top-K + phi" in out and "Top-K alone" in out


def test_cli_summary_in_budget_reaches_the_measured_config():
    args = cli.build_parser().parse_args(["bench", "topk", "--summary-in-budget"])
    config = topk.config_from_args(args)
    assert config.summary_in_budget and config.method(0.02, "page").summary_in_budget
    plain = topk.config_from_args(cli.build_parser().parse_args(["bench", "topk"]))
    assert not plain.method(0.02, "page").summary_in_budget


@pytest.mark.parametrize("bad", [["--budgets", "0"], ["--budgets", "150%"],
                                 ["--selectors", "quest"], ["--contexts", "4Q"]])
def test_cli_rejects_bad_arguments(bad):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "topk", *bad])


def test_parse_budgets_reads_percentages_fractions_and_token_counts():
    assert topk.parse_budgets("1%, 2%,0.05,128") == (0.01, 0.02, 0.05, 128)
