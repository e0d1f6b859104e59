"""The one-launch page selector against the reference's torch.topk (CPU: TRITON_INTERPRET=1).

Spec: ``select_page_tokens(scores, Hkv, K, page_size)`` holds the token indices of a top-K of
the reference's group scores, ascending; the pages of ``torch.topk`` when the K-th score is
unique, the lowest indices among ties otherwise.
"""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from topk_phi_cases import make_problem

from macopt.kernels import page_select, topk_phi
from macopt.kernels import topk_phi_reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
UNWRITTEN = -12345
NEG_INF = float("-inf")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernel allocates starts as a sentinel: an unwritten element fails."""
    def sentinel_empty(*shape, dtype=None, device=None):
        return torch.full(*shape, UNWRITTEN, dtype=dtype, device=device)

    monkeypatch.setattr(page_select, "_new_empty", sentinel_empty)


def small_blocks(block_p: int):
    """Chunks of ``block_p`` pages (and 2 * block_p tokens): tiny rows span several chunks."""
    return mock.patch.multiple(page_select, _MAX_BLOCK_P=block_p, _MAX_BLOCK_T=2 * block_p)


def group_scores(scores: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """The reference's ranking ``[B, Hkv, n_pages]``: shift each head by its best finite page,
    then the group max."""
    batch, n_q_heads, n_pages = scores.shape
    best = scores.amax(dim=-1, keepdim=True)
    best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
    return (scores - best).view(batch, n_kv_heads, -1, n_pages).amax(dim=2)


def selected_pages(tokens: torch.Tensor, page_size: int) -> torch.Tensor:
    """The pages behind whole-page token runs ``[B, Hkv, K * page_size]`` -> ``[B, Hkv, K]``."""
    runs = tokens.view(*tokens.shape[:2], -1, page_size)
    assert torch.all(runs[..., 0] % page_size == 0), "a run does not start a page"
    offsets = torch.arange(page_size, dtype=tokens.dtype, device=tokens.device)
    assert torch.equal(runs, runs[..., :1] + offsets), "a run is not one whole page"
    return runs[..., 0] // page_size


def assert_valid_top_k(tokens, scores, n_kv_heads, n_selected, page_size):
    """Count exact, ascending, no repeats, and every kept score >= every dropped one."""
    batch, _, n_pages = scores.shape
    n_keep = min(n_selected, n_pages)
    assert tokens.dtype == torch.int32
    assert tokens.shape == (batch, n_kv_heads, n_keep * page_size)
    pages = selected_pages(tokens, page_size).long()
    assert torch.all(pages.diff(dim=-1) > 0), "pages not strictly ascending"
    assert torch.all((pages >= 0) & (pages < n_pages))
    ranked = group_scores(scores, n_kv_heads)
    kept = torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, pages, True)
    worst_kept = ranked.masked_fill(~kept, float("inf")).amin(dim=-1)
    best_dropped = ranked.masked_fill(kept, NEG_INF).amax(dim=-1)
    assert torch.all(worst_kept >= best_dropped), "a dropped page outranks a kept one"


def assert_reference_pages_where_unique(tokens, scores, n_kv_heads, n_selected, page_size):
    """Where the K-th best score is unique the top-K set is too: it must be torch.topk's."""
    n_pages = scores.shape[-1]
    if n_selected >= n_pages:
        unique = torch.ones(scores.shape[0], n_kv_heads, dtype=torch.bool)
    else:
        ordered = group_scores(scores, n_kv_heads).sort(dim=-1, descending=True).values
        unique = ordered[..., n_selected - 1] != ordered[..., n_selected]
    expected = ref.select_pages(scores, n_kv_heads, n_selected)
    assert torch.equal(selected_pages(tokens, page_size)[unique], expected[unique])


def random_scores(batch, n_q_heads, n_pages, seed, mid_pages=None, grid=None):
    """Normal scores; pages outside row b's ``mid_pages[b] = (lo, hi)`` are -inf, as the
    scores kernel leaves them; ``grid`` rounds to multiples of it, forcing ties."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, n_q_heads, n_pages, generator=gen)
    if grid is not None:
        scores = (scores / grid).round() * grid
    for b, (lo, hi) in enumerate(mid_pages or []):
        scores[b, :, :lo] = NEG_INF
        scores[b, :, hi:] = NEG_INF
    return scores.to(DEVICE)


@settings(max_examples=25)
@given(
    batch=st.integers(1, 2),
    n_kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 3, 4, 8]),
    n_pages=st.integers(1, 21),
    page_size=st.sampled_from([1, 3, 4, 16]),
    block_p=st.sampled_from([4, 8, 1024]),
    grid=st.sampled_from([None, 0.5]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_selection_is_a_top_k_and_the_reference_set_when_unique(
    batch, n_kv_heads, group, n_pages, page_size, block_p, grid, seed, data,
):
    n_selected = data.draw(st.integers(1, n_pages + 2), label="n_selected")
    bound = st.integers(0, n_pages)
    mid_pages = [sorted(data.draw(st.tuples(bound, bound), label="mid pages"))
                 for _ in range(batch)]
    scores = random_scores(batch, group * n_kv_heads, n_pages, seed, mid_pages, grid)
    with small_blocks(block_p):
        tokens = page_select.select_page_tokens(scores, n_kv_heads, n_selected, page_size)
    assert_valid_top_k(tokens, scores, n_kv_heads, n_selected, page_size)
    assert_reference_pages_where_unique(tokens, scores, n_kv_heads, n_selected, page_size)


@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_tokens_equal_the_reference_pages_as_tokens(group):
    scores = random_scores(2, 2 * group, 37, seed=group, mid_pages=[(0, 37), (5, 30)])
    with small_blocks(8):
        tokens = page_select.select_page_tokens(scores, 2, 12, page_size=4)
    pages = ref.select_pages(scores, n_kv_heads=2, n_selected=12)
    assert torch.equal(tokens, ref.pages_to_tokens(pages, 4))


def test_ties_at_the_kth_score_keep_the_lowest_pages():
    scores = torch.zeros(1, 2, 19, device=DEVICE)
    scores[0, :, 11] = 1.0
    with small_blocks(4):
        tokens = page_select.select_page_tokens(scores, 1, 5, page_size=2)
    assert selected_pages(tokens, 2).tolist() == [[[0, 1, 2, 3, 11]]]


def test_rows_with_fewer_finite_pages_than_k_keep_all_of_them_then_the_lowest():
    scores = random_scores(2, 4, 13, seed=3, mid_pages=[(6, 9), (0, 13)])
    with small_blocks(4):
        tokens = page_select.select_page_tokens(scores, 2, 5, page_size=3)
    assert selected_pages(tokens, 3)[0].tolist() == [[0, 1, 6, 7, 8]] * 2
    assert_valid_top_k(tokens, scores, 2, 5, page_size=3)


def test_a_head_with_an_infinite_best_page_is_not_shifted():
    scores = random_scores(1, 2, 9, seed=5)
    scores[0, 0] += 5.0  # unshifted, head 0 outranks head 1's shifted scores
    scores[0, 0, 4] = float("inf")
    tokens = page_select.select_page_tokens(scores, 1, 3, page_size=2)
    pages = ref.select_pages(scores, n_kv_heads=1, n_selected=3)
    assert torch.equal(tokens, ref.pages_to_tokens(pages, 2))


def test_rows_without_finite_pages_keep_the_first_k():
    scores = torch.full((1, 4, 9), NEG_INF, device=DEVICE)
    tokens = page_select.select_page_tokens(scores, 2, 3, page_size=2)
    assert selected_pages(tokens, 2).tolist() == [[[0, 1, 2], [0, 1, 2]]]


@pytest.mark.parametrize("n_selected", [10, 15])
def test_a_budget_of_every_page_selects_every_token(n_selected):
    scores = random_scores(1, 3, 10, seed=1, mid_pages=[(2, 7)])
    with small_blocks(4):
        tokens = page_select.select_page_tokens(scores, 1, n_selected, page_size=3)
    assert torch.equal(tokens[0, 0], torch.arange(30, dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("group", [1, 3, 8])
def test_select_pages_is_the_reference_selector_on_the_kernel_scores(group):
    p = make_problem(n_q_heads=2 * group, n_kv_heads=2, head_dim=64, n_keys=128, seed=group,
                     device=DEVICE)
    bounds = topk_phi.build_page_bounds(p.k, p.mid_start, p.mid_end, 8)
    tokens = topk_phi.select_pages(p.q, bounds, p.mid_start, p.mid_end, 8, p.scale, 10)
    scores = topk_phi.page_scores(p.q, bounds, p.mid_start, p.mid_end, 8, p.scale)
    pages = ref.select_pages(scores, n_kv_heads=2, n_selected=10)
    assert torch.equal(tokens, ref.pages_to_tokens(pages, 8))


def test_scores_other_than_float32_are_refused():
    with pytest.raises(ValueError, match="float32"):
        page_select.select_page_tokens(torch.zeros(1, 2, 4, dtype=torch.bfloat16), 1, 2, 8)


@pytest.mark.parametrize("group", [1, 4])
def test_per_group_counts_keep_each_groups_best_pages_and_pad_with_minus_one(group):
    scores = random_scores(2, 3 * group, 37, seed=7 + group, mid_pages=[(0, 37), (5, 30)])
    plain = page_select.select_page_tokens(scores, 3, 12, page_size=4)
    # Groups 0 and 2 read the summary (some head on), group 1 does not; counts of 0, of
    # part of the width and past the width.
    on = torch.tensor([True, False, False], device=DEVICE).repeat_interleave(group)
    on[-1] = True
    for with_summary, without in ((5, 40), (0, 12), (12, 3)):
        counts = ref.GroupCounts(on, with_summary, without)
        with small_blocks(8):
            tokens = page_select.select_page_tokens(scores, 3, 12, page_size=4, counts=counts)
        per_row = counts.tensor(3).cpu().expand(2, -1)
        pages = ref.select_pages(scores.cpu(), n_kv_heads=3, n_selected=12, counts=per_row)
        # The kernel writes its pages first, the reference sorts its -1s first: same sets.
        expected = ref.pages_to_tokens(pages, 4).sort(dim=-1).values
        assert torch.equal(tokens.cpu().sort(dim=-1).values, expected)
        assert tokens.shape == plain.shape  # the width stays; only the contents change
        kept = (tokens >= 0).sum(dim=-1) // 4
        want = [min(with_summary, 12), min(without, 12), min(with_summary, 12)]
        assert kept.tolist() == [want, want]  # a count past the width keeps it all
        assert torch.all(tokens[tokens < 0] == -1)
        if without >= 12:
            assert torch.equal(tokens[:, 1], plain[:, 1])  # a full count is the plain selection


def test_per_group_counts_refuse_flags_of_the_wrong_shape():
    scores = random_scores(1, 4, 9, seed=2)
    counts = ref.GroupCounts(torch.ones(3, dtype=torch.bool, device=DEVICE), 1, 2)
    with pytest.raises(ValueError, match="completion"):
        page_select.select_page_tokens(scores, 2, 3, page_size=2, counts=counts)


def test_per_group_counts_with_skipped_groups_select_nothing_there():
    scores = random_scores(1, 4, 9, seed=2)
    counts = ref.GroupCounts(torch.ones(4, dtype=torch.bool, device=DEVICE), 2, 2)
    skip = torch.tensor([[0, 1]], dtype=torch.uint8, device=DEVICE)
    tokens = page_select.select_page_tokens(scores, 2, 3, page_size=2, skip=skip, counts=counts)
    assert torch.all(tokens[0, 1] == -1)
    assert (tokens[0, 0] >= 0).sum() == 4
