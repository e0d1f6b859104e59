"""Per-head completion switches decided at calibration (macopt.phi_switch), tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from model_zoo import ZOO

from macopt import cli
from macopt.calibrate_phi import CalibrationConfig, calibrate_feature_maps, capture_attention
from macopt.config import TopKPhiConfig
from macopt.kernels.feature_maps import load_feature_maps, save_feature_maps
from macopt.phi_files import calibrated_tokens, file_metadata, recorded_switch
from macopt.phi_switch import decide_switch, write_switch


def _at(budget: float) -> TopKPhiConfig:
    return TopKPhiConfig(sinks=1, tail=2, selector="exact", budget=budget, budget_floor=0)


@pytest.fixture(scope="module")
def captured():
    ids = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(0))
    return capture_attention(ZOO["llama"].build(), ids, values=True)


@pytest.fixture(scope="module")
def maps(captured):
    return calibrate_feature_maps(captured, CalibrationConfig(d_phi=32))[0]


def _file(maps, path, log_mass_shift=0.0):
    if log_mass_shift:
        maps = {name: _shifted(m, log_mass_shift) for name, m in maps.items()}
    save_feature_maps(maps, path)
    return path


def _shifted(module, shift):
    import copy

    module = copy.deepcopy(module)
    with torch.no_grad():
        module.phi_k.b_o += shift  # every key feature e^shift larger: the rest's mass too
    return module


def test_the_completion_stays_where_it_lowers_the_error(captured, maps, tmp_path):
    # Random weights attend nearly uniformly: at half the keys the rest still holds about half
    # the mass, which the calibrated maps estimate.
    switch = decide_switch(captured, _file(maps, tmp_path / "phi.st"), _at(0.5))
    assert switch == {0: [True] * 4, 1: [True] * 4}


def test_maps_that_overstate_the_rest_are_switched_off(captured, maps, tmp_path):
    # The same maps with the rest's mass inflated e^12 times make every head worse than
    # Top-K alone over the same selection.
    path = _file(maps, tmp_path / "phi.st", log_mass_shift=12.0)
    switch = decide_switch(captured, path, _at(0.5))
    assert switch == {0: [False] * 4, 1: [False] * 4}


def test_nothing_left_to_complete_switches_every_head_off(captured, maps, tmp_path):
    # A budget covering every key leaves the completion no remainder: a tie, kept off.
    path = _file(maps, tmp_path / "phi.st")
    switch = decide_switch(captured, path, _at(1.0))
    assert switch == {0: [False] * 4, 1: [False] * 4}


def test_a_recorded_switch_is_what_the_default_completion_follows(maps, tmp_path):
    path = _file(maps, tmp_path / "phi.st")
    assert recorded_switch(path) is None  # no record: every head completes
    assert TopKPhiConfig(feature_maps=str(path)).completion_for(1, 4) == (True,) * 4
    write_switch(path, {0: [True, False, True, False], 1: [False] * 4})
    assert set(load_feature_maps(path)) == {"layer.0", "layer.1"}  # the maps are kept
    config = TopKPhiConfig(feature_maps=str(path))
    assert config.completion_for(0, 4) == (True, False, True, False)
    assert config.completion_for(1, 4) == (False,) * 4
    assert "where calibration measured it helps" in config.completion_source()
    # explicit settings win over the record
    assert TopKPhiConfig(feature_maps=str(path), completion=True).completion_for(1, 4) == (
        True,) * 4
    overridden = TopKPhiConfig(feature_maps=str(path), completion=True,
                               completion_overrides={0: {1: False}})
    assert overridden.completion_for(0, 4) == (True, False, True, True)
    with pytest.raises(ValueError, match="switch for 4 query heads at layer 0"):
        config.completion_for(0, 8)


def test_cli_records_the_switch_unless_told_not_to(tmp_path):
    from test_calibrate_phi import _model_and_text

    model, text = _model_and_text(tmp_path)
    out = tmp_path / "phi.safetensors"
    argv = ["calibrate", str(model), "--method", "topk_phi", "--text", str(text),
            "--seq-len", "128", "--sequences", "2", "--d-phi", "8", "--out", str(out),
            "--device", "cpu", "--dtype", "float32"]
    assert cli.main(argv + ["--switch-budget", "0.1"]) == 0
    switch = recorded_switch(out)
    assert switch is not None and set(switch) == {0, 1}
    assert all(len(flags) == 4 for flags in switch.values())
    assert calibrated_tokens(out) == 128  # the other metadata survives the record
    assert file_metadata(out)["macopt.completion_budget"] == "0.1"
    assert cli.main(argv + ["--switch-budget", "0", "--force"]) == 0
    assert recorded_switch(out) is None

