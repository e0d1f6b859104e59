"""``macopt bench e2e`` end to end on CPU at a tiny size (macopt's passes without Inductor):
every method decodes at every point, exact methods reproduce the unmodified tokens, MAC hit
rates are the measured ones, and the JSON holds every record, skips included. With ``--model``
the committed tiny trained Llama decodes its held-out text, its calibration file included."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from macopt import cli
from macopt.bench import e2e
from macopt.method_spec import FORCED_HIT_TAU, UNBOUNDED_CHAIN

LAYERS, HEADS, KV_HEADS, HEAD_DIM, RING, OFFSET = 2, 4, 2, 64, 16, 8
CONTEXTS, BATCHES, WARMUP, STEPS = (64, 128), (2,), 2, 3
METHODS = ("unmodified", "exact", "mac:all", "mac:1", "topk_phi:0.02")
TINY = ["--device", "cpu", "--backend", "eager", "--layers", str(LAYERS), "--hidden", "256",
        "--heads", str(HEADS), "--kv-heads", str(KV_HEADS), "--head-dim", str(HEAD_DIM),
        "--intermediate", "512", "--vocab", "512", "--contexts", "64,128", "--batches", "2",
        "--steps", str(STEPS), "--warmup-steps", str(WARMUP), "--chunk", "8",
        "--prefill-contexts", "64", "--prefill-repeats", "2",
        "--mac-ring-size", str(RING), "--mac-offset", str(OFFSET)]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """One run of the command line (each method compiles per batch: run it once). Batch 2:
    several rows; the MAC rings are first allocated for the batch-1 prefill, then for 2."""
    path = tmp_path_factory.mktemp("bench") / "e2e.json"
    assert cli.main(["bench", "e2e", *TINY, "--methods", ",".join(METHODS),
                     "--json", str(path)]) == 0
    return json.loads(path.read_text())


def decode_records(report: dict) -> dict[tuple[str, int, int], dict]:
    return {(r["method"], r["batch"], r["context"]): r for r in report["records"]
            if r["kind"] == "decode"}


def test_every_method_has_a_latency_at_every_point(report):
    records = decode_records(report)
    assert set(records) == {(m, b, c) for m in METHODS for b in BATCHES for c in CONTEXTS}
    for r in records.values():
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["mean_ms"] > 0 and r["bound_ms"] > 0
        assert len(r["tokens"]) == r["batch"] and len(r["tokens"][0]) == WARMUP + STEPS


def test_exact_decodes_the_unmodified_tokens(report):
    for (method, _, _), r in decode_records(report).items():
        if method == "exact":
            assert r["tokens_equal_unmodified"] and r["first_mismatch_vs_unmodified"] is None


def test_mac_at_tau_1_never_hits_and_decodes_the_exact_tokens(report):
    for (method, _, _), r in decode_records(report).items():
        if method == "mac:1":
            assert r["hit_rate"] == 0.0 and r["read_fraction"] == 1.0
            assert r["tokens_equal_exact"] and r["tokens_equal_unmodified"]


def test_forced_hits_are_measured_and_read_fewer_keys(report):
    for (method, _, context), r in decode_records(report).items():
        if method == "mac:all":
            # The chunked prefill leaves the ring empty; warm-up steps refill it.
            assert r["hit_rate"] == 1.0
            assert r["keys_read_per_head_step"] < context and r["read_fraction"] < 0.5


def test_kv_bytes_follow_what_each_method_reads(report):
    records = decode_records(report)
    per_token = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # fp32 on CPU
    for batch in BATCHES:
        for context in CONTEXTS:
            unmodified = records[("unmodified", batch, context)]
            exact = records[("exact", batch, context)]
            mac_all = records[("mac:all", batch, context)]
            assert unmodified["kv_bytes_per_step"] == batch * unmodified["cache_len"] * per_token
            mean_keys = context + WARMUP + (STEPS + 1) / 2
            assert exact["kv_bytes_per_step"] == pytest.approx(batch * mean_keys * per_token)
            assert mac_all["kv_bytes_per_step"] < exact["kv_bytes_per_step"]
            assert exact["bound_ms"] < unmodified["bound_ms"]


def test_state_bytes_are_the_method_state(report):
    records = decode_records(report)
    ring_row = HEADS * RING * (HEAD_DIM * (4 + 4) + 12)  # fp32 queries and states
    counters = 7 * HEADS * 8  # the int64 rows of mac_counters.COUNTERS
    for batch in BATCHES:
        mac = records[("mac:all", batch, 64)]
        assert mac["state_bytes"] == LAYERS * (batch * ring_row + counters)
        assert mac["state_pct_of_kv"] == pytest.approx(100 * mac["state_bytes"]
                                                       / mac["kv_bytes_context"])
        assert records[("topk_phi:0.02", batch, 64)]["state_bytes"] > LAYERS * 8
        assert records[("exact", batch, 64)]["state_bytes"] == 0


def test_compile_health_one_graph_per_group_and_no_recompile(report):
    for (method, _, _), r in decode_records(report).items():
        assert r["recompiles_after_warmup"] == 0 and r["graph_breaks"] == 0
        assert r["cudagraph_skips"] is None  # no CUDA graphs on CPU
        assert r["decode_sites_rewritten"] == (0 if method == "unmodified" else LAYERS)


def test_prefill_is_timed_for_the_default_methods_and_the_control(report):
    prefill = {r["method"]: r for r in report["records"] if r["kind"] == "prefill"}
    assert set(prefill) == {"unmodified", e2e.TRACED_CONTROL, "exact", "mac:all"}
    for r in prefill.values():
        assert r["status"] == "ok" and r["median_ms"] > 0 and len(r["runs_ms"]) == 2
    assert "slowdown_vs_control_pct" in prefill["mac:all"]
    assert "slowdown_vs_unmodified_pct" in prefill[e2e.TRACED_CONTROL]


def test_report_holds_environment_config_and_tables(report):
    assert report["environment"]["torch"] == torch.__version__
    assert report["config"]["methods"] == list(METHODS) and report["copy_gbps"] > 0
    assert report["weight_bytes_per_step"] > 0 and report["elapsed_s"] > 0
    assert e2e.decode_table(report).row_count == len(BATCHES) * len(CONTEXTS)
    assert e2e.health_table(report).row_count == len(METHODS) * len(BATCHES)
    assert e2e.prefill_table(report).row_count == 4


def test_a_spent_budget_or_the_token_cap_records_points_as_skipped(tmp_path):
    path = tmp_path / "e2e.json"
    assert cli.main(["bench", "e2e", *TINY, "--methods", "unmodified,exact",
                     "--budget-s", "0.001", "--max-batch-tokens", "128",
                     "--json", str(path)]) == 0
    records = json.loads(path.read_text())["records"]
    assert len(records) == 2 * len(BATCHES) * len(CONTEXTS) + 3  # + prefill: 2 and control
    assert all(r["status"] == "skipped" for r in records)
    capped = {(r["method"], r["context"]) for r in records if "max-batch-tokens" in r["detail"]}
    assert capped == {("unmodified", 128), ("exact", 128)}  # batch 2 x 128 > 128 tokens
    assert all(r["detail"].startswith("budget") for r in records
               if (r["method"], r["context"]) not in capped)


def test_compiled_prefill_route_is_timed_against_the_compiled_unmodified_model(tmp_path):
    """--prefill-compiled: the same prefill points through the user's compile (here macopt's
    passes without Inductor, for speed), compared with the compiled unmodified model; the MAC
    state op runs at every layer of every call. --contexts none: no decoding at all."""
    path = tmp_path / "e2e.json"
    methods = "unmodified,mac:all"
    assert cli.main(["bench", "e2e", *TINY, "--contexts", "none", "--methods", methods,
                     "--prefill-methods", methods, "--prefill-compiled", methods,
                     "--no-prefill-control", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    records = {(r["method"], r["route"]): r for r in report["records"]}
    assert all(r["kind"] == "prefill" for r in report["records"])
    assert set(records) == {(m, route) for m in ("unmodified", "mac:all")
                            for route in ("eager", "compiled")}
    for r in records.values():
        assert r["status"] == "ok" and r["median_ms"] > 0 and len(r["runs_ms"]) == 2, r
    mac, unmodified = records[("mac:all", "compiled")], records[("unmodified", "compiled")]
    assert mac["slowdown_vs_compiled_unmodified_pct"] == pytest.approx(
        100 * (mac["median_ms"] / unmodified["median_ms"] - 1))
    assert mac["slowdown_vs_unmodified_pct"] == pytest.approx(
        100 * (mac["median_ms"] / records[("unmodified", "eager")]["median_ms"] - 1))
    assert "slowdown_vs_compiled_unmodified_pct" not in records[("mac:all", "eager")]
    calls = 1 + 2  # the first call and --prefill-repeats 2
    assert mac["state_prefills"] == records[("mac:all", "eager")]["state_prefills"] == \
        LAYERS * calls
    assert "state_prefills" not in unmodified
    assert e2e.prefill_table(report).row_count == 4
    assert e2e.decode_table(report).row_count == 0


def test_prefill_compiled_must_name_measured_methods(capsys):
    assert cli.main(["bench", "e2e", *TINY, "--methods", "unmodified,exact",
                     "--prefill-compiled", "mac:all"]) == 2
    assert "--prefill-compiled" in capsys.readouterr().err


def test_first_mismatch_is_the_earliest_step_over_rows():
    assert e2e.first_mismatch([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]]) is None
    assert e2e.first_mismatch([[1, 2, 3], [4, 5, 6]], [[1, 2, 0], [4, 0, 6]]) == 1


def test_method_names_map_to_configs():
    forced = e2e.parse_method("mac:all", ring_size=16, offset=8).config
    assert forced.tau == FORCED_HIT_TAU and forced.t_min == 0 and forced.ring_size == 16
    assert forced.max_chain_depth == UNBOUNDED_CHAIN
    assert e2e.parse_method("mac:all").config_for(2).batch_capacity == 2
    assert e2e.parse_method("unmodified").config is None
    with pytest.raises(ValueError, match="unknown method"):
        e2e.parse_method("mca")


def test_latency_plot_from_the_committed_h100_report(tmp_path):
    import xml.etree.ElementTree as ET
    from pathlib import Path

    from macopt.bench import e2e

    report = Path(e2e.__file__).parent / "results" / "h100_e2e.json"
    out = tmp_path / "e2e.svg"
    assert e2e.main(["--plot", str(out), "--plot-from", str(report)]) == 0
    svg = out.read_text()
    ET.fromstring(svg)  # well-formed
    for name in ("batch 1", "batch 2", "exact", "mac:all", "mac:all bound", "unmodified"):
        assert f">{name}<" in svg, name


# ---------------------------------------------------------------------------------------------
# --model: the committed tiny trained Llama decoding its held-out text

TINY_LM_CONTEXT, TINY_LM_METHODS = 512, ("unmodified", "mac:calibrated", "mac:0.45")


@pytest.fixture(scope="module")
def tiny_lm_report(tmp_path_factory) -> dict:
    """The tiny model at 512 tokens of held-out text: a real prefill, then decode steps (its
    calibration's t_min is 2048, so mac:calibrated matches nothing here; mac:0.45, at t_min 0
    as every e2e MAC variant but the files, does)."""
    from macopt.evaluation.text import default_model

    path = tmp_path_factory.mktemp("bench") / "tiny.json"
    assert cli.main(["bench", "e2e", "--model", str(default_model()), "--device", "cpu",
                     "--backend", "eager", "--contexts", str(TINY_LM_CONTEXT), "--batches", "1",
                     "--steps", "2", "--warmup-steps", "1", "--prefill-contexts", "none",
                     "--methods", ",".join(TINY_LM_METHODS), "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_tiny_model_decodes_held_out_text_with_measured_hit_rates(tiny_lm_report):
    records = decode_records(tiny_lm_report)
    assert set(records) == {(m, 1, TINY_LM_CONTEXT) for m in TINY_LM_METHODS}
    assert all(r["status"] == "ok" for r in records.values()), records
    assert tiny_lm_report["prompt"].startswith("held-out text: ")
    tuned = records[("mac:0.45", 1, TINY_LM_CONTEXT)]
    assert tuned["hit_rate"] > 0 and len(tuned["layer_hit_rates"]) == 4
    assert tuned["read_fraction"] < 1


def test_tiny_model_calibrated_mac_runs_the_calibration_file(tiny_lm_report):
    calibrated = decode_records(tiny_lm_report)[("mac:calibrated", 1, TINY_LM_CONTEXT)]
    assert calibrated["hit_rate"] == 0.0 and calibrated["layer_hit_rates"] == [0.0] * 4
    assert calibrated["tokens_equal_unmodified"] and calibrated["decode_sites_rewritten"] == 4


def test_tiny_model_shape_and_weights_come_from_its_directory(tiny_lm_report):
    from macopt.bench import e2e_model
    from macopt.evaluation.text import default_model

    config = e2e_model.model_config(default_model())
    assert tiny_lm_report["config"]["shape"] == dataclasses.asdict(e2e.shape_of(config))
    assert tiny_lm_report["config"]["shape"]["layers"] == 4
    # Tied embeddings: the output projection reads the whole table every step (fp32 on CPU).
    model = e2e_model.load_model(default_model(), "cpu", torch.float32)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    every_parameter = sum(p.nbytes for p in model.parameters())  # the tied table once
    assert tiny_lm_report["weight_bytes_per_step"] == every_parameter


def test_held_out_prompt_rows_are_consecutive_windows_of_the_text():
    from macopt.bench import e2e_model
    from macopt.evaluation.text import default_model

    text = e2e_model.HeldOutText(default_model())
    ids = text.prompt(2, 64, "cpu")
    assert ids.tolist() == [text.tokens(128)[:64], text.tokens(128)[64:]]
    assert ids.tolist()[0] == text.tokenizer(text.text[:2000], add_special_tokens=False,
                                             verbose=False)["input_ids"][:64]


def test_model_contexts_stay_within_its_positions():
    from macopt.bench import e2e_model

    assert e2e_model.default_contexts(8192, 35) == (2048, 4096, 7936)
    e2e_model.check_contexts((8000,), 8192, 35)
    with pytest.raises(ValueError, match="pass the model's 8192 positions"):
        e2e_model.check_contexts((8192,), 8192, 35)


@pytest.mark.parametrize("flags", [["--layers", "2"], ["--contexts", "8192"],
                                   ["--methods", "exact,mac:missing.json"]])
def test_model_mode_refuses_what_does_not_fit_it(flags, capsys):
    from macopt.evaluation.text import default_model

    try:
        code = cli.main(["bench", "e2e", "--model", str(default_model()), "--device", "cpu",
                         *flags])
    except SystemExit as exit_:  # argparse, on a method it cannot read
        code = exit_.code
    assert code == 2 and capsys.readouterr().err


def test_calibrated_mac_needs_a_model_directory(capsys):
    assert cli.main(["bench", "e2e", *TINY, "--methods", "exact,mac:calibrated"]) == 2
    assert "mac:calibrated needs --model" in capsys.readouterr().err


def test_calibrated_method_holds_the_files_per_layer_thresholds():
    from macopt.calibrate_mac import load_result
    from macopt.evaluation.text import default_model

    method = e2e.parse_method("mac:calibrated", model_dir=default_model())
    config, overrides = load_result(default_model() / "mac_calibrated.json")
    assert method.config == config and method.overrides == overrides
    assert len({c.tau for c in overrides.values()}) > 1
    assert {c.batch_capacity for c in method.overrides_for(2).values()} == {2}
