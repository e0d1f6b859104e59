"""Issue 17, B6: bad input is refused up front, with an error naming it (configs, patch, ops)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from model_zoo import ZOO

import macopt
from macopt.cli import main
from macopt.topk_phi_ops import allocate_state


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    ZOO["llama"].build().save_pretrained(path)
    return path


@pytest.mark.parametrize("kwargs, named", [
    ({"ring_size": 10**9}, "ring_size"),
])
def test_mac_config_refuses_a_ring_it_cannot_allocate(kwargs, named):
    with pytest.raises(ValueError, match=named):
        macopt.MACConfig(**kwargs)


@pytest.mark.parametrize("kwargs, named", [
    ({"feature_maps": 123}, "feature_maps"),
    ({"seed": "x"}, "seed"),
])
def test_topk_phi_config_refuses_wrong_types(kwargs, named):
    with pytest.raises(ValueError, match=named):
        macopt.TopKPhiConfig(**kwargs)


def _corrupt_phi_file(tmp_path):
    path = tmp_path / "phi.safetensors"
    path.write_bytes(b"not a safetensors file")
    return path


@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_patch_refuses_a_phi_file_that_does_not_load(llama_dir, tmp_path, capsys, problem):
    phi = tmp_path / "absent.safetensors" if problem == "missing" else _corrupt_phi_file(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"method": "topk_phi", "feature_maps": str(phi)}))
    out = tmp_path / "patched"
    assert main(["patch", str(llama_dir), "--config", str(config), "--out", str(out)]) == 2
    assert not out.exists()
    assert phi.name in capsys.readouterr().out.replace("\n", "")


def test_a_corrupt_phi_file_is_named_when_a_site_loads_it(tmp_path):
    phi = _corrupt_phi_file(tmp_path)
    k = torch.zeros(1, 2, 64, 64)
    with pytest.raises(ValueError, match="phi.safetensors"):
        allocate_state(1, 0, 4, k, True, 32, 0, [True] * 4, str(phi), 0)


def _decode_problem():
    q = torch.randn(2, 4, 64)
    k, v = torch.randn(2, 2, 16, 64), torch.randn(2, 2, 16, 64)
    return q, k, v


@pytest.mark.parametrize("starts, ends, named", [
    ([0, 0], [16, 17], "ends"),
    ([-1, 0], [16, 16], "starts"),
])
def test_decode_op_refuses_a_key_range_outside_the_cache(starts, ends, named):
    q, k, v = _decode_problem()
    with pytest.raises(ValueError, match=named):
        torch.ops.macopt.decode_attention(q, k, v, torch.tensor(starts), torch.tensor(ends),
                                          None, 0.125)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_decode_op_refuses_a_scale_that_is_not_a_finite_number(scale):
    q, k, v = _decode_problem()
    full = torch.tensor([16, 16])
    with pytest.raises(ValueError, match="scale"):
        torch.ops.macopt.decode_attention(q, k, v, torch.zeros(2, dtype=torch.int64), full,
                                          None, scale)
