"""``macopt bench decode`` on CPU at tiny sizes: variants, checks, report and command line."""

from __future__ import annotations

import json

import pytest
import torch

from macopt import cli
from macopt.bench import decode, timing

TINY = decode.LayerShape(batch=2, context=96, q_heads=8, kv_heads=2, head_dim=64,
                         dtype=torch.float32)
CPU_VARIANTS = ("macopt", "flash", "math", "repeat_kv")
CUDA_ONLY = ("cudnn", "efficient", "flex")


def tiny_config(**overrides) -> decode.DecodeBenchConfig:
    fields = dict(batches=(1,), contexts=(64,), q_heads=4, kv_heads=2, head_dim=64,
                  dtype=torch.float32, device="cpu", warmup_ms=1.0, rep_ms=5.0)
    return decode.DecodeBenchConfig(**{**fields, **overrides})


@pytest.fixture
def inputs() -> decode.DecodeInputs:
    return decode.make_inputs(TINY, torch.device("cpu"), torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", CPU_VARIANTS)
def test_variant_matches_fp32_reference(name, inputs):
    attend = decode.VARIANT_BY_NAME[name].build(TINY, inputs)
    out = attend(inputs)
    assert out.shape == inputs.q.shape and out.dtype == inputs.q.dtype
    assert decode.relative_error(out, decode.reference_output(inputs)) < 1e-5


def test_variants_agree_with_each_other(inputs):
    outs = [decode.VARIANT_BY_NAME[n].build(TINY, inputs)(inputs) for n in CPU_VARIANTS]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CUDA_ONLY)
def test_cuda_only_variants_are_unavailable_on_cpu(name, inputs):
    with pytest.raises(decode.Unavailable):
        decode.VARIANT_BY_NAME[name].build(TINY, inputs)


def test_repeat_kv_is_repeat_interleave_on_heads(inputs):
    expected = inputs.k.repeat_interleave(TINY.group, dim=1)
    assert torch.equal(decode.repeat_kv(inputs.k, TINY.group), expected)


def test_inputs_are_random_not_zeros(inputs):
    assert inputs.k.std() > 0.5 and inputs.v.std() > 0.5 and inputs.q.std() > 0.5
    assert inputs.ends.dtype == torch.int32 and inputs.ends.tolist() == [TINY.context] * 2


def test_kv_bytes_counts_k_and_v_once():
    assert TINY.kv_bytes == 2 * 2 * 2 * 96 * 64 * 4


def test_refusing_backend_is_recorded_not_raised(inputs):
    def refuse(shape, sample):
        raise RuntimeError("No available kernel. Aborting execution.\nsecond line")

    variant = decode.Variant("flash", refuse, torch_baseline=True, failure_status="refused")
    record = decode.measure_variant(variant, TINY, [inputs], tiny_config(), decode.RunState())
    assert record.status == "refused" and record.median_ms is None
    assert record.detail == "RuntimeError: No available kernel. Aborting execution."


def test_wrong_variant_is_flagged(inputs):
    wrong = decode.Variant("flash", lambda shape, sample: lambda x: x.q * 2, torch_baseline=True)
    record = decode.measure_variant(wrong, TINY, [inputs], tiny_config(), decode.RunState())
    assert record.status == "ok" and record.correct is False and record.rel_err > 0.1
    assert decode._cell(record).endswith("!")


def test_variant_is_checked_once_then_carries_the_verdict(inputs):
    state = decode.RunState()
    variant = decode.VARIANT_BY_NAME["math"]
    first = decode.measure_variant(variant, TINY, [inputs], tiny_config(), state)
    second = decode.measure_variant(variant, TINY, [inputs], tiny_config(), state)
    assert first.rel_err is not None and first.correct is True
    assert second.rel_err is None and second.correct is True


def test_flex_is_skipped_outside_its_batches_and_budget():
    flex = decode.VARIANT_BY_NAME["flex"]
    config = tiny_config(flex_batches=(1,), flex_budget_s=10.0)
    assert decode.skip_reason(flex, TINY, config, decode.RunState()) is not None  # batch 2
    at_batch_1 = decode.LayerShape(1, 64, 4, 2, 64, torch.float32)
    assert decode.skip_reason(flex, at_batch_1, config, decode.RunState()) is None
    spent = decode.RunState(flex_compile_s=11.0)
    assert "budget" in decode.skip_reason(flex, at_batch_1, config, spent)


def test_report_has_records_environment_and_ratios(tmp_path):
    path = tmp_path / "decode.json"
    report = decode.run(tiny_config(skip=("math",)), path, echo=lambda line: None)
    assert json.loads(path.read_text()) == json.loads(json.dumps(report, default=str))
    env = report["environment"]
    for key in ("device", "torch", "triton", "transformers", "cuda", "date", "command"):
        assert key in env
    assert report["copy_bandwidth_gbps"] > 0
    by_name = {r["variant"]: r for r in report["records"]}
    assert set(by_name) == set(decode.VARIANT_NAMES) - {"math"}
    assert by_name["cudnn"]["status"] == "unavailable"
    macopt = by_name["macopt"]
    assert macopt["status"] == "ok" and macopt["correct"] is True
    assert macopt["median_ms"] > 0 and 0 < macopt["copy_fraction"]
    assert macopt["fastest_torch"] == "flash"
    assert macopt["speedup_vs_fastest_torch"] > 0 and macopt["speedup_vs_repeat_kv"] > 0


def test_table_has_a_row_per_shape_and_a_column_per_variant():
    report = decode.run(tiny_config(contexts=(64, 128)), echo=lambda line: None)
    header, rows = decode.table_rows(report)
    assert len(rows) == 2 and all(len(row) == len(header) for row in rows)
    assert set(decode.VARIANT_NAMES) <= set(header)
    assert decode.format_plain_table(header, rows).count("\n") == 2


def test_cli_runs_end_to_end(tmp_path, capsys):
    path = tmp_path / "out" / "decode.json"
    argv = ["bench", "decode", "--contexts", "128", "--batches", "1", "--heads", "4",
            "--kv-heads", "2", "--head-dim", "64", "--dtype", "float32", "--device", "cpu",
            "--warmup-ms", "1", "--rep-ms", "5", "--skip", "math", "--json", str(path)]
    assert cli.main(argv) == 0
    report = json.loads(path.read_text())
    assert report["config"]["contexts"] == [128] and report["config"]["dtype"] == "float32"
    assert "macopt" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--skip", "nope"], ["--contexts", "4Q"], ["--batches", "0"]])
def test_cli_rejects_bad_arguments(bad):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "decode", *bad])


def test_parse_sizes_reads_k_and_m_suffixes():
    assert decode.parse_sizes("4K, 128k,1M,7") == (4096, 131072, 2**20, 7)


def test_rotation_count_exceeds_l2_and_is_bounded():
    assert timing.rotation_count(10 * 2**20, l2_bytes=50 * 2**20) == 20
    assert timing.rotation_count(10 * 2**30) == 1
    assert timing.rotation_count(1, max_sets=8) == 8


def test_rotating_cycles_through_calls():
    seen = []
    call = timing.rotating([lambda: seen.append(0), lambda: seen.append(1)])
    for _ in range(5):
        call()
    assert seen == [0, 1, 0, 1, 0]
