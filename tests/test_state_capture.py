"""A site state that a CUDA graph reads is never reallocated: the graph would replay on freed
memory. Capture is simulated (CPU CI has no CUDA graphs) by patching ``state.capturing``."""

from __future__ import annotations

import threading

import pytest
import torch

from macopt import state, topk_phi_ops

SITE = 987_654  # a site id no model in this process uses


@pytest.fixture(autouse=True)
def _release():
    yield
    state.release(SITE)


def _allocate():
    return [torch.zeros(3)], torch.zeros(2, dtype=torch.int64)


def test_an_uncaptured_state_is_reallocated_for_a_new_spec():
    first = state.site_state(SITE, "demo", ("a",), _allocate)
    second = state.site_state(SITE, "demo", ("b",), _allocate)
    assert second is not first and second.spec == ("b",)
    assert not second.captured


def test_a_captured_state_refuses_a_new_spec_and_keeps_its_buffers(monkeypatch):
    first = state.site_state(SITE, "demo", ("a",), _allocate)
    monkeypatch.setattr(state, "capturing", lambda: True)
    assert state.get(SITE) is first  # a decode op reads it while a graph records
    monkeypatch.setattr(state, "capturing", lambda: False)
    assert first.captured
    with pytest.raises(RuntimeError, match="recorded into a CUDA graph"):
        state.site_state(SITE, "demo", ("b",), _allocate)
    assert state.get(SITE) is first  # untouched
    assert state.site_state(SITE, "demo", ("a",), _allocate) is first  # same spec: fine


def test_topk_phi_state_of_a_captured_site_refuses_another_prompt_length(monkeypatch):
    # A dynamic cache sizes the Top-K + phi state by the prompt: a second sequence with another
    # prompt length needs a new state, which a recorded decode graph would never see.
    def buffers(n_keys: int):
        k = torch.zeros(1, 2, n_keys, 16)
        return topk_phi_ops.site_state(SITE, 0, 4, k, True, 8, 4, [True] * 4, "", 0).buffers

    first = buffers(64)
    monkeypatch.setattr(state, "capturing", lambda: True)
    assert state.get(SITE).buffers is first
    monkeypatch.setattr(state, "capturing", lambda: False)
    assert buffers(64) is first  # the same prompt length reuses the state
    with pytest.raises(RuntimeError, match="static cache"):
        buffers(80)


def test_with_cuda_in_use_a_state_is_allocated_on_a_thread_of_its_own(monkeypatch):
    # A CUDA-graph tree's warm-up routes its thread's allocations into the graphs' pool, where
    # a state would stay alive untracked (BENCHMARKS.md 22; tests/test_gpu_mac.py checks it on
    # a GPU). Here: the allocation leaves the caller's thread and its errors come back.
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(state, "capturing", lambda: False)
    caller, threads = threading.get_ident(), []
    # The caller's queued work ends first: the allocation may read what it writes.
    monkeypatch.setattr(torch.cuda, "synchronize",
                        lambda device=None: threads.append(("sync", threading.get_ident())))

    def allocate():
        threads.append(threading.get_ident())
        return _allocate()

    site = state.site_state(SITE, "demo", ("a",), allocate)
    assert threads[0] == ("sync", caller) and threads[1] != caller
    assert torch.equal(site.counters, torch.zeros(2, dtype=torch.int64))

    def refuse():
        raise ValueError("no memory for this demo")

    with pytest.raises(ValueError, match="no memory for this demo"):
        state.site_state(SITE, "demo", ("b",), refuse)
