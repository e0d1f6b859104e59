"""The sketch selector: its Triton kernels (CPU interpreter here) against torch references, the
4-bit sketch written at prefill, and what the selection must keep (approximate by design)."""

import math
import re
import struct

import pytest
import torch
from topk_phi_cases import make_problem

import macopt  # noqa: F401  (registers torch.ops.macopt.*)
from macopt.config import TopKPhiConfig
from macopt.kernels import sketch_select
from macopt.kernels import topk_phi_reference as ref
from macopt.topk_phi_select import (
    _sketch_query,
    build_sketch,
    exact_selection,
    select,
    sketch_keys,
    sketch_scores_reference,
    sketch_selection,
    sketch_shapes,
)
from macopt.topk_phi_state import TopKPhiState, decode, prefill

ops = torch.ops.macopt


def _sketch(k, mid_start, mid_end):
    batch, n_kv_heads, n_keys, head_dim = k.shape
    codes_shape, scales_shape = sketch_shapes(batch, n_kv_heads, n_keys, head_dim)
    codes = torch.full(codes_shape, 0xAB, dtype=torch.uint8)  # poison: every byte rewritten
    scales = torch.full(scales_shape, float("nan"))
    build_sketch(k, mid_start, mid_end, codes, scales)
    return codes, scales


def _ranges(batch, n_keys, gen):
    lo = torch.randint(0, 6, (batch,), generator=gen, dtype=torch.int32)
    hi = n_keys - torch.randint(0, 9, (batch,), generator=gen, dtype=torch.int32)
    return lo, hi


@pytest.mark.parametrize("n_keys", [97, 256, 1030])
def test_sketch_dequantises_each_middle_key_within_half_a_step(n_keys):
    gen = torch.Generator().manual_seed(n_keys)
    k = torch.randn(2, 3, n_keys, 32, generator=gen) * torch.rand(32, generator=gen) * 4
    lo, hi = _ranges(2, n_keys, gen)
    codes, scales = _sketch(k, lo, hi)
    assert torch.isfinite(scales).all() and (scales > 0).all()
    error = (sketch_keys(codes, scales, n_keys) - k).abs() / scales[:, :, None, :]
    inside = ref.positions_in(lo, hi, n_keys)[:, None, :, None].expand_as(error)
    assert error[inside].max() <= 0.5 + 1e-4  # round to nearest, no clamping in the middle
    # each channel's scale is its largest middle magnitude over 7 (the largest level)
    amax = (k.abs() * inside).amax(dim=2)
    torch.testing.assert_close(scales * 7, amax)


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("n_keys", [33, 300])
def test_sketch_scores_kernel_equals_its_torch_reference(group, n_keys):
    gen = torch.Generator().manual_seed(group * 1000 + n_keys)
    batch, n_kv_heads, head_dim = 2, 2, 64
    k = torch.randn(batch, n_kv_heads, n_keys, head_dim, generator=gen)
    q = torch.randn(batch, n_kv_heads * group, head_dim, generator=gen)
    lo, hi = _ranges(batch, n_keys, gen)
    codes, scales = _sketch(k, lo, hi)
    for channels in (0, 5, head_dim):
        _, dims, q_scaled = _sketch_query(q, scales, head_dim**-0.5, n_kv_heads, channels)
        got, maxima = sketch_select.sketch_scores(codes, dims, q_scaled, lo, hi, n_keys,
                                                  block_max=True)
        want = sketch_scores_reference(codes, dims, q_scaled, lo, hi, n_keys)
        assert got.dtype == torch.float16 and got.shape == (batch, n_kv_heads, n_keys)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        assert torch.equal(torch.isinf(got), ~ref.positions_in(lo, hi, n_keys)[:, None, :]
                           .expand_as(got))
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite].float(), want[finite].float(), atol=2e-3,
                                   rtol=1e-3)
        # each block's best (blocks of a power of two tokens), what the candidate pass reads
        block = 1 << (-(-n_keys // maxima.shape[-1]) - 1).bit_length()
        for i in range(maxima.shape[-1]):
            torch.testing.assert_close(maxima[..., i],
                                       got[..., i * block:(i + 1) * block].float().amax(-1))
    # with every channel, the sketch score is q . (dequantised key) * scale, best head
    _, dims, q_scaled = _sketch_query(q, scales, head_dim**-0.5, n_kv_heads, head_dim)
    got = sketch_select.sketch_scores(codes, dims, q_scaled, lo, hi, n_keys).float()
    keys = sketch_keys(codes, scales, n_keys)
    plain = torch.einsum("bhgd,bhnd->bhgn", q.view(batch, n_kv_heads, group, head_dim),
                         keys).amax(dim=2) * head_dim**-0.5
    finite = torch.isfinite(got)
    torch.testing.assert_close(got[finite], plain[finite], atol=2e-2, rtol=2e-3)


@pytest.mark.parametrize("n_keys,n_keep", [(50, 1), (50, 50), (777, 40), (9000, 999)])
def test_candidate_kernel_equals_its_reference_and_keeps_a_top_set_up_to_a_bin(n_keys, n_keep):
    gen = torch.Generator().manual_seed(n_keys + n_keep)
    scores = torch.randn(3, 2, n_keys, generator=gen) * 4
    # many equal bins, a row with a long -inf stretch, a row past the histogram's range
    scores = torch.where(torch.rand(3, 2, n_keys, generator=gen) < 0.5, scores.round(), scores)
    scores[0, 0, : n_keys // 3] = float("-inf")
    scores[1, 1, 7] = 80.0
    scores = scores.half()
    # the block maxima may cut the row anywhere: uneven blocks here
    cuts = list(range(0, n_keys, 37)) + [n_keys]
    block_max = torch.stack([scores[..., a:b].float().amax(-1)
                             for a, b in zip(cuts[:-1], cuts[1:], strict=True)], dim=-1)
    got = sketch_select.select_candidates(scores, block_max, n_keep)
    want = sketch_select.select_candidates_reference(scores, n_keep)
    assert torch.equal(got, want)
    bins = sketch_select.score_bins(scores)
    for b in range(3):
        for h in range(2):
            chosen = got[b, h].long()
            assert len(set(chosen.tolist())) == n_keep
            rest = torch.ones(n_keys, dtype=torch.bool)
            rest[chosen] = False
            if rest.any():
                assert bins[b, h, chosen].max() <= bins[b, h, rest].min()
                # within one bin of the exact top n_keep
                exact = scores[b, h].float().topk(n_keep).values[-1]
                gap = scores[b, h].float().max() - exact
                assert (scores[b, h, chosen].float() >= exact - sketch_select.BIN_WIDTH).all() \
                    or gap > sketch_select.BIN_WIDTH * (sketch_select.N_BINS - 1)


def _selection_case(seed, n_keys=200, group=3, head_dim=64):
    gen = torch.Generator().manual_seed(seed)
    batch, n_kv_heads = 2, 2
    k = torch.randn(batch, n_kv_heads, n_keys, head_dim, generator=gen)
    q = torch.randn(batch, n_kv_heads * group, head_dim, generator=gen) * 2
    lo, hi = _ranges(batch, n_keys, gen)
    return q, k, lo, hi


@pytest.mark.parametrize("seed", [0, 1])
def test_triton_selection_equals_the_torch_reference_of_itself(seed):
    q, k, lo, hi = _selection_case(seed)
    codes, scales = _sketch(k, lo, hi)
    scale = k.shape[-1] ** -0.5
    counts = torch.tensor([[9, 3], [0, 20]], dtype=torch.int32)
    for top_k, channels, rerank, c in ((9, 0, 2, None), (30, 8, 3, None), (60, 0, 1, None),
                                       (20, 0, 2, counts)):
        got = sketch_selection(q, k, codes, scales, scale, lo, hi, top_k, channels, rerank, c,
                               triton_path=True)
        want = sketch_selection(q, k, codes, scales, scale, lo, hi, top_k, channels, rerank, c,
                                triton_path=False)
        assert torch.equal(got.sort(dim=-1).values, want)
        assert got.shape == (2, 2, top_k) and got.dtype == torch.int32


def _plain_sketch_selection(q, k, codes, scales, scale, lo, hi, top_k, channels, rerank):
    """The sketch selector written out plainly, per (row, KV head), from dequantised keys."""
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    keys = sketch_keys(codes, scales, n_keys)
    out = torch.full((batch, n_kv_heads, top_k), -1, dtype=torch.int32)
    for b in range(batch):
        for h in range(n_kv_heads):
            qg = q[b, h * group:(h + 1) * group]
            dims = qg.abs().sum(0).topk(channels).indices
            approx = (qg[:, dims] @ keys[b, h][:, dims].T * scale).amax(0)
            mid = torch.arange(n_keys)
            inside = (mid >= lo[b]) & (mid < hi[b])
            approx = approx.half().float().masked_fill(~inside, float("-inf"))
            top = approx.max()
            bins = ((top - approx) * 8).clamp(0, 255).floor()  # bins of 1/8 nat below the best
            order = torch.sort(bins, stable=True).indices  # by bin, then index
            cand = order[: min(rerank * top_k, n_keys)]
            exact = (qg @ k[b, h, cand].T * scale).masked_fill(~inside[cand], float("-inf"))
            exact = exact - torch.logsumexp(exact, dim=-1, keepdim=True)
            best = exact.amax(0).topk(top_k).indices
            out[b, h] = cand[best].sort().values.to(torch.int32)
    return out


def test_selection_equals_a_plain_per_head_loop():
    q, k, lo, hi = _selection_case(5, n_keys=150)
    codes, scales = _sketch(k, lo, hi)
    scale = k.shape[-1] ** -0.5
    got = sketch_selection(q, k, codes, scales, scale, lo, hi, 12, 16, 2, triton_path=True)
    want = _plain_sketch_selection(q, k, codes, scales, scale, lo, hi, 12, 16, 2)
    assert torch.equal(got.sort(dim=-1).values, want)


@pytest.mark.parametrize("triton_path", [True, False], ids=["triton", "torch"])
def test_a_budget_covering_the_middle_keeps_every_middle_key(triton_path):
    q, k, lo, hi = _selection_case(7, n_keys=120)
    codes, scales = _sketch(k, lo, hi)
    n_keys = k.shape[2]
    for top_k in (int((hi - lo).max()), n_keys):
        got = sketch_selection(q, k, codes, scales, k.shape[-1] ** -0.5, lo, hi, top_k,
                               rerank=1, triton_path=triton_path)
        for b in range(2):
            middle = set(range(int(lo[b]), int(hi[b])))
            for h in range(2):
                assert middle <= set(got[b, h].tolist())


@pytest.mark.parametrize("triton_path", [True, False], ids=["triton", "torch"])
def test_a_planted_needle_is_selected(triton_path):
    gen = torch.Generator().manual_seed(3)
    batch, n_kv_heads, group, n_keys, head_dim = 2, 2, 4, 1024, 64
    k = torch.randn(batch, n_kv_heads, n_keys, head_dim, generator=gen)
    q = torch.randn(batch, n_kv_heads * group, head_dim, generator=gen)
    lo, hi = torch.tensor([4, 20], dtype=torch.int32), torch.tensor([1000, 1010],
                                                                    dtype=torch.int32)
    needles = [[311, 977], [500, 21]]
    for b in range(batch):
        for h in range(n_kv_heads):
            # a key pointing where one head of the group looks, a bit longer than the others
            head = q[b, h * group + (b + h) % group]
            k[b, h, needles[b][h]] = head / head.norm() * 12
    codes, scales = _sketch(k, lo, hi)
    got = sketch_selection(q, k, codes, scales, head_dim**-0.5, lo, hi, 8,
                           triton_path=triton_path)
    for b in range(batch):
        for h in range(n_kv_heads):
            assert needles[b][h] in got[b, h].tolist()


def _problem(**fields):
    return make_problem(**{"batch": 2, "n_q_heads": 6, "n_kv_heads": 2, "n_keys": 160,
                           "head_dim": 64, "d_phi": 16, "n_tail": 8, **fields})


def _sketch_state(p):
    batch, n_q_heads, head_dim = p.q.shape
    return TopKPhiState.allocate(batch, n_q_heads, p.k.shape[1], p.k.shape[2], head_dim,
                                 p.k.dtype, p.k.device, page_size=None, maps=p.maps,
                                 sketch=True)


def test_prefill_writes_the_sketch_and_decode_steps_keep_it_in_step_with_the_cache():
    p = _problem(n_generated=4)
    config = TopKPhiConfig(sinks=4, tail=8, budget=12, selector="sketch")
    state = _sketch_state(p)
    assert state.kmin.dtype == torch.uint8 and state.kmax.dtype == torch.float32
    prefill(state, p.k, p.v, p.starts, p.prefill_ends, config)
    codes, scales = _sketch(p.k, state.mid_start, state.mid_end)
    assert torch.equal(state.kmin, codes) and torch.equal(state.kmax, scales)
    # Decode steps append keys past the prompt (attended exactly, never in the middle): the
    # sketch of the prompt's middle is all a step selects from, and it stays that of the cache.
    k, v = p.k.clone(), p.v.clone()
    ends = p.prefill_ends.clone()
    gen = torch.Generator().manual_seed(11)
    n_keys = k.shape[2]
    middle = ref.positions_in(state.mid_start, state.mid_end, n_keys)[:, None, :, None]
    for _ in range(3):
        k[torch.arange(2), :, ends.long()] = torch.randn(2, k.shape[1], k.shape[3],
                                                         generator=gen)
        ends = ends + 1
        decode(state, p.q, k, v, p.starts, ends, p.scale, config)
        fresh, fresh_scales = _sketch(k, state.mid_start, state.mid_end)
        assert torch.equal(state.kmax, fresh_scales)
        assert torch.equal(sketch_keys(state.kmin, state.kmax, n_keys) * middle,
                           sketch_keys(fresh, fresh_scales, n_keys) * middle)
    # a new prompt (another prefill) rewrites the sketch: nothing of the last one is left
    p2 = _problem(seed=5, n_generated=1)
    prefill(state, p2.k, p2.v, p2.starts, p2.prefill_ends, config)
    assert torch.equal(state.kmin, _sketch(p2.k, state.mid_start, state.mid_end)[0])


def test_decode_op_with_the_sketch_selector_and_its_errors():
    p = _problem()
    config = TopKPhiConfig(sinks=4, tail=8, budget=10, selector="sketch")
    state = _sketch_state(p)
    prefill(state, p.k, p.v, p.starts, p.prefill_ends, config)
    out = decode(state, p.q, p.k, p.v, p.starts, p.ends, p.scale, config)
    assert out.shape == p.q.shape and torch.isfinite(out).all()
    chosen = select(p.q, p.k, p.scale, state.mid_start, state.mid_end, state.kmin, state.kmax,
                    10, 32, config.selector_spec(), triton_path=False)
    assert chosen.shape == (2, 2, 10)
    # a page-bounds state does not serve the sketch selector, nor a sketch the page selector
    paged = TopKPhiState.allocate(2, 6, 2, p.k.shape[2], 64, p.k.dtype, "cpu", page_size=16,
                                  maps=p.maps)
    with pytest.raises(ValueError, match="sketch"):
        decode(paged, p.q, p.k, p.v, p.starts, p.ends, p.scale, config)
    with pytest.raises(ValueError, match="page bounds"):
        decode(state, p.q, p.k, p.v, p.starts, p.ends, p.scale,
               TopKPhiConfig(sinks=4, tail=8, budget=10, selector="page", page_size=16))


def test_sketch_keeps_most_of_exact_top_k_mass_on_peaked_random_attention():
    # Not the real-model measurement (examples/safe_defaults/sketch_mass.py): a sanity floor on
    # keys with a few strong channels, where the sketch must find what exact Top-K finds.
    gen = torch.Generator().manual_seed(2)
    batch, n_kv_heads, group, n_keys, head_dim = 4, 2, 3, 2048, 64
    weight = torch.ones(head_dim)
    weight[:8] = 6.0
    k = torch.randn(batch, n_kv_heads, n_keys, head_dim, generator=gen) * weight
    q = torch.randn(batch, n_kv_heads * group, head_dim, generator=gen) * weight / 3
    lo = torch.full((batch,), 4, dtype=torch.int32)
    hi = torch.full((batch,), n_keys - 16, dtype=torch.int32)
    codes, scales = _sketch(k, lo, hi)
    scale, top_k = head_dim**-0.5, math.ceil(0.02 * n_keys)
    probs = torch.softmax(torch.einsum("bhgd,bhnd->bhgn", q.view(batch, n_kv_heads, group,
                                                                  head_dim), k) * scale, -1)
    probs = probs.reshape(batch, n_kv_heads * group, n_keys)

    def mass(tokens):
        return (probs * ref.selection_mask(tokens, n_kv_heads * group, lo, hi, n_keys)).sum(-1)

    exact = mass(exact_selection(q, k, scale, lo, hi, top_k))
    sketch = mass(sketch_selection(q, k, codes, scales, scale, lo, hi, top_k))
    assert (sketch / exact).median() > 0.95


@pytest.mark.parametrize("group,head_dim,channels", [(1, 64, 16), (3, 64, 5), (4, 128, 32)])
def test_query_kernel_picks_the_channels_torch_picks(group, head_dim, channels):
    gen = torch.Generator().manual_seed(group + head_dim)
    q = torch.randn(2, 2 * group, head_dim, generator=gen)
    scales = torch.rand(2, 2, head_dim, generator=gen) + 0.1
    dims, q_scaled = sketch_select.sketch_query(q, scales, 0.3, channels)
    _, want_dims, want_q = _sketch_query(q, scales, 0.3, 2, channels)
    assert torch.equal(dims, want_dims)  # best first, as torch.topk orders them
    torch.testing.assert_close(q_scaled, want_q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_candidate_scores_kernel_equals_torch(dtype):
    gen = torch.Generator().manual_seed(4)
    batch, n_kv_heads, group, n_keys, head_dim = 2, 2, 3, 90, 64
    q = torch.randn(batch, n_kv_heads * group, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, n_kv_heads, n_keys, head_dim, generator=gen).to(dtype)
    cand = torch.stack([torch.randperm(n_keys, generator=gen)[:70] for _ in range(4)])
    cand = cand.view(batch, n_kv_heads, 70).to(torch.int32)
    lo, hi = torch.tensor([3, 10], dtype=torch.int32), torch.tensor([80, 90], dtype=torch.int32)
    got = sketch_select.candidate_scores(q, k, cand, lo, hi, 0.125)
    k_cand = torch.gather(k.float(), 2, cand.long()[..., None].expand(-1, -1, -1, head_dim))
    want = torch.einsum("bhgd,bhrd->bhgr", q.float().view(batch, n_kv_heads, group, head_dim),
                        k_cand) * 0.125
    inside = (cand >= lo[:, None, None]) & (cand < hi[:, None, None])
    want = want.masked_fill(~inside[:, :, None, :], float("-inf"))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)])


@pytest.mark.parametrize("with_counts", [False, True], ids=["width", "counts"])
def test_rerank_kernel_keeps_the_best_by_group_log_probability(with_counts):
    gen = torch.Generator().manual_seed(8)
    batch, heads, group, n_cand, n_keep = 2, 3, 4, 1500, 300
    scores = torch.randn(batch, heads, group, n_cand, generator=gen) * 3
    scores[0, 1, :, 100:] = float("-inf")  # fewer finite candidates than n_keep
    scores[1, 2] = float("-inf")  # none
    cand = torch.randint(0, 10**6, (batch, heads, n_cand), generator=gen, dtype=torch.int32)
    counts = torch.tensor([[300, 0, 17], [5, 300, 299]], dtype=torch.int32) if with_counts \
        else None
    got = sketch_select.rerank_select(scores, cand, n_keep, counts)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    rank = (scores - torch.where(torch.isfinite(lse), lse, 0)).amax(dim=2)
    best = ref.top_indices(rank, n_keep, counts).long()
    want = torch.where(best >= 0, torch.gather(cand, 2, best.clamp(min=0)), -1)
    for b in range(batch):
        for h in range(heads):
            finite = int(torch.isfinite(rank[b, h]).sum())
            n = n_keep if counts is None else int(counts[b, h])
            # the finite ones must match; -inf fill-ins may be any candidates
            g, w = got[b, h].tolist(), want[b, h].tolist()
            assert g.count(-1) == n_keep - n
            if finite >= n:
                assert sorted(g) == sorted(w)
            else:
                top = set(cand[b, h][torch.isfinite(rank[b, h])].tolist())
                assert top <= set(g)


@pytest.mark.parametrize("n_cand,n_keep", [(40, 7), (5000, 1234), (9000, 9000)])
def test_rerank_kernel_breaks_ties_to_the_lower_slot_in_candidate_order(n_cand, n_keep):
    # Scores on a coarse grid (many equal log-probabilities, some equal in every byte of the
    # key but the last), a group of one head: the kernel's exact order, ties included.
    gen = torch.Generator().manual_seed(n_cand)
    scores = (torch.randint(-6, 7, (2, 2, 1, n_cand), generator=gen) * 0.5).float()
    scores[0, 0, 0, ::3] = float("-inf")
    scores[1, 1, 0, 5:9] = torch.tensor([1.0, 1.0000001, 0.9999999, 1.0])
    cand = torch.randint(0, 10**6, (2, 2, n_cand), generator=gen, dtype=torch.int32)
    counts = torch.tensor([[n_keep, n_keep // 2], [0, n_keep - 1]], dtype=torch.int32)
    got = sketch_select.rerank_select(scores, cand, n_keep, counts)
    rank = (scores - torch.logsumexp(scores, dim=-1, keepdim=True)).amax(dim=2)
    for b in range(2):
        for h in range(2):
            n = int(counts[b, h])
            # best first, ties to the lower slot (a stable sort), then back in slot order
            order = torch.sort(-rank[b, h], stable=True).indices[:n].sort().values
            want = cand[b, h][order].tolist()
            assert got[b, h, :n].tolist() == want
            assert got[b, h, n:].tolist() == [-1] * (n_keep - n)


def test_a_cache_grown_past_the_prompt_selects_from_the_prompts_sketch():
    # A dynamic cache grows at decode; the sketch covers the prompt it was built from.
    q, k, lo, hi = _selection_case(9, n_keys=101)
    codes, scales = _sketch(k, lo, hi)
    grown = torch.cat([k, torch.randn(2, 2, 29, k.shape[-1]) * 5], dim=2)
    scale = k.shape[-1] ** -0.5
    got = sketch_selection(q, grown, codes, scales, scale, lo, hi, 10, triton_path=True)
    want = sketch_selection(q, k, codes, scales, scale, lo, hi, 10, triton_path=False)
    assert torch.equal(got.sort(dim=-1).values, want)
    assert (got < 101).all()


def _halves(x: int) -> list[float]:
    """The two fp16 halves of a 32-bit register, low first."""
    return list(struct.unpack("<2e", x.to_bytes(4, "little")))


def _joined(values) -> int:
    """Two values rounded to fp16 (to nearest even) in one 32-bit register, low first."""
    return int.from_bytes(struct.pack("<2e", *values), "little")


def _run_unpack_ptx(word: int) -> list[int]:
    """The scoring kernel's nibble-unpacking PTX (``sketch_select._UNPACK_PTX``) run on one
    32-bit register of four packed bytes by a small emulator of its five instructions (the
    interpreter runs Triton's integer path instead, so the PTX's constants are checked here);
    returns the four output registers."""
    regs = {"$4": word}
    for line in str(sketch_select._UNPACK_PTX.value).splitlines():
        parts = re.findall(r"[\w.$]+", line)
        if not line.rstrip().endswith(";") or parts[0] == ".reg":
            continue
        op, dst, *src = parts
        args = [regs[s] if s in regs else int(s, 0) for s in src]
        if op == "mov.b32":
            regs[dst] = args[0]
        elif op == "prmt.b32":  # default mode: each selector nibble picks one of 8 bytes
            pool = args[0].to_bytes(4, "little") + args[1].to_bytes(4, "little")
            regs[dst] = int.from_bytes(bytes(pool[(args[2] >> 4 * i) & 7] for i in range(4)),
                                       "little")
        elif op == "lop3.b32":  # bit i of the LUT indexed by (a_i, b_i, c_i)
            a, b, c, lut = args
            regs[dst] = sum(((lut >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1)))
                             & 1) << i for i in range(32))
        elif op == "sub.f16x2":
            regs[dst] = _joined(x - y for x, y in zip(*map(_halves, args), strict=True))
        elif op == "fma.rn.f16x2":
            regs[dst] = _joined(x * y + z for x, y, z in zip(*map(_halves, args), strict=True))
        else:
            raise AssertionError(f"the emulator does not know {op}")
    return [regs[f"${i}"] for i in range(4)]


def test_the_unpacking_ptx_gives_each_nibble_minus_8_in_fp16():
    for word in (0x00000000, 0xFFFFFFFF, 0x88888888, 0x01234567, 0x89ABCDEF, 0xF00FA55A):
        nibbles = [(word >> 4 * i) & 15 for i in range(8)]  # byte j: low 2j, high 2j + 1
        low = [nibbles[2 * j] - 8 for j in range(4)]
        high = [nibbles[2 * j + 1] - 8 for j in range(4)]
        got = [_halves(r) for r in _run_unpack_ptx(word)]
        # outputs 0 and 1: the low nibbles of bytes 0-1 and 2-3; outputs 2 and 3: the high ones
        assert got[0] + got[1] == low, (hex(word), got)
        assert got[2] + got[3] == high, (hex(word), got)
