"""The compile-health script's logic on CPU (its degraded mode: no CUDA graphs)."""

from __future__ import annotations

import json

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
