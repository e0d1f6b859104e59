"""MACTopKPhiConfig: composition of the two configs, JSON round trip, validation errors."""

from __future__ import annotations

import json

import pytest

import macopt
from macopt.config import MACConfig, MACTopKPhiConfig, MethodConfig, TopKPhiConfig


def test_defaults_are_both_methods_defaults():
    config = MACTopKPhiConfig()
    assert (config.mac, config.topk_phi) == (MACConfig(), TopKPhiConfig())
    assert config.method == "mac_topk_phi" and config.needs_pre_rope_query and config.keeps_state
    assert macopt.MACTopKPhiConfig is MACTopKPhiConfig


@pytest.mark.parametrize("offset, tail, summary_tail", [(256, 16, 256), (8, 16, 16), (0, 0, 0)])
def test_the_summary_tail_is_at_least_the_offset(offset, tail, summary_tail):
    config = MACTopKPhiConfig(MACConfig(offset=offset), TopKPhiConfig(tail=tail))
    assert config.summary_tail == summary_tail


def test_round_trips_through_json_and_stays_hashable():
    config = MACTopKPhiConfig(
        MACConfig(ring_size=64, offset=128, tau=0.3, t_min=0, batch_capacity=2),
        TopKPhiConfig(budget=0.05, selector="exact", completion_overrides={1: {0: False}}))
    data = json.loads(json.dumps(config.to_dict()))
    assert data["method"] == "mac_topk_phi" and data["mac"]["method"] == "mac"
    back = MethodConfig.from_dict(data)
    assert back == config and hash(back) == hash(config)
    assert back.cache_key() == config.cache_key()
    assert MACTopKPhiConfig(MACConfig(tau=0.2)).cache_key() != MACTopKPhiConfig().cache_key()


def test_parts_may_be_given_as_dicts_without_their_method_name():
    config = MACTopKPhiConfig(mac={"tau": 0.3}, topk_phi={"budget": 64})
    assert config.mac == MACConfig(tau=0.3) and config.topk_phi == TopKPhiConfig(budget=64)


def test_mac_sinks_are_refused_because_topk_phi_sinks_cover_them():
    with pytest.raises(ValueError, match=r"MACTopKPhiConfig\.mac\.sinks: expected 0"):
        MACTopKPhiConfig(mac=MACConfig(sinks=4))


@pytest.mark.parametrize("field, value, named", [
    ("mac", TopKPhiConfig(), r"MACTopKPhiConfig\.mac: expected a MACConfig"),
    ("topk_phi", 0.02, r"MACTopKPhiConfig\.topk_phi: expected a TopKPhiConfig"),
    ("mac", {"method": "topk_phi"}, r"MACTopKPhiConfig\.mac: expected a 'mac' config"),
])
def test_a_part_of_the_wrong_kind_is_refused_naming_it(field, value, named):
    with pytest.raises(ValueError, match=named):
        MACTopKPhiConfig(**{field: value})


def test_a_parts_own_validation_still_applies():
    with pytest.raises(ValueError, match=r"TopKPhiConfig\.selector"):
        MACTopKPhiConfig(topk_phi={"selector": "quest"})
    with pytest.raises(ValueError, match=r"MACConfig\.tau"):
        MethodConfig.from_dict({"method": "mac_topk_phi", "mac": {"tau": 2.0}})
