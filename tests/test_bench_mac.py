"""``macopt bench mac`` on CPU at a tiny size (Triton interpreter): forced hit rates are
achieved, the report has every variant, and the command line writes JSON."""

from __future__ import annotations

import json

import pytest
import torch

from macopt import cli
from macopt.bench import mac

TINY = dict(batches=(1,), contexts=(64,), q_heads=4, kv_heads=2, head_dim=64,
            dtype=torch.float32, ring_size=16, offset=4, device="cpu")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The command line at a tiny size (one run: the interpreter is slow), its JSON report."""
    path = tmp_path_factory.mktemp("bench") / "mac.json"
    code = cli.main(["bench", "mac", "--device", "cpu", "--batches", "1", "--contexts", "64",
                     "--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--dtype", "fp32",
                     "--ring-size", "16", "--offset", "4", "--hit-rates", "0,0.5,1",
                     "--skip", "flex,cudnn", "--json", str(path)])
    assert code == 0
    return json.loads(path.read_text())


def test_forced_hit_rates_are_achieved(report):
    achieved = {r["hit_rate"]: r["achieved_hit_rate"] for r in report["records"]
                if r["variant"] == "mac"}
    assert achieved == {0.0: 0.0, 0.5: 0.5, 1.0: 1.0}


def test_hits_read_the_band_and_tail_only(report):
    keys = {r["hit_rate"]: r["mean_keys_read"] for r in report["records"] if r["variant"] == "mac"}
    assert keys[0.0] == 64  # a miss reads every key
    assert keys[1.0] == 16 // 2 + 4  # band t - j* = M / 2, plus the S tail keys


def test_every_variant_is_timed_or_says_why(report):
    by_variant = {r["variant"]: r for r in report["records"] if r["variant"] != "mac"}
    assert by_variant["exact"]["status"] == "ok" and by_variant["flash"]["status"] == "ok"
    assert by_variant["flex"]["status"] == by_variant["cudnn"]["status"] == "skipped"
    for record in report["records"]:
        if record["status"] == "ok":
            assert record["median_ms"] > 0 and record["speedup_vs_exact"] > 0


def test_table_has_a_row_per_shape(report):
    assert mac.table(report).row_count == 1
    assert report["config"]["ring_size"] == 16 and report["environment"]["torch"]


def test_forced_ring_mac_step_with_no_hit_is_exact():
    config = mac.MACBenchConfig(**TINY)
    layer = mac.make_layer(config, 1, 64)
    ring = mac.forced_ring(layer, 16, 0.0)
    out, hit, _ = mac._mac_step(config, layer, ring)()
    want = torch.ops.macopt.decode_attention(layer.q, layer.k, layer.v, layer.starts,
                                             layer.positions + 1, None, layer.scale)
    assert not hit.any()
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
