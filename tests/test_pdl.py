"""The programmatic-dependent-launch switch (kernels/pdl.py); the launches themselves are
checked on the GPU (tests/test_gpu_mac.py)."""

import torch

from macopt.kernels.pdl import pdl_enabled, pdl_launch_options


def test_pdl_is_off_on_the_cpu_and_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("MACOPT_PDL", "1")
    assert not pdl_enabled(torch.device("cpu"))
    assert pdl_launch_options(torch.device("cpu")) == {}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl_enabled(torch.device("cuda", 0))


def test_pdl_can_be_turned_off_by_the_environment(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("MACOPT_PDL", "0")
    assert not pdl_enabled(torch.device("cuda", 0))
    assert pdl_launch_options(torch.device("cuda", 0)) == {}
