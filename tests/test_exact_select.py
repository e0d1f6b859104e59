"""The exact selector's Triton kernels (CPU interpreter here) against the torch selector: the
same tokens, with and without per-group counts, on strided caches and short middles."""

import pytest
import torch
from topk_phi_cases import make_problem

from macopt.kernels import exact_select
from macopt.topk_phi_select import exact_selection, select


def _sorted(x):
    return x.sort(dim=-1).values


@pytest.mark.parametrize("batch,q_heads,kv_heads,n_keys,head_dim,top_k", [
    (2, 8, 2, 1500, 64, 40),  # two chunks of 1024, a partial one
    (1, 4, 4, 300, 32, 300),  # the budget covers every key (g = 1)
    (3, 6, 3, 2100, 64, 7),  # g = 2, three chunks
    (1, 12, 1, 200, 80, 16),  # g = 12, head dim padded to 128
])
def test_exact_topk_keeps_the_torch_selectors_tokens(batch, q_heads, kv_heads, n_keys, head_dim,
                                                     top_k):
    gen = torch.Generator().manual_seed(n_keys)
    q = torch.randn(batch, q_heads, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, n_keys, head_dim, generator=gen)
    lo = torch.randint(0, 20, (batch,), generator=gen, dtype=torch.int32)
    hi = n_keys - torch.randint(0, 30, (batch,), generator=gen, dtype=torch.int32)
    scale = head_dim**-0.5
    got = exact_select.exact_topk(q, k, scale, lo, hi, top_k)
    want = exact_selection(q, k, scale, lo, hi, top_k)
    assert got.shape == want.shape
    assert torch.equal(_sorted(got), _sorted(want))
    counts = torch.randint(0, top_k + 1, (batch, kv_heads), generator=gen, dtype=torch.int32)
    got = exact_select.exact_topk(q, k, scale, lo, hi, top_k, counts)
    want = exact_selection(q, k, scale, lo, hi, top_k, counts)
    assert torch.equal(_sorted(got), _sorted(want))
    assert torch.equal((got >= 0).sum(-1), counts)


def test_exact_topk_reads_a_strided_cache_and_writes_every_slot(monkeypatch):
    # a cache view with room for more keys (as a static cache), a poisoning allocator
    gen = torch.Generator().manual_seed(1)
    full = torch.randn(2, 2, 1200, 32, generator=gen)
    k = full[:, :, :1100]
    q = torch.randn(2, 4, 32, generator=gen)
    lo, hi = torch.tensor([3, 0], dtype=torch.int32), torch.tensor([1090, 700], dtype=torch.int32)
    poisoned = lambda *a, **kw: torch.full(*a, -7, **kw)  # noqa: E731
    monkeypatch.setattr(exact_select, "_new_empty", lambda shape, **kw: poisoned(shape, **kw))
    got = exact_select.exact_topk(q, k, 32**-0.5, lo, hi, 50)
    assert torch.equal(_sorted(got), _sorted(exact_selection(q, k.contiguous(), 32**-0.5, lo,
                                                             hi, 50)))
    assert ((got >= lo[:, None, None]) & (got < hi[:, None, None])).all()


def test_select_routes_the_exact_selector_to_the_kernels_with_triton():
    p = make_problem(n_keys=700, head_dim=32, n_q_heads=8, n_kv_heads=2)
    args = (p.q, p.k, p.scale, p.mid_start, p.mid_end, None, None, 30, 32, "exact")
    with_kernels = select(*args, triton_path=True)
    torch_path = select(*args, triton_path=False)
    assert torch.equal(_sorted(with_kernels), _sorted(torch_path))


def test_exact_topk_refuses_a_budget_past_the_cache():
    q, k = torch.zeros(1, 2, 16), torch.zeros(1, 1, 10, 16)
    lo, hi = torch.tensor([0], dtype=torch.int32), torch.tensor([10], dtype=torch.int32)
    with pytest.raises(ValueError, match="top_k"):
        exact_select.exact_topk(q, k, 0.25, lo, hi, 11)
