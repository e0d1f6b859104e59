"""Decisions at single SDPA sites of plain modules (through the ``macopt_eager`` path):
what is rewritten gives SDPA's numbers; what cannot be proven exact is left and reported."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import macopt

B, H, N, D = 2, 2, 8, 64


class Attention(torch.nn.Module):
    def __init__(self, is_causal: bool = False, additive_from_bool: bool = False):
        super().__init__()
        self.is_causal, self.additive_from_bool = is_causal, additive_from_bool

    def forward(self, q, k, v, mask):
        if self.additive_from_bool:  # the 0/-inf mask Hugging Face and aten build
            mask = torch.where(mask, 0.0, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.is_causal)


class Model(torch.nn.Module):
    """Dynamo records submodules (not the compiled root) in nn_module_stack."""

    def __init__(self, attention: Attention):
        super().__init__()
        self.attn = attention

    def forward(self, *args):
        return self.attn(*args)


def _run(attention, q_len=1, mask_fn=None):
    module = Model(attention)
    torch.manual_seed(0)
    q, k, v = torch.randn(B, H, q_len, D), torch.randn(B, H, N, D), torch.randn(B, H, N, D)
    keep = torch.rand(B, 1, 1, N) > 0.3
    keep[..., 0] = True
    mask = mask_fn(keep) if mask_fn else None
    compiled = torch.compile(module, backend=macopt.backend(macopt.ExactConfig(), inductor=False))
    torch._dynamo.reset()
    got, want = compiled(q, k, v, mask), module(q, k, v, mask)
    (report,) = macopt.explain(module)
    return report, got, want


@pytest.mark.parametrize(("mask_fn", "additive"), [(None, False), (lambda k: k, False),
                                                  (lambda k: k, True)],
                         ids=["no-mask", "bool", "where-0-inf"])
def test_key_selecting_masks_are_rewritten_exactly(mask_fn, additive):
    report, got, want = _run(Attention(additive_from_bool=additive), mask_fn=mask_fn)
    assert report.decision == "rewritten"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_float_mask_from_graph_inputs_is_not_provable_so_left():
    where = lambda keep: torch.where(keep, torch.zeros(()), torch.full((), float("-inf")))  # noqa: E731
    report, _, _ = _run(Attention(), mask_fn=where)
    assert report.decision == "skipped" and "not provably 0/-inf" in report.reason


def test_additive_float_mask_is_left_with_its_reason():
    report, got, want = _run(Attention(), mask_fn=lambda keep: torch.randn(B, 1, 1, N))
    assert report.decision == "skipped" and "additive float attention mask" in report.reason
    torch.testing.assert_close(got, want)


def test_is_causal_with_one_query_is_left_because_sdpa_aligns_it_top_left():
    report, got, want = _run(Attention(is_causal=True))
    assert report.decision == "skipped" and "is_causal" in report.reason
    torch.testing.assert_close(got, want)


def test_query_longer_than_one_is_a_prefill_site_kept_as_is():
    report, _, _ = _run(Attention(), q_len=4, mask_fn=lambda keep: keep)
    assert (report.phase, report.decision) == ("prefill", "kept")
