"""MAC-Attention Triton kernels equal the fp64 reference: outputs, hit masks, keys, ring state.

On CPU the kernels run through Triton's interpreter (tests/conftest.py), so sizes stay tiny.
Queries are small integers, so squared distances are exact in fp32 and the kernel and the
reference make the same match decisions (ties included) by construction.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from macopt.kernels import decode, mac, mac_counters, mac_prefill, reference
from macopt.kernels.mac_reference import MACRing, mac_decode_step, prefill_entries

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (o and ring o: absolute = relative; lse: absolute)
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-3),
              torch.float16: (4e-3, 1e-3)}
RADIUS2 = 4.5  # planted near copies at squared distance 0..4 hit, random ring queries do not


def _tau(head_dim: int) -> float:
    """The tau whose radius 2 D (1 - tau)^2 is RADIUS2."""
    return 1.0 - (RADIUS2 / (2 * head_dim)) ** 0.5


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the kernels allocate starts as NaN (floats) or a sentinel (integers)."""

    def poisoned(*shape, dtype=torch.float32, device=None):
        out = torch.empty(*shape, dtype=dtype, device=device)
        return out.fill_(float("nan") if dtype.is_floating_point else 77)

    monkeypatch.setattr(mac, "_new_empty", poisoned)


def _ints(gen, *shape, dtype):
    return torch.randint(-1, 2, shape, generator=gen).to(dtype)


def make_case(batch=2, kv_heads=2, group=4, n_keys=80, head_dim=64, ring_size=16,
              dtype=torch.float32, seed=0, hit_share=0.5):
    """A decode step with random rows (left padding, lengths) and a random ring where about
    ``hit_share`` of the heads have a near copy of their pre-RoPE query planted."""
    gen = torch.Generator().manual_seed(seed)
    q_heads = kv_heads * group
    q = torch.randn(batch, q_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, n_keys, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, n_keys, head_dim, generator=gen).to(dtype)
    q_pre = _ints(gen, batch, q_heads, head_dim, dtype=dtype)
    s0 = torch.randint(0, n_keys // 4 + 1, (batch,), generator=gen)
    t = s0 + (torch.rand(batch, generator=gen) * (n_keys - s0)).long()
    t = t.clamp(max=n_keys - 1)

    ring = MACRing.empty(batch, q_heads, ring_size, head_dim, dtype)
    shape = (batch, q_heads, ring_size)
    # Position p lives in slot p mod M, as every writer keeps it: per slot mostly the window
    # position in [t - M, t), some stale (M older), some not yet valid (M newer), some empty.
    oldest = (t - ring_size)[:, None, None]
    window = oldest + (torch.arange(ring_size) - oldest) % ring_size
    era = torch.rand(shape, generator=gen)
    pos = window + ring_size * ((era > 0.92).long() - (era < 0.08).long())
    pos = torch.where(torch.rand(shape, generator=gen) < 0.1, -1, pos)
    ring.pos.copy_(torch.where(pos < 0, -1, pos))
    ring.q.copy_(_ints(gen, *shape, head_dim, dtype=dtype))
    ring.o.copy_(torch.randn(*shape, head_dim, generator=gen))
    lse = torch.randn(shape, generator=gen) * 3
    ring.lse.copy_(torch.where(torch.rand(shape, generator=gen) < 0.1, float("-inf"), lse))
    ring.depth.copy_(torch.randint(0, 4, shape, generator=gen))
    near = torch.rand(batch, q_heads, generator=gen) < hit_share
    for b, h in near.nonzero().tolist():
        for _ in range(2):  # two near copies: sometimes equidistant (ties go to the older)
            slot = int(torch.randint(0, ring_size, (1,), generator=gen))
            noise = torch.zeros(head_dim)
            noise[:int(torch.randint(0, 3, (1,), generator=gen))] = 1.0
            ring.q[b, h, slot] = q_pre[b, h] + noise.to(dtype)
    to_device = lambda x: x.to(DEVICE)  # noqa: E731
    ring = MACRing(*map(to_device, ring.tensors()))
    return tuple(map(to_device, (q, q_pre, k, v))) + (ring, to_device(t), to_device(s0))


def assert_step_matches_reference(case, offset=8, sinks=0, t_min=0, max_depth=3, tau=None,
                                  miss_prefix=None, **launch):
    q, q_pre, k, v, ring, t, s0 = case
    head_dim = q.shape[-1]
    params = dict(offset=offset, sinks=sinks, tau=_tau(head_dim) if tau is None else tau,
                  t_min=t_min, max_depth=max_depth, miss_prefix=miss_prefix)
    ring_ref, ring_kernel = ring.clone(), ring.clone()
    o_ref, hit_ref, keys_ref = mac_decode_step(q, q_pre, k, v, ring_ref, t, s0, head_dim**-0.5,
                                               compute_dtype=F64, out_dtype=F64, **params)
    o, hit, keys = mac.mac_decode_step(q, q_pre, k, v, ring_kernel, t, s0, head_dim**-0.5,
                                       **params, **launch)
    o_tol, lse_tol = TOLERANCES[q.dtype]
    assert o.dtype == q.dtype and not o.isnan().any()
    torch.testing.assert_close(o.double(), o_ref, atol=o_tol, rtol=o_tol)
    assert torch.equal(hit, hit_ref)
    assert torch.equal(keys, keys_ref)
    assert_rings_equal(ring_kernel, ring_ref, o_tol, lse_tol)
    return hit, ring_kernel


def assert_rings_equal(actual: MACRing, expected: MACRing, o_tol: float, lse_tol: float):
    assert torch.equal(actual.q, expected.q)
    assert torch.equal(actual.pos, expected.pos)
    assert torch.equal(actual.depth, expected.depth)
    torch.testing.assert_close(actual.o, expected.o, atol=o_tol, rtol=o_tol)
    torch.testing.assert_close(actual.lse, expected.lse, atol=lse_tol, rtol=0, equal_nan=True)


@settings(max_examples=12)
@given(
    batch=st.integers(1, 3), kv_heads=st.integers(1, 2), group=st.sampled_from([1, 2, 4, 8]),
    n_keys=st.integers(20, 96), ring_size=st.sampled_from([8, 16, 64, 100]),
    offset=st.integers(1, 24), sinks=st.sampled_from([0, 0, 3]),
    t_min=st.sampled_from([0, 0, 40]), num_splits=st.integers(1, 4),
    match_programs=st.integers(1, 3), hit_share=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_kernels_equal_the_reference_on_random_rings(
    batch, kv_heads, group, n_keys, ring_size, offset, sinks, t_min, num_splits,
    match_programs, hit_share, seed,
):
    case = make_case(batch, kv_heads, group, n_keys, 64, ring_size, seed=seed,
                     hit_share=hit_share)
    assert_step_matches_reference(case, offset, sinks, t_min, num_splits=num_splits,
                                  match_programs=match_programs, block_n=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_every_head_dim_group_and_dtype(head_dim, group, dtype):
    case = make_case(batch=2, kv_heads=1, group=group, n_keys=70, head_dim=head_dim,
                     dtype=dtype, seed=head_dim + group)
    hit, _ = assert_step_matches_reference(case, offset=8, sinks=2, num_splits=2, block_n=16)
    assert group == 1 or (hit.any() and not hit.all())  # a mixed group streams the union


# What the MAC reference kernel refuses (bf16 only, head dim 128 only, groups <= 8;
# BENCHMARKS.md 9): macopt's step matches the fp64 reference there too.
@pytest.mark.parametrize(("head_dim", "group", "dtype"), [
    (256, 16, torch.float16), (96, 2, torch.float16), (64, 16, torch.float32),
    (256, 1, torch.float32), (80, 12, torch.bfloat16)], ids=str)
def test_cases_the_reference_kernel_refuses(head_dim, group, dtype):
    case = make_case(batch=2, kv_heads=1, group=group, n_keys=70, head_dim=head_dim,
                     dtype=dtype, seed=head_dim * group)
    hit, _ = assert_step_matches_reference(case, offset=8, sinks=2, num_splits=2, block_n=16)
    assert group == 1 or (hit.any() and not hit.all())


def test_the_default_launch_shape_matches_the_reference():
    assert_step_matches_reference(make_case(seed=3, n_keys=200, ring_size=64), offset=16)


@pytest.mark.parametrize("match_programs", [1, 2])
def test_ties_across_tiles_and_programs_go_to_the_older_entry(match_programs):
    # M = 128 is two tiles of 64 slots: the newer copy (position 150, slot 22) is met first, the
    # older one (position 100, slot 100) later, in the second tile or the second program.
    q, q_pre, k, v, _, _, _ = make_case(batch=1, kv_heads=1, group=2, n_keys=210, seed=8)
    t, s0 = torch.tensor([200], device=DEVICE), torch.tensor([0], device=DEVICE)
    ring = MACRing.empty(1, 2, 128, 64, q.dtype, DEVICE)
    for position in (150, 100):
        ring.q[:, :, position % 128] = q_pre
        ring.pos[:, :, position % 128] = position
        ring.lse[:, :, position % 128] = 0.0
    hit, _ = assert_step_matches_reference((q, q_pre, k, v, ring, t, s0), offset=8,
                                           match_programs=match_programs, block_n=32)
    assert hit.all()


FLAWS = {"lse -inf": ("lse", float("-inf")), "lse nan": ("lse", float("nan")),
         "lse inf": ("lse", float("inf")), "depth at max": ("depth", 3)}


@pytest.mark.parametrize("match_programs", [1, 2])
@pytest.mark.parametrize("flaw", FLAWS)
@pytest.mark.parametrize(("flawed", "usable", "expect_hit"), [
    ((150, 0), (100, 1), False),  # nearest newer, a usable entry within the radius: a miss
    ((100, 0), (150, 1), False),  # nearest older (the other tile or program): a miss
    ((100, 0), (150, 0), False),  # a tie goes to the older entry, flawed: a miss
    ((150, 0), (100, 0), True),   # a tie goes to the older entry, usable: a hit
], ids=["newer", "older", "tie-older-flawed", "tie-newer-flawed"])
def test_an_unusable_nearest_entry_is_a_miss_with_no_fall_back(
        match_programs, flaw, flawed, usable, expect_hit):
    # (position, squared distance) of two entries within the radius; M = 128 is two tiles of 64
    # slots, so positions 150 (slot 22) and 100 (slot 100) are in different tiles or programs.
    # The flawed one has lse -inf / NaN / inf or depth max_depth; the other is usable.
    q, q_pre, k, v, _, _, _ = make_case(batch=1, kv_heads=1, group=2, n_keys=210, seed=9)
    t, s0 = torch.tensor([200], device=DEVICE), torch.tensor([0], device=DEVICE)
    ring = MACRing.empty(1, 2, 128, 64, q.dtype, DEVICE)
    for position, distance in (flawed, usable):
        slot = position % 128
        ring.q[:, :, slot] = q_pre
        ring.q[:, :, slot, 0] += distance
        ring.pos[:, :, slot] = position
        ring.lse[:, :, slot] = 0.5
    field, value = FLAWS[flaw]
    getattr(ring, field)[:, :, flawed[0] % 128] = value
    hit, _ = assert_step_matches_reference((q, q_pre, k, v, ring, t, s0), offset=8, max_depth=3,
                                           match_programs=match_programs, block_n=32)
    assert bool(hit.all()) == expect_hit and bool(hit.any()) == expect_hit


def _ring_hitting_at(q, q_pre, k, v, t, s0, back, ring_size=16, offset=8):
    """A ring whose only entry is every head's own pre-RoPE query ``back`` steps ago, with the
    exact state of its prefix: every head hits it."""
    ring = MACRing.empty(*q.shape[:2], ring_size, q.shape[-1], q.dtype, DEVICE)
    j = t - back
    o_j, lse_j = reference.attention_state(q, k, v, 0.125, s0, torch.maximum(j + 1 - offset, s0))
    rows = torch.arange(q.shape[0], device=DEVICE)
    ring.q[rows, :, j % ring_size], ring.o[rows, :, j % ring_size] = q_pre, o_j
    ring.lse[rows, :, j % ring_size], ring.pos[rows, :, j % ring_size] = lse_j, j.int()[:, None]
    return ring


def test_a_few_missing_groups_are_spread_over_many_work_items(monkeypatch):
    # 8 (row, KV head) groups, one split each on an all-miss step; every head hits but those of
    # group 0 (their entry's lse is -inf). The missing group's long range must be cut into
    # several items, the short ranges of the others stay one item each.
    q, q_pre, k, v, _, _, _ = make_case(batch=4, kv_heads=2, group=2, n_keys=240, seed=21)
    t, s0 = torch.tensor([239, 200, 220, 239], device=DEVICE), torch.zeros(4, device=DEVICE)
    s0 = s0.long()
    ring = _ring_hitting_at(q, q_pre, k, v, t, s0, back=3)
    ring.lse[0, :2] = float("-inf")
    allocated = []

    def recorded(*shape, dtype=torch.float32, device=None):
        allocated.append(torch.full(shape, 77 if dtype != torch.float32 else float("nan"),
                                    dtype=dtype, device=device))
        return allocated[-1]

    monkeypatch.setattr(mac, "_new_empty", recorded)
    hit, _ = assert_step_matches_reference((q, q_pre, k, v, ring, t, s0), offset=8,
                                           num_splits=1, block_n=16)
    assert not hit[0, :2].any() and hit[0, 2:].all() and hit[1:].all()
    group_first, group_items = [x for x in allocated if x.shape == (8,)]
    assert int(group_items[0]) >= 3 and (group_items[1:] == 1).all()
    assert int(group_items.sum()) <= 8 + 8  # at most one extra item per group
    assert torch.equal(group_first, torch.cumsum(group_items, 0) - group_items)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_given_miss_prefix_replaces_the_streamed_prefix(dtype):
    case = make_case(batch=2, kv_heads=2, group=4, n_keys=90, dtype=dtype, seed=17)
    q = case[0]
    gen = torch.Generator().manual_seed(3)
    o_given = torch.randn(*q.shape, generator=gen).to(DEVICE)
    lse_given = (torch.randn(q.shape[:2], generator=gen) * 2).to(DEVICE)
    lse_given[0, 0] = float("-inf")  # an empty prefix state is a valid state too
    hit, ring = assert_step_matches_reference(case, offset=8, sinks=0, num_splits=2, block_n=16,
                                              miss_prefix=(o_given, lse_given))
    assert hit.any() and not hit.all()
    t, s0 = case[5], case[6]
    missed = ~hit
    slot = (t % ring.size)[:, None].expand_as(hit)
    written = ring.lse.gather(-1, slot[..., None])[..., 0]
    # A miss stores the given state merged with nothing: its lse is the given one.
    torch.testing.assert_close(written[missed], lse_given[missed])
    _, _, keys = mac.mac_decode_step(*case[:5], t, s0, 0.125, offset=8, tau=_tau(64), t_min=0,
                                     max_depth=3, miss_prefix=(o_given, lse_given))
    tail = (t + 1 - torch.maximum(t + 1 - 8, s0))[:, None].expand_as(keys)
    assert torch.equal(keys[missed].long(), tail[missed])
    with pytest.raises(ValueError, match="miss_prefix lse"):
        mac.mac_decode_step(*case[:5], t, s0, 0.125, offset=8, tau=_tau(64), t_min=0,
                            max_depth=3, miss_prefix=(o_given, lse_given.double()))


def test_a_miss_is_full_attention():
    q, q_pre, k, v, ring, t, s0 = make_case(seed=5, n_keys=90)
    o, hit, keys = mac.mac_decode_step(q, q_pre, k, v, ring, t, s0, 0.125, offset=8, sinks=3,
                                       tau=1.0, t_min=0, max_depth=3, num_splits=3, block_n=16)
    assert not hit.any()
    exact = reference.attention(q, k, v, 0.125, s0, t + 1, compute_dtype=F64)
    torch.testing.assert_close(o, exact.float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(keys.long(), (t + 1 - s0)[:, None].expand_as(keys))


@pytest.mark.parametrize("sinks", [0, 3])
def test_a_row_with_mask_holes_misses_and_is_exact_over_its_mask(sinks):
    """Rows whose key mask drops keys inside [s0, t] (right padding) miss and attend the keys
    the mask keeps, in MAC's own launches; the other rows are the step without a mask."""
    case = make_case(batch=3, seed=9, n_keys=90, hit_share=1.0)
    q, q_pre, k, v, ring, t, s0 = case
    t = torch.full_like(t, 80)
    s0 = torch.tensor([0, 4, 0], device=DEVICE)
    key_mask = torch.arange(90, device=DEVICE)[None, :].expand(3, 90) >= s0[:, None]
    key_mask = key_mask & (torch.arange(90, device=DEVICE)[None, :] <= t[:, None])
    key_mask[1, 30:40] = False  # row 1: a hole (pads between its prompt and its new tokens)
    holes = torch.tensor([False, True, False], device=DEVICE)
    params = dict(offset=8, sinks=sinks, tau=_tau(64), t_min=0, max_depth=3)
    plain_ring, masked_ring, ref_ring = ring.clone(), ring.clone(), ring.clone()
    plain, plain_hit, _ = mac.mac_decode_step(q, q_pre, k, v, plain_ring, t, s0, 0.125,
                                              num_splits=3, block_n=16, **params)
    o, hit, keys = mac.mac_decode_step(q, q_pre, k, v, masked_ring, t, s0, 0.125, num_splits=3,
                                       block_n=16, key_mask=key_mask, holes=holes, **params)
    o_ref, hit_ref, keys_ref = mac_decode_step(q, q_pre, k, v, ref_ring, t, s0, 0.125,
                                               compute_dtype=F64, out_dtype=F64,
                                               key_mask=key_mask, holes=holes, **params)
    assert plain_hit[1].any() and not hit[1].any()
    assert torch.equal(hit, hit_ref) and torch.equal(keys, keys_ref)
    assert torch.equal(hit[[0, 2]], plain_hit[[0, 2]])
    torch.testing.assert_close(o.double(), o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o[[0, 2]], plain[[0, 2]], atol=1e-5, rtol=1e-5)
    exact = reference.attention(q, k, v, 0.125, s0, t + 1, key_mask, compute_dtype=F64)
    torch.testing.assert_close(o[1].double(), exact[1].double(), atol=1e-5, rtol=1e-5)
    assert_rings_equal(masked_ring, ref_ring, 1e-4, 1e-4)
    with pytest.raises(ValueError, match="both or neither"):
        mac.mac_decode_step(q, q_pre, k, v, ring.clone(), t, s0, 0.125, key_mask=key_mask,
                            **params)


def test_a_hit_on_an_identical_query_at_the_same_position_is_exact():
    q, q_pre, k, v, _, t, s0 = make_case(seed=6, n_keys=90)
    t = torch.full_like(t, 89)
    ring = MACRing.empty(*q.shape[:2], 16, q.shape[-1], q.dtype, DEVICE)
    j = t - 5
    o_j, lse_j = reference.attention_state(q, k, v, 0.125, s0 + 2, j + 1 - 8)
    rows = torch.arange(q.shape[0], device=DEVICE)
    ring.q[rows, :, j % 16], ring.o[rows, :, j % 16] = q_pre, o_j
    ring.lse[rows, :, j % 16], ring.pos[rows, :, j % 16] = lse_j, j.int()[:, None]
    o, hit, _ = mac.mac_decode_step(q, q_pre, k, v, ring, t, s0, 0.125, offset=8, sinks=2,
                                    tau=0.45, t_min=0, max_depth=3, num_splits=2, block_n=16)
    assert hit.all()
    exact = reference.attention(q, k, v, 0.125, s0, t + 1, compute_dtype=F64)
    torch.testing.assert_close(o, exact.float(), atol=1e-5, rtol=1e-5)


def test_prefill_entries_equal_the_reference():
    q_post = torch.randn(2, 4, 50, 64).to(DEVICE)
    q_pre = torch.randn(2, 4, 50, 64).to(DEVICE, torch.bfloat16)
    k, v = torch.randn(2, 2, 50, 64).to(DEVICE), torch.randn(2, 2, 50, 64).to(DEVICE)
    s0, ends = torch.tensor([0, 9], device=DEVICE), torch.tensor([50, 30], device=DEVICE)
    ring = MACRing.empty(2, 4, 16, 64, torch.bfloat16, DEVICE)
    ring.pos.fill_(123)  # stale contents: every slot must be rewritten
    mac_prefill.prefill_entries_(ring, q_post, q_pre, k, v, 0.125, s0, ends, offset=6, sinks=2,
                                 block_q=16, block_n=16)
    expected = prefill_entries(q_post, q_pre, k, v, 0.125, s0, ends, 16, 6, 2, F64)
    assert_rings_equal(ring, expected, 1e-5, 1e-5)


@pytest.mark.parametrize(("head_dim", "group", "dtype", "n_chunk"), [
    (64, 4, torch.float32, 7), (128, 2, torch.bfloat16, 40), (80, 1, torch.float16, 20),
], ids=str)
def test_prefill_entries_of_a_chunk_in_a_longer_cache_equal_the_reference(
        head_dim, group, dtype, n_chunk):
    # The chunk's queries sit at [ends - N, ends) of a cache longer than the sequence: keys
    # past ends (garbage here) must not be read, slots before the chunk stay empty.
    gen = torch.Generator().manual_seed(head_dim)
    q_heads, n_cache = 2 * group, 96
    q_post = torch.randn(2, q_heads, n_chunk, head_dim, generator=gen).to(DEVICE, dtype)
    q_pre = torch.randn(2, q_heads, n_chunk, head_dim, generator=gen).to(DEVICE, dtype)
    k = torch.randn(2, 2, n_cache, head_dim, generator=gen).to(DEVICE, dtype)
    v = torch.randn(2, 2, n_cache, head_dim, generator=gen).to(DEVICE, dtype)
    s0, ends = torch.tensor([3, 0], device=DEVICE), torch.tensor([61, 44], device=DEVICE)
    expected = prefill_entries(q_post, q_pre, k, v, 0.1, s0, ends, 32, 5, 1, F64)
    k[:, :, 61:] = float("nan")
    v[:, :, 61:] = float("nan")
    ring = MACRing.empty(2, q_heads, 32, head_dim, dtype, DEVICE)
    ring.lse.fill_(5.0)
    mac_prefill.prefill_entries_(ring, q_post, q_pre, k, v, 0.1, s0, ends, offset=5, sinks=1,
                                 block_q=16, block_n=16)
    assert_rings_equal(ring, expected, *TOLERANCES.get(dtype, (2e-3, 2e-3)))
    assert int((ring.pos[1] == -1).sum()) == q_heads * (32 - min(32, n_chunk))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chains_of_hits_from_prefill_keep_the_ring_equal_to_the_reference(dtype):
    """Prefill, then steps whose queries drift so the nearest entry is always t - 1: hits chain
    up to max_depth 2, the next step refreshes exactly; a jump in the queries forces a miss."""
    batch, q_heads, kv_heads, n_prompt, steps, head_dim, ring_size = 2, 4, 2, 40, 6, 64, 8
    gen = torch.Generator().manual_seed(11)
    n = n_prompt + steps
    q_pre = torch.randint(-1, 2, (batch, q_heads, 1, head_dim), generator=gen).float()
    drift = torch.zeros(batch, q_heads, n, head_dim)
    drift[..., 0] = torch.arange(n).float()  # distance to the entry of t - x: x^2
    drift[:, :, n_prompt + 2:, 1] = 40.0  # the jump
    q_pre = (q_pre + drift).to(DEVICE, dtype)
    q_post = torch.randn(batch, q_heads, n, head_dim, generator=gen).to(DEVICE, dtype)
    k = torch.randn(batch, kv_heads, n, head_dim, generator=gen).to(DEVICE, dtype)
    v = torch.randn(batch, kv_heads, n, head_dim, generator=gen).to(DEVICE, dtype)
    s0 = torch.tensor([0, 5], device=DEVICE)
    ring = MACRing.empty(batch, q_heads, ring_size, head_dim, dtype, DEVICE)
    mac_prefill.prefill_entries_(ring, q_post[:, :, :n_prompt], q_pre[:, :, :n_prompt],
                                 k[:, :, :n_prompt], v[:, :, :n_prompt], 0.125, s0,
                                 torch.tensor([n_prompt, n_prompt], device=DEVICE), offset=4)
    pattern = []
    for t in range(n_prompt, n):
        case = (q_post[:, :, t], q_pre[:, :, t], k, v, ring, torch.tensor([t, t], device=DEVICE),
                s0)
        hit, ring = assert_step_matches_reference(case, offset=4, max_depth=2, num_splits=2,
                                                  block_n=16)
        assert hit.all() or not hit.any()
        pattern.append(bool(hit.all()))
    assert pattern == [True, True, False, True, True, False]


def test_repeated_steps_from_one_ring_agree():
    q, q_pre, k, v, ring, t, s0 = make_case(seed=12, n_keys=90)
    params = dict(offset=8, sinks=2, tau=_tau(64), t_min=0, max_depth=3, num_splits=3,
                  block_n=16)
    first_ring = ring.clone()
    first = mac.mac_decode_step(q, q_pre, k, v, first_ring, t, s0, 0.125, **params)
    for _ in range(2):
        again_ring = ring.clone()
        again = mac.mac_decode_step(q, q_pre, k, v, again_ring, t, s0, 0.125, **params)
        assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(again_ring.tensors(), first_ring.tensors(),
                                                     strict=True))


def test_the_finalize_launch_counts_like_the_reference_counter_update():
    q, q_pre, k, v, ring, t, s0 = make_case(seed=5, n_keys=90)
    params = dict(offset=8, sinks=2, tau=_tau(64), t_min=0, max_depth=3, num_splits=3,
                  block_n=16)
    counters = torch.zeros(mac_counters.COUNTER_ROWS, q.shape[1], dtype=torch.int64,
                           device=q.device)
    counters[0] = 7  # adds to what is there
    want = counters.clone()
    for _ in range(2):
        _, hit, keys = mac.mac_decode_step(q, q_pre, k, v, ring.clone(), t, s0, 0.125,
                                           counters=counters, **params)
        mac_counters.count_decode_reference_(want, hit, keys, t, s0)
    assert hit.any() and not hit.all()  # both kinds of decision are counted
    assert torch.equal(counters, want)
    with pytest.raises(ValueError, match="counters"):
        mac.mac_decode_step(q, q_pre, k, v, ring.clone(), t, s0, 0.125,
                            counters=counters.int(), **params)


def test_alternating_shapes_and_the_exact_decode_kernel_share_counters_safely():
    # (2 rows x 2 KV heads) and (4 rows x 1 KV head) have 4 groups each: one set of counters
    # for both MAC shapes and for exact decode, with different split counts.
    for batch, kv_heads, splits in [(2, 2, 3), (4, 1, 2), (2, 2, 4), (4, 1, 3)]:
        case = make_case(batch=batch, kv_heads=kv_heads, group=2, n_keys=70, seed=splits)
        assert_step_matches_reference(case, offset=8, num_splits=splits, block_n=16)
        q, _, k, v, _, t, s0 = case
        o = decode.decode_attention(q, k, v, s0, t + 1, None, 0.125, num_splits=splits + 2,
                                    block_n=16)
        exact = reference.attention(q, k, v, 0.125, s0, t + 1, compute_dtype=F64)
        torch.testing.assert_close(o, exact.float(), atol=1e-4, rtol=1e-4)
