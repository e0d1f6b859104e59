"""examples/topk_phi_fidelity.py's core on CPU at toy sizes: its outputs are the decode op's,
budgets are matched, the switch never picks a worse variant on its own data, and the whole
measurement runs on a tiny random Llama."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from model_zoo import ZOO

from macopt.calibrate_phi import CalibrationConfig
from macopt.config import TopKPhiConfig
from macopt.kernels.feature_maps import positive_random_features
from macopt.topk_phi_select import summary_token_equivalent
from macopt.topk_phi_state import TopKPhiState, decode, prefill

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "topk_phi_fidelity.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("topk_phi_fidelity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


fid = _load_script()
N_KEYS, POSITIONS = 160, (70, 121, 159)


def _window(std: float = 0.6) -> object:
    gen = torch.Generator().manual_seed(0)
    q = std * torch.randn(len(POSITIONS), 4, 64, generator=gen)
    k = std * torch.randn(2, N_KEYS, 64, generator=gen)
    v = torch.randn(2, N_KEYS, 64, generator=gen)
    return fid.Window(q, k, v, 64**-0.5, torch.tensor(POSITIONS))


def _maps_with_mlp():
    maps = positive_random_features(4, 2, 64, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a calibrated-looking map: the MLP branch switched on
        maps.phi_q.alpha.fill_(0.5)
        maps.phi_k.alpha.fill_(0.3)
    return maps


@pytest.mark.parametrize("selector", ["exact", "page"])
def test_outputs_equal_the_decode_op(selector):
    w, maps = _window(), _maps_with_mlp()
    page = 16 if selector == "page" else None
    budgets = {selector: [fid.Budget(0.2, 32, 32, 16), fid.Budget(0.5, 80, 80, 48)]}
    _, outputs, _ = fid.layer_outputs(w, {"phi_cal": maps}, budgets, 4, 8, 16)
    rows = len(POSITIONS)
    k, v = w.k[None].expand(rows, -1, -1, -1), w.v[None].expand(rows, -1, -1, -1)
    starts, ends = torch.zeros(rows, dtype=torch.int32), (w.positions + 1).int()
    for fraction, n_retrieved, variant in [(0.2, 32, "topk"), (0.2, 16, "phi_cal"),
                                           (0.5, 48, "topk_same_k"), (0.5, 48, "phi_cal")]:
        on = variant == "phi_cal"
        config = TopKPhiConfig(sinks=4, tail=8, budget=n_retrieved, page_size=16,
                               selector=selector)
        state = TopKPhiState.allocate(rows, 4, 2, N_KEYS, 64, torch.float32, "cpu",
                                      page_size=page, maps=maps, completion=(on,) * 4)
        prefill(state, k, v, starts, ends, config)
        expected = decode(state, w.q, k, v, starts, ends, w.scale, config)
        torch.testing.assert_close(outputs[(selector, fraction, variant)], expected,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("selector", ["exact", "page"])
def test_errors_vanish_when_the_budget_covers_the_context(selector):
    w = _window()
    page = 16 if selector == "page" else None
    budget = fid.matched_budget(1.0, N_KEYS, 0.0, page)  # no summary cost: all retrieved
    maps = {"phi_init": positive_random_features(4, 2, 64, 16)}
    full, outputs, _ = fid.layer_outputs(w, maps, {selector: [budget]}, 4, 8, 16)
    for variant in ("topk", "phi_init"):
        error = fid.l1_sums(outputs[(selector, 1.0, variant)], full).relative_l1()
        assert max(error) < 1e-5, variant


def test_small_budgets_have_error_and_entropy_is_at_most_log_keys():
    w = _window()
    full, outputs, entropy = fid.layer_outputs(
        w, {}, {"exact": [fid.matched_budget(0.05, N_KEYS, 4.0, None)]}, 4, 8, 16)
    assert min(fid.l1_sums(outputs[("exact", 0.05, "topk")], full).relative_l1()) > 0.01
    assert entropy.shape == (3, 4)
    assert bool((entropy <= torch.log(w.positions[:, None] + 1.0) + 1e-4).all())


def test_matched_budgets_charge_the_summary_to_top_k_plus_phi():
    summary = summary_token_equivalent(128, 128, 2)
    assert summary == pytest.approx(130.0)
    exact = fid.matched_budget(0.05, 8192, summary, None)
    assert (exact.tokens, exact.topk_k, exact.phi_k) == (410, 410, 280)
    assert exact.phi_k + summary <= exact.tokens == math.ceil(0.05 * 8192)
    page = fid.matched_budget(0.05, 8192, summary, 32)
    assert (page.topk_k, page.phi_k) == (416, 288)  # whole pages, rounded up as the op does
    assert fid.matched_budget(0.01, 8192, summary, None).phi_k is None  # summary > budget
    assert fid.matched_budget(0.02, 8192, summary, 32).phi_k == 64  # ceil((164 - 130) / 32)
    assert fid.matched_budget(0.01, 8192, 2.03, None).phi_k == 79  # the summary's 3 tokens


def test_switch_never_picks_a_worse_variant_on_its_calibration_data():
    gen = torch.Generator().manual_seed(0)
    topk, same_k, phi = (torch.rand(3, 8, generator=gen).tolist() for _ in range(3))
    switch = fid.decide_switch(topk, same_k, phi, group=4)
    per_head, per_group = fid.switched_errors(switch, topk, same_k, phi, group=4)
    for layer in range(3):
        for head in range(8):
            best = min(phi[layer][head], same_k[layer][head])
            assert per_head[layer][head] == best
            assert switch.completion[layer][head] == (phi[layer][head] < same_k[layer][head])
        for g in range(2):
            heads = range(4 * g, 4 * g + 4)
            own = [per_head[layer][h] for h in heads]
            keeps = (any(switch.completion[layer][h] for h in heads)
                     and all(e <= topk[layer][h] for e, h in zip(own, heads, strict=True)))
            assert switch.use_summary[layer][g] == keeps
            best = own if keeps else [topk[layer][h] for h in heads]
            assert [per_group[layer][h] for h in heads] == best
            assert all(per_group[layer][h] <= topk[layer][h] for h in heads)
    overrides = switch.overrides()
    config = TopKPhiConfig(completion_overrides=overrides)
    assert list(config.completion_for(1, 8)) == switch.completion[1]


def test_measurement_runs_on_a_tiny_random_llama():
    model = ZOO["llama"].build().model  # 2 layers, 4 query / 2 KV heads, head dim 64
    rows = torch.randint(1, 256, (2, 96), generator=torch.Generator().manual_seed(0))
    positions = fid.decode_positions(96, 3)
    assert positions.tolist() == [48, 72, 95]
    windows = fid.capture_windows(model, rows, positions)
    assert windows[0][1].q.shape == (3, 4, 64) and windows[0][1].v.shape == (2, 96, 64)
    config = CalibrationConfig(d_phi=16, tail=8)
    init = fid.random_feature_maps(2, 4, 2, 64, config)
    budgets = {s: [fid.matched_budget(f, 96, 4.0, 8 if s == "page" else None)
                   for f in (0.2, 0.5)] for s in fid.SELECTORS}
    split = fid.measure_split(windows, {"phi_init": init, "phi_cal": init}, budgets, 4, 8, 8,
                              log=lambda _: None)
    assert split.queries == 6 and len(split.entropy) == 2 and len(split.entropy[0]) == 4
    summary = fid.summarise(split, split, budgets, group=2)
    assert len(summary["rows"]) == 4 and summary["verdict"]["high_entropy_heads"] == 4
    config = {"summary_tokens": 4.0, "context": 96, "d_phi": 16}
    table = fid.markdown({"summary": summary, "evaluation": {"queries": 6}, "config": config})
    assert "| exact | 20% |" in table and "| page | 50% |" in table


def test_a_group_with_one_losing_head_drops_the_summary_for_every_head():
    # Layer 0, group 0: head 0 wins with completion; head 1 is off and, at the group's K, ties
    # Top-K at the full budget (whole pages): the group keeps the summary. Group 1: head 3 is
    # off but loses at the smaller K (0.95 > 0.8), so the whole group drops the summary.
    topk = [[1.0, 1.0, 1.0, 0.8]]
    same_k = [[1.1, 1.0, 1.1, 0.95]]
    phi = [[0.5, 1.2, 0.2, 0.99]]
    switch = fid.decide_switch(topk, same_k, phi, group=2)
    assert switch.use_summary == [[True, False]]
    assert switch.completion == [[True, False, True, False]]
    per_head, per_group = fid.switched_errors(switch, topk, same_k, phi, group=2)
    assert per_head == [[0.5, 1.0, 0.2, 0.95]]
    assert per_group == [[0.5, 1.0, 1.0, 0.8]]  # group 1: Top-K at the full budget
    config = TopKPhiConfig(completion_overrides=switch.group_overrides(2), summary_in_budget=True)
    assert config.completion_for(0, 4) == (True, False, False, False)


def test_render_resummarises_stored_errors_with_the_group_rule_and_a_deployable_config():
    budgets = {"exact": [fid.Budget(0.1, 10, 10, 7)]}
    errors = lambda t, s, p: {("exact", 0.1, v): e for v, e in  # noqa: E731
                              zip(fid.VARIANTS, (t, s, p, p), strict=True)}
    cal = fid.SplitResult(errors([[1.0, 1.0, 1.0, 0.8]], [[1.1, 1.1, 1.1, 0.95]],
                                 [[0.5, 0.9, 0.2, 0.9]]), [[3.0, 2.0, 1.0, 0.5]], 4)
    ev = fid.SplitResult(errors([[1.0, 1.0, 1.0, 0.8]], [[1.1, 1.1, 1.1, 0.9]],
                                [[0.6, 0.8, 0.3, 0.85]]), [[3.0, 2.0, 1.0, 0.5]], 4)
    config = {"group": 2, "sinks": 4, "tail": 16, "page_size": 32, "d_phi": 2}
    stored = {"budgets": {s: [vars(b) for b in bs] for s, bs in budgets.items()},
              "switch_split": fid._split_json(cal), "evaluation": fid._split_json(ev),
              "config": config, "summary": {"stale": True}}
    result = fid.resummarise(json.loads(json.dumps(stored)))
    row = result["summary"]["rows"][0]
    assert row["switch"]["use_summary"] == [[True, False]]
    deployed = TopKPhiConfig.from_dict(row["switch"]["config"])
    assert deployed.summary_in_budget and deployed.budget == 10 and deployed.d_phi == 2
    assert deployed.completion_for(0, 4) == (True, True, False, False)
    # Head 3 (low entropy) runs full Top-K in its group, so the switch half holds.
    assert result["summary"]["verdict"][
        "switch_group_not_worse_on_every_low_entropy_head_and_budget"]
