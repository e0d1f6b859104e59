"""The compile-health script's logic on CPU (its degraded mode: no CUDA graphs)."""

from __future__ import annotations

import json

import pytest
import torch

from macopt.bench import compile_health

TINY = ["--device", "cpu", "--layers", "1", "--hidden", "128", "--heads", "2", "--kv-heads", "1",
        "--head-dim", "64", "--vocab", "256", "--prompt-len", "8", "--steps", "6"]


def test_cpu_run_is_healthy_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "health.json"
    assert compile_health.main([*TINY, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["healthy"] and report["graphs_compiled_warmup"] == 1
    assert report["recompiles"] == 0 and report["graph_breaks"] == 0
    assert report["op_in_compiled_code"] and report["tokens_equal"]
    assert report["first_mismatch"] is None and report["median_token_ms"] > 0
    assert report["cudagraph_skips"] is None and report["cudagraph_recordings_warmup"] is None
    assert report["config"]["dtype"] == "float32"
    assert "recompiles after warm-up" in capsys.readouterr().out


def test_a_report_with_a_recompile_or_a_skip_is_unhealthy():
    config, _ = compile_health.parse_args(TINY)
    fine = dict(config=config, device_name="cpu", torch_version="", transformers_version="",
                graphs_compiled_warmup=1, recompiles=0, graph_breaks=0, op_in_compiled_code=True,
                tokens_equal=True, first_mismatch=None, median_token_ms=1.0,
                cudagraph_recordings_warmup=1, cudagraph_recordings_measured=0,
                cudagraph_skips=0)
    assert compile_health.HealthReport(**fine).healthy
    assert not compile_health.HealthReport(**{**fine, "recompiles": 1}).healthy
    assert not compile_health.HealthReport(**{**fine, "cudagraph_skips": 3}).healthy
    assert not compile_health.HealthReport(**{**fine, "cudagraph_recordings_warmup": 0}).healthy


def test_the_report_gives_teacher_forced_logit_errors(tmp_path, capsys):
    """bf16 on CPU: the logit fields are measured, written and printed; the truth is fp32."""
    out = tmp_path / "health.json"
    status = compile_health.main([*TINY, "--dtype", "bfloat16", "--json", str(out)])
    r = json.loads(out.read_text())
    assert status == (0 if r["healthy"] else 1) and r["truth_dtype"] == "float32"
    assert 0 <= r["max_logit_diff"] < 0.5 and 0 <= r["max_logit_diff_step"] < 6
    assert 0 < r["unmodified_error_vs_truth"] < 0.5 and 0 < r["macopt_error_vs_truth"] < 0.5
    assert r["tokens_equal"] == (r["first_mismatch"] is None)
    assert (r["mismatch_tokens"] is None) == r["tokens_equal"]
    assert r["healthy"] == (r["tokens_equal"] or (r["near_tie"] and r["as_accurate"]))
    printed = capsys.readouterr().out
    assert "max |logit diff| vs unmodified" in printed and "vs float32" in printed


def test_compare_reads_margins_and_gaps_at_the_first_mismatch():
    unmodified = torch.tensor([[5.0, 1.0, 0.0], [2.0, 1.99, 3.0]], dtype=torch.float64)
    optimized = torch.tensor([[5.0, 1.0, 0.0], [2.0, 3.01, 3.0]], dtype=torch.float64)
    truth = torch.tensor([[5.0, 1.0, 0.0], [2.0, 2.999, 3.0]], dtype=torch.float64)
    fields = compile_health._compare(unmodified, optimized, truth, 1, want=[0, 2],
                                     tokens=[0, 1])
    assert fields["mismatch_tokens"] == (2, 1) and fields["max_logit_diff_step"] == 1
    assert fields["max_logit_diff"] == pytest.approx(1.02)
    assert fields["unmodified_margin_at_mismatch"] == pytest.approx(1.0)
    assert fields["macopt_margin_at_mismatch"] == pytest.approx(0.01)
    assert fields["unmodified_gap_at_mismatch"] == pytest.approx(1.01)
    assert fields["truth_gap_at_mismatch"] == pytest.approx(0.001)
    assert fields["unmodified_error_vs_truth"] == pytest.approx(1.009)
    assert fields["macopt_error_vs_truth"] == pytest.approx(0.011)
    assert "mismatch_tokens" not in compile_health._compare(unmodified, unmodified, truth, None,
                                                            want=[0, 2], tokens=[0, 2])


def test_a_mismatch_is_healthy_only_at_a_near_tie_with_macopt_as_accurate():
    config, _ = compile_health.parse_args(TINY)
    base = dict(config=config, device_name="cpu", torch_version="", transformers_version="",
                graphs_compiled_warmup=1, recompiles=0, graph_breaks=0, op_in_compiled_code=True,
                tokens_equal=False, first_mismatch=9, median_token_ms=1.0,
                cudagraph_recordings_warmup=None, cudagraph_recordings_measured=None,
                cudagraph_skips=None, unmodified_error_vs_truth=0.03,
                macopt_error_vs_truth=0.03, unmodified_gap_at_mismatch=0.0156)

    def report(**changes):
        return compile_health.HealthReport(**{**base, **changes})

    assert report().near_tie and report().as_accurate and report().healthy
    assert report(macopt_error_vs_truth=0.02).healthy  # more accurate than the unmodified
    assert not report(unmodified_gap_at_mismatch=0.05).healthy  # not a near-tie: a real flip
    assert not report(macopt_error_vs_truth=0.045).healthy  # a tie, but macopt less accurate
    assert not report(unmodified_gap_at_mismatch=None).healthy  # not measured: no excuse
    assert report(tokens_equal=True, first_mismatch=None, unmodified_gap_at_mismatch=None,
                  macopt_error_vs_truth=None).healthy
    assert report().to_dict()["near_tie"] is True
