"""Test-wide setup: without a GPU, Triton kernels run through Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from macopt.passes._compat import dynamo  # noqa: E402

# CI runs on 2 slow cores; property tests are about coverage of cases, not wall-clock limits.
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo_per_module():
    """Each test module starts with no compiled code. Dynamo keeps its caches per code object
    for the whole process, and Hugging Face models share code objects (forward wrappers), so
    without this a module compiling many models pushes a later one past the recompile limit."""
    dynamo.reset()
    yield


@pytest.fixture
def isolated_scope(monkeypatch):
    """Scope's registry of live modules, empty for this test: models other tests keep alive
    (cached runs) do not count. The cache key, for one, depends on every live tag: a live
    stateful model anywhere makes graphs uncacheable (passes/manager.py)."""
    from macopt.passes import scope

    monkeypatch.setattr(scope, "_KNOWN", {})


@pytest.fixture
def graphs_run(monkeypatch) -> list:
    """Every graph the ``macopt_eager`` backend hands back to run, as it runs it."""
    from macopt import api

    seen = []
    boxed = api.make_boxed_func

    def spy(gm):  # noqa: ANN001, ANN202
        seen.append(gm)
        return boxed(gm)

    monkeypatch.setattr(api, "make_boxed_func", spy)
    return seen


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[str]:
    """The kind of every SDPA call ``causal_prefill_attention`` makes from now on: "is_causal",
    "lower_right" (a causal bias aligned bottom-right) or "mask". The spy replaces the op
    module's reference to ``torch.nn.functional`` only: dynamo, tracing transformers, must not
    see it (it would trace the spy and replay its list mutation)."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from torch.nn.attention.bias import CausalBias

    from macopt import causal_prefill_ops

    calls: list[str] = []

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        bias = kwargs.get("attn_mask")
        calls.append("is_causal" if kwargs.get("is_causal") else
                     "lower_right" if isinstance(bias, CausalBias) else "mask")
        return F.scaled_dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(causal_prefill_ops, "F",
                        SimpleNamespace(scaled_dot_product_attention=spy))
    return calls
