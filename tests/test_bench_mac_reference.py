"""``macopt bench mac-reference`` on CPU: the reference's conventions (ring slots, the synthetic
hit pattern against its published counts), the two layouts built from one set of data, the
build flags, and a pure-torch model of the op (its argument list and outputs) against the fp32
attention and macopt's MAC step (Triton interpreter). No GPU: the CUDA op itself is checked on
the GPU by the command (every output against fp32 before timing)."""

from __future__ import annotations

import json

import pytest
import torch

from macopt import cli
from macopt.bench import mac
from macopt.bench import mac_reference as mr

# Tiny points: D = 128 (the reference's only head dim), a short ring and offset.
TINY = dict(ring_size=16, offset=4, lag=3, device="cpu")


def tiny_point(q_heads=4, kv_heads=2, batch=2, context=40) -> mr.Point:
    config = mr.RefBenchConfig(layouts=((q_heads, kv_heads),), batches=(batch,),
                               contexts=(context,), **TINY)
    return mr.make_point(config, q_heads, kv_heads, batch, context)


@pytest.mark.parametrize("past_len", [5, 15, 16, 17, 40, 127, 32768])
def test_reference_ring_slot_is_position_mod_ring_size(past_len):
    m = 16
    for pos in range(max(0, past_len - m), past_len):
        assert mr.ring_slot(past_len, m, pos) == pos % m


# (batch, context, hit rate) -> (missing heads, KV groups of 8 (gqa4) with every head missing),
# read off the reference's published gqa4.csv (results/cuda_graph_hit_curves, commit 7314294):
# the pattern is an exact quota rotated by a hash of the seed and t.
PUBLISHED_GQA4 = {
    (1, 32768, 0.9): (3, 0), (1, 32768, 0.95): (2, 0), (1, 126976, 0.0): (32, 8),
    (16, 32768, 0.9): (51, 12), (16, 126976, 0.95): (26, 6), (16, 126976, 1.0): (0, 0),
    (64, 32768, 0.95): (102, 25), (64, 126976, 0.9): (205, 51), (64, 126976, 0.0): (2048, 512),
}


@pytest.mark.parametrize("key", sorted(PUBLISHED_GQA4))
def test_synthetic_hits_match_the_published_counts(key):
    batch, context, rate = key
    hits = mr.synthetic_hits(batch, 32, context, rate)
    missing = (~hits).view(batch, 8, 4).sum(-1)
    assert (int((~hits).sum()), int((missing == 4).sum())) == PUBLISHED_GQA4[key]


def test_synthetic_misses_are_one_rotated_block():
    miss = ~mr.synthetic_hits(4, 32, 1000, 0.9).flatten()
    starts = miss & ~miss.roll(1)  # first unit of each run of misses (cyclically)
    assert int(miss.sum()) == 13 and int(starts.sum()) == 1


def test_both_layouts_hold_the_same_data():
    point = tiny_point()
    mr.add_reference_layout(point)
    layer, ref, ring = point.layer, point.ref, point.ring
    batch, kv_heads, n_keys, _ = layer.k.shape
    for b in range(batch):
        for pos in (0, 17, n_keys - 2):
            token = ref["req_to_token"][b, pos]
            assert torch.equal(ref["k_buffer"][token], layer.k[b, :, pos])
            assert torch.equal(ref["v_buffer"][token], layer.v[b, :, pos])
        current = ref["out_cache_loc"][b]
        assert torch.equal(ref["k_buffer"][current], layer.k[b, :, n_keys - 1])
    assert ref["past_lens"].tolist() == [n_keys - 1] * batch
    assert torch.equal(ref["query_cache"], ring.q.transpose(1, 2))
    assert torch.equal(ref["attn_cache"], ring.o.transpose(1, 2).to(torch.bfloat16))
    assert torch.equal(ref["lse_cache"], ring.lse.transpose(1, 2))
    assert all(x.is_contiguous() for x in ref.values() if isinstance(x, torch.Tensor))


def test_shared_kv_views_read_the_pool():
    point = tiny_point()
    k, v = point.layer.k.clone(), point.layer.v.clone()
    mr.add_reference_layout(point, share_kv=True)
    assert torch.equal(point.layer.k, k) and torch.equal(point.layer.v, v)
    assert point.layer.k.untyped_storage().data_ptr() == \
        point.ref["k_buffer"].untyped_storage().data_ptr()
    assert "view" in point.kv_layout


def test_planted_slot_holds_the_exact_prefix_state():
    point = tiny_point()
    t, lag, offset = point.past_len, 3, 4
    assert point.slot == (t - lag) % 16
    want_o, want_lse, _ = mr.exact_states(point.layer, mr.prefix_end(t - lag, offset))
    torch.testing.assert_close(point.ring.o[:, :, point.slot], want_o)
    torch.testing.assert_close(point.ring.lse[:, :, point.slot], want_lse)
    hits = torch.tensor([[True, False, True, True], [False, False, True, False]])
    mr.plant_hits(point, hits)
    planted = point.ring.q[:, :, point.slot]
    assert torch.equal(planted[hits], point.layer.q_pre[hits])
    assert torch.equal(planted[~hits], point.far[~hits])


@pytest.mark.parametrize("rate", [1.0, 0.5, 0.0])
def test_the_model_of_the_op_is_exact_and_decides_the_pattern(rate):
    point = tiny_point(q_heads=8, kv_heads=1, batch=2)  # gqa8
    mr.add_reference_layout(point)
    predicted = mr.synthetic_hits(2, 8, point.past_len, rate)
    record, decided = mr.measure_reference(mr.EmulatedReference(), point, rate, predicted)
    assert record["status"] == "ok" and record["correct"] and record["rel_err"] < 1e-2
    assert record["decisions_match"] and torch.equal(decided, predicted)
    # The entry written for t (slot t mod M): the state over [0, E(t)).
    t = point.past_len
    want_o, want_lse, _ = mr.exact_states(point.layer, mr.prefix_end(t, 4))
    torch.testing.assert_close(point.ref["lse_cache"][:, t % 16], want_lse)
    torch.testing.assert_close(point.ref["attn_cache"][:, t % 16].float(), want_o, atol=1e-2,
                               rtol=1e-2)


def test_the_model_refuses_what_the_reference_refuses():
    point = tiny_point()
    mr.add_reference_layout(point)
    args = list(mr.reference_args(point, 1.0))
    with pytest.raises(TypeError, match="68 arguments"):
        mr.EmulatedReference().mac_persistent_decode_bf16(*args[:-1])
    args[2] = args[2].float()  # k_buffer must be bf16
    with pytest.raises(ValueError, match="k_buffer"):
        mr.EmulatedReference().mac_persistent_decode_bf16(*args)


def test_a_wrong_output_is_not_timed():
    point = tiny_point()
    mr.add_reference_layout(point)

    class Silent:  # writes nothing: the poisoned output stays NaN
        def mac_persistent_decode_bf16(self, *args):
            pass

    record, _ = mr.measure_reference(Silent(), point, 1.0, mr.synthetic_hits(2, 4, 40, 1.0))
    assert record["status"] == "wrong" and "median_ms" not in record


def test_the_mac_step_decides_the_planted_pattern_and_is_exact():
    point = tiny_point()
    hits = mr.synthetic_hits(2, 4, point.past_len, 0.5)
    record = mr.measure_mac_step(point, 0.5, hits, time_it=False)
    assert record["status"] == "ok" and record["decisions_match"]
    assert record["achieved_hit_rate"] == 0.5
    assert record["mean_keys_read"] == (3 + 4 + 41) / 2  # hits: band + tail; misses: all keys


def test_workspace_matches_the_launchers_checks():
    config = mr.RefBenchConfig()
    ws = mr.reference_workspace(config, 16, 32, 8, torch.device("cpu"))
    assert len(ws) == mr.EmulatedReference.N_WORKSPACE
    assert ws[0].shape == (16, 32, 2048 // 32)  # match tiles
    assert ws[23].shape == (16, 8, 131072 // 32, 4, 128) and ws[23].dtype == torch.float32
    assert ws[25].shape[2] * 32 * 32 >= 131072  # reduced rect tiles
    assert ws[16].numel() == 16 * 32 * 4096 and ws[22].numel() == 9
    assert ws[29].dtype == torch.int64 and ws[29].numel() >= 6


def test_compile_flags_name_one_target():
    cuda, cxx = mr.compile_flags("90a")
    assert "-gencode=arch=compute_90a,code=sm_90a" in cuda and "--use_fast_math" in cuda
    assert ["-Xptxas", "-dlcm=cg"] == cuda[cuda.index("-Xptxas"):][:2]
    assert "--use_fast_math" not in mr.compile_flags("90a", fast_math=False)[0]
    assert cxx == ["-O3", "-std=c++17"]


def test_shim_header_is_written_once(tmp_path):
    root = mr.write_shim(tmp_path)
    header = root / "ATen" / "cuda" / "CUDAContext.h"
    stamp = header.stat().st_mtime_ns
    assert mr.write_shim(tmp_path) == root and header.stat().st_mtime_ns == stamp
    assert "#include <c10/cuda/CUDAStream.h>" in header.read_text()


def test_layouts_and_validation():
    assert mr._parse_layouts("32/8, 32/4") == ((32, 8), (32, 4))
    with pytest.raises(Exception, match="32/8"):
        mr._parse_layouts("32x8")
    with pytest.raises(ValueError, match="offset"):
        mr.validate(mr.RefBenchConfig(contexts=(100,), offset=64, lag=64))


def test_command_line_writes_both_phases(tmp_path):
    path = tmp_path / "ref.json"
    code = cli.main(["bench", "mac-reference", "--emulate-reference", "--device", "cpu",
                     "--layouts", "4/2", "--batches", "1", "--contexts", "40",
                     "--ring-size", "16", "--offset", "4", "--lag", "3", "--hit-rates", "1,0",
                     "--warmup-ms", "0", "--rep-ms", "0", "--json", str(path)])
    assert code == 0
    report = json.loads(path.read_text())
    phases = {(r["phase"], r["variant"], r.get("hit_rate")): r for r in report["records"]}
    for rate in (1.0, 0.0):
        ref, again = phases[("reference", "reference", rate)], phases[("reference", "mac", rate)]
        assert ref["status"] == again["status"] == "ok" and ref["decisions_match"]
        assert again["ratio_vs_reference"] == again["median_ms"] / ref["median_ms"]
    assert phases[("macopt", "exact", None)]["correct"]
    assert report["build"]["status"].startswith("emulated")
    assert mr.table(report).row_count == 2


def test_reuses_the_mac_bench_helpers():
    # The layer, the MAC step and the timing are mac.py's: one definition of each.
    point = tiny_point()
    assert isinstance(point.layer, mac.Layer)
    assert point.mac_config.offset == 4 and point.mac_config.ring_size == 16


def test_a_failed_build_is_reported_with_its_log(tmp_path):
    # The child process's code string runs for real; the source is missing, so it fails.
    config = mr.RefBenchConfig(source_dir=tmp_path / "no-source", build_dir=tmp_path / "build",
                               arch="90a", build_timeout_s=120, **TINY)
    state = mr.Run(config, None, echo=lambda *a: None)
    log = tmp_path / "build.log"
    state.report["build"] = {"status": "building", "started_s": 0.0}
    child = mr.start_build(config, log)
    assert mr._finish_build(child, config, state, log, echo=lambda *a: None) is None
    assert state.report["build"]["status"] == "failed (exit 1)"
    assert "mac_decode_persistent.cu not found" in state.report["build"]["log_tail"]


def test_help_renders(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "mac-reference", "--help"])
    assert exit_info.value.code == 0 and "--budget-s" in capsys.readouterr().out
