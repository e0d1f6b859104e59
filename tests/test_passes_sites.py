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


def _efficient_attention_graph(key_len: int, pad: bool) -> torch.fx.Graph:
    """The graph SDPA's CUDA dispatch makes for the memory-efficient kernel (fp32 with a mask):
    the 0/-inf mask expanded per head and, for a key axis not a multiple of 16, padded and
    sliced back. Traced with fake tensors: no CUDA kernel runs."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def attend(q, k, v, keep):
        bias = torch.where(keep, 0.0, float("-inf")).expand(B, H, 1, key_len)
        if pad:
            bias = F.pad(bias, (0, 16 - key_len % 16))[..., :key_len]
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, False)[0]

    args = (torch.randn(B, H, 1, D), torch.randn(B, H, key_len, D), torch.randn(B, H, key_len, D),
            torch.rand(B, 1, 1, key_len) > 0.3)
    return make_fx(attend, tracing_mode="fake")(*args).graph


@pytest.mark.parametrize("key_len,pad", [(32, False), (21, True)])
def test_masks_broadcast_for_the_cuda_efficient_kernel_are_read_before_the_broadcast(key_len,
                                                                                     pad):
    from macopt.passes.masks import boolean_key_mask
    from macopt.passes.sites import find_attention_sites

    (site,) = find_attention_sites(_efficient_attention_graph(key_len, pad))
    source, reason = boolean_key_mask(site)
    assert reason is None
    assert source.meta["val"].dtype == torch.bool and tuple(source.meta["val"].shape) == (
        B, 1, 1, key_len)


def test_a_slice_that_cuts_keys_is_not_taken_for_padding():
    from torch.fx.experimental.proxy_tensor import make_fx

    from macopt.passes.masks import boolean_key_mask
    from macopt.passes.sites import find_attention_sites

    def attend(q, k, v, keep):  # 8 mask entries padded to 24, cut to the first 4: not identity
        bias = F.pad(torch.where(keep, 0.0, float("-inf")), (0, 16))[..., :4]
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, False)[0]

    args = (torch.randn(B, H, 1, D), torch.randn(B, H, 4, D), torch.randn(B, H, 4, D),
            torch.rand(B, 1, 1, 8) > 0.3)
    (site,) = find_attention_sites(make_fx(attend, tracing_mode="fake")(*args).graph)
    source, reason = boolean_key_mask(site)
    assert source is None and "not provably" in reason
