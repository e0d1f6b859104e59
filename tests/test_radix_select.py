"""``radix_topk`` (the exact selector's threshold, kernels/radix_select.py) against torch's sort,
through the Triton interpreter on CPU: exactly the ``n_keep`` largest keys, ties to the lower
index, ascending, per-row counts honoured."""

import pytest
import torch

from macopt.kernels import radix_select

INT32_MAX, INT32_MIN = torch.iinfo(torch.int32).max, torch.iinfo(torch.int32).min


def _want(ranks: torch.Tensor, n_keep: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    n_keys = ranks.shape[-1]
    order = torch.argsort(-ranks.long() * (2 * n_keys) + torch.arange(n_keys), dim=-1)
    want = order[..., :n_keep].sort(dim=-1).values.to(torch.int32)
    if counts is not None:
        for row in range(ranks.shape[0]):
            keep = max(0, min(int(counts[row]), n_keep))
            want[row] = torch.cat([order[row, :keep].sort().values.to(torch.int32),
                                   torch.full((n_keep - keep,), -1, dtype=torch.int32)])
    return want


# 140000 keys: more chunks than the pick kernel takes at once (its running bases)
@pytest.mark.parametrize("n_keys,n_keep", [(1, 1), (37, 5), (9000, 999), (20000, 20000),
                                           (17000, 1), (140000, 2800)])
def test_radix_topk_keeps_the_largest_keys_ties_to_the_lower_index(n_keys, n_keep):
    gen = torch.Generator().manual_seed(n_keys + n_keep)
    # keys that differ in every byte, and many ties (a small range): both paths of each pass
    wide = torch.randint(INT32_MIN, INT32_MAX, (2, n_keys), generator=gen, dtype=torch.int32)
    narrow = torch.randint(-300, 300, (2, n_keys), generator=gen, dtype=torch.int32)
    ranks = torch.cat([wide, narrow])
    ranks[3, n_keys // 2:] = INT32_MAX  # the best keys all in the later chunks
    ranks[2, : n_keys // 3] = INT32_MIN  # a -inf-like stretch
    assert torch.equal(radix_select.radix_topk(ranks, n_keep), _want(ranks, n_keep))


def test_radix_topk_honours_counts_and_fills_the_rest_with_minus_one():
    gen = torch.Generator().manual_seed(5)
    ranks = torch.randint(-50, 50, (5, 3000), generator=gen, dtype=torch.int32)
    counts = torch.tensor([0, 1, 77, 200, 999], dtype=torch.int32)
    got = radix_select.radix_topk(ranks, 200, counts=counts)
    assert torch.equal(got, _want(ranks, 200, counts))


def test_radix_topk_writes_every_slot(monkeypatch):
    # a poisoning allocator: any slot or workspace entry the kernels forget shows up
    monkeypatch.setattr(radix_select, "_new_empty",
                        lambda shape, dtype, device: torch.full(shape, 12345, dtype=dtype,
                                                                device=device))
    ranks = torch.randint(-9, 9, (2, 3, 5000), generator=torch.Generator().manual_seed(1),
                          dtype=torch.int32)
    assert torch.equal(radix_select.radix_topk(ranks, 300), _want(ranks.view(6, -1), 300)
                       .view(2, 3, 300))


def test_radix_topk_refuses_bad_input():
    with pytest.raises(ValueError, match="n_keep"):
        radix_select.radix_topk(torch.zeros(2, 10, dtype=torch.int32), 11)
    with pytest.raises(ValueError, match="int32"):
        radix_select.radix_topk(torch.zeros(2, 10), 3)
    with pytest.raises(ValueError, match="counts"):
        radix_select.radix_topk(torch.zeros(2, 10, dtype=torch.int32), 3,
                                counts=torch.zeros(3, dtype=torch.int32))
