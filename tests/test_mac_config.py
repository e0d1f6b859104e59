"""MACConfig: defaults from docs/ALGORITHMS.md, validation errors that name the field."""

from __future__ import annotations

import pytest

from macopt import MACConfig, MethodConfig


def test_defaults_are_the_reference_parameters():
    config = MACConfig()
    assert (config.ring_size, config.offset, config.tau, config.t_min, config.sinks) == (
        512, 256, 0.85, 2048, 0)
    assert config.radius == "relative"
    assert config.needs_pre_rope_query and config.keeps_state


def test_round_trips_through_a_dict():
    config = MACConfig(ring_size=64, tau=1.0, t_min=0, batch_capacity=4)
    assert MethodConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(("field", "value"), [
    ("ring_size", 0), ("ring_size", 2.5), ("offset", -1), ("t_min", -1), ("sinks", -2),
    ("max_chain_depth", 0), ("ring_size", True),
])
def test_bad_ints_name_the_field_and_the_bound(field, value):
    with pytest.raises(ValueError, match=rf"MACConfig\.{field}: expected an int >= \d"):
        MACConfig(**{field: value})


@pytest.mark.parametrize("tau", [1.5, float("nan"), "0.4", float("-inf")])
def test_tau_above_one_or_not_a_number_is_refused(tau):
    with pytest.raises(ValueError, match=r"MACConfig\.tau: expected a number <= 1\.0"):
        MACConfig(tau=tau)


@pytest.mark.parametrize("capacity", [0, -1, 1.0])
def test_batch_capacity_is_none_or_positive(capacity):
    with pytest.raises(ValueError, match=r"MACConfig\.batch_capacity"):
        MACConfig(batch_capacity=capacity)


def test_tau_one_is_accepted_as_the_nothing_matches_setting():
    assert MACConfig(tau=1).tau == 1.0
