"""TopKPhiConfig: defaults, budget resolution, per-head completion switches, validation."""

import json

import pytest

from macopt.config import MethodConfig, TopKPhiConfig, check_budget_args, resolve_budget


def test_defaults_are_the_papers_but_for_the_sketch_selector():
    # The paper ranks by exact scores; the default sketch keeps ~99% of that mass at a
    # fraction of the reads (docs/SAFE_DEFAULTS.md 6, 8) and, on the GPU, the same answers on
    # a real model (BENCHMARKS.md 15).
    config = TopKPhiConfig()
    assert (config.sinks, config.tail, config.selector) == (4, 16, "sketch")
    assert config.method == "topk_phi" and not config.needs_pre_rope_query


def test_the_completion_is_on_by_default_only_with_calibrated_maps():
    # Data-free random features estimate SmolLM2's unselected mass e^6-e^13 too small
    # (docs/REAL_MODEL.md): without a maps file the default is Top-K alone.
    assert TopKPhiConfig().completion_for(0, 3) == (False,) * 3
    assert TopKPhiConfig(feature_maps="phi.safetensors").completion_for(0, 3) == (True,) * 3
    assert TopKPhiConfig(completion=True).completion_for(0, 3) == (True,) * 3
    assert TopKPhiConfig(completion=False, feature_maps="phi.safetensors").completion_for(
        0, 3) == (False,) * 3
    # macopt.stats gives each site this line: a user sees why the completion is off
    assert TopKPhiConfig().completion_source().startswith("off: no calibrated maps file")
    assert TopKPhiConfig(completion=False).completion_source().startswith("off: completion=False")


@pytest.mark.parametrize("budget, n_keys, expected", [
    (64, 131072, 64), (0.01, 131072, 1311), (0.02, 8192, 164), (1.0, 100, 100), (1e-9, 100, 1),
])
def test_budget_is_tokens_or_a_fraction_rounded_up(budget, n_keys, expected):
    assert TopKPhiConfig(budget=budget, budget_floor=0).budget_tokens(n_keys) == expected


@pytest.mark.parametrize("budget, floor, n_keys, expected", [
    (0.02, 512, 4096, 512), (0.02, 512, 131072, 2622), (0.02, 512, 25600, 512),
    (0.02, 512, 25601, 513), (64, 512, 4096, 64), (0.5, 512, 100, 512), (0.02, 0, 4096, 82),
])
def test_a_fraction_retrieves_at_least_the_floor_and_tokens_ignore_it(budget, floor, n_keys,
                                                                     expected):
    config = TopKPhiConfig(budget=budget, budget_floor=floor)
    assert config.budget_tokens(n_keys) == expected
    # the decode ops resolve the same K from the (floor, fraction) pair they are given
    assert resolve_budget(*config.budget_args(), n_keys) == expected


def test_the_default_budget_floor_is_512_keys_and_a_bad_floor_is_named():
    assert TopKPhiConfig().budget_tokens(2048) == 512
    with pytest.raises(ValueError, match="budget_floor"):
        TopKPhiConfig(budget_floor=-1)
    with pytest.raises(ValueError, match="floor"):
        check_budget_args(-1, 0.02)


def test_completion_overrides_switch_whole_layers_or_single_heads():
    config = TopKPhiConfig(completion=True,
                           completion_overrides={1: False, 2: {0: False, 3: False}})
    assert config.completion_for(0, 4) == (True,) * 4
    assert config.completion_for(1, 4) == (False,) * 4
    assert config.completion_for(2, 4) == (False, True, True, False)


def test_completion_default_off_with_heads_switched_on():
    config = TopKPhiConfig(completion=False, completion_overrides={0: {1: True}})
    assert config.completion_for(0, 3) == (False, True, False)
    assert config.completion_for(5, 2) == (False, False)


def test_config_survives_json_and_stays_hashable():
    config = TopKPhiConfig(budget=128, selector="exact", d_phi=64,
                           completion_overrides={3: {5: False}, 0: False})
    again = MethodConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and hash(again) == hash(config)
    assert config.cache_key() != TopKPhiConfig().cache_key()


@pytest.mark.parametrize("fields, message", [
    ({"budget": 0}, "K must be >= 1"),
    ({"budget": 1.5}, "fraction must lie in"),
    ({"budget": True}, "budget: expected"),
    ({"selector": "quest"}, "selector"),
    ({"page_size": 24}, "power of two"),
    ({"page_size": 0}, "page_size"),
    ({"sinks": -1}, "sinks"),
    ({"d_phi": 7}, "even"),
    ({"completion": 1}, "completion: expected a bool or None"),
    ({"completion_overrides": {-1: False}}, "layer index"),
    ({"completion_overrides": {0: {1: "no"}}}, "expected a bool"),
    ({"completion_overrides": [(0, False), (0, True)]}, "listed twice"),
    ({"completion_overrides": [0]}, "expected \\(index, setting\\)"),
])
def test_bad_fields_raise_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        TopKPhiConfig(**fields)


def test_head_override_past_the_layer_heads_is_an_error():
    with pytest.raises(ValueError, match="has 4 query heads, got head 9"):
        TopKPhiConfig(completion_overrides={0: {9: False}}).completion_for(0, 4)
