"""Issue 17, B8: eval's default context reaches past MAC's t_min (and a short one is warned
about); the GPU benchmarks say what they need on CPU instead of crashing."""

from __future__ import annotations

import pytest

from macopt.bench import e2e
from macopt.cli import build_parser, main
from macopt.commands.eval import DEFAULT_METHODS, default_context, short_context_warnings
from macopt.evaluation import harness
from macopt.evaluation.harness import parse_methods
from macopt.evaluation.text import tiny_model_dir


def test_default_context_puts_every_decode_step_past_t_min_of_the_shipped_configs():
    methods = parse_methods(DEFAULT_METHODS, tiny_model_dir())  # mac:calibrated included
    context = default_context(methods, ppl_decode=64)
    t_mins = [m.config.t_min for m in methods if m.config is not None
              and m.config.method == "mac"]
    assert len(t_mins) == 3 and context - 64 >= max(t_mins) >= 2048
    assert short_context_warnings(methods, context, 64, [context]) == []


def test_a_context_below_t_min_is_warned_about(tmp_path, capsys, monkeypatch):
    def stop(*args, **kwargs):
        raise ValueError("stopped before the evaluation")

    monkeypatch.setattr(harness, "evaluate", stop)
    text = tmp_path / "text.txt"
    text.write_text("some held-out text " * 50)
    assert main(["eval", "llama", "--methods", "exact,mac:0.45", "--context", "1024",
                 "--text", str(text), "--device", "cpu"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: mac:0.45: t_min 2048" in out and "--context to at least 2112" in out


def test_bench_mac_on_cpu_says_it_needs_a_gpu(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["bench", "mac", "--device", "cpu", "--contexts", "1024", "--batches", "1"]) == 2
    err = capsys.readouterr().err
    assert "CUDA GPU" in err and "Traceback" not in err


def test_bench_e2e_on_cpu_refuses_the_8b_shape_before_building_it():
    args = build_parser().parse_args(["bench", "e2e", "--device", "cpu"])
    with pytest.raises(ValueError, match="GiB.*--model examples/tiny-lm"):
        e2e.config_from_args(args)
    small = build_parser().parse_args(["bench", "e2e", "--device", "cpu", "--layers", "2",
                                       "--hidden", "512", "--intermediate", "1024",
                                       "--vocab", "8192"])
    assert e2e.config_from_args(small).shape.layers == 2
