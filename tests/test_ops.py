"""The torch.ops.macopt ops: registration (opcheck), torch.compile, and input validation."""

import pytest
import torch

import macopt  # noqa: F401  (registers torch.ops.macopt.*)

ops = torch.ops.macopt
DECODE_OPS = [
    pytest.param(ops.decode_attention, id="decode_attention"),
    pytest.param(ops.decode_attention_state, id="decode_attention_state"),
]
SCALE = 64**-0.5


def decode_args(dtype=torch.float32, with_mask=True, **overrides):
    """A tiny valid decode problem as a dict: batch 2, 4 query heads over 2 KV heads, D = 64,
    8 keys; row 0 attends keys [1, 8) with holes in the mask, row 1 is empty."""
    gen = torch.Generator().manual_seed(0)
    args = {
        "q": torch.randn(2, 4, 64, generator=gen).to(dtype),
        "k": torch.randn(2, 2, 8, 64, generator=gen).to(dtype),
        "v": torch.randn(2, 2, 8, 64, generator=gen).to(dtype),
        "starts": torch.tensor([1, 5]),
        "ends": torch.tensor([8, 5], dtype=torch.int32),
        "key_mask": torch.tensor([[1, 1, 0, 1, 1, 0, 1, 1]] * 2, dtype=torch.bool)
        if with_mask else None,
        "scale": SCALE,
    }
    return {**args, **overrides}


def state_args(**overrides):
    """Two fp32 states [2, 3, 64] to merge, with empty entries on both sides and in both."""
    gen = torch.Generator().manual_seed(1)
    o_a, o_b = torch.randn(2, 2, 3, 64, generator=gen)
    lse_a, lse_b = torch.randn(2, 2, 3, generator=gen) * 5
    neg_inf = float("-inf")
    lse_a[0, 0], lse_b[0, 1], lse_a[1, 2], lse_b[1, 2] = neg_inf, neg_inf, neg_inf, neg_inf
    o_a[lse_a == neg_inf], o_b[lse_b == neg_inf] = 0.0, 0.0
    return {"o_a": o_a, "lse_a": lse_a, "o_b": o_b, "lse_b": lse_b, **overrides}


# --- registration ----------------------------------------------------------------------------


@pytest.mark.parametrize("op", DECODE_OPS)
@pytest.mark.parametrize("with_mask", [True, False], ids=["key_mask", "no_key_mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_ops_pass_opcheck(op, with_mask, dtype):
    torch.library.opcheck(op, tuple(decode_args(dtype, with_mask).values()))


def test_merge_states_passes_opcheck():
    torch.library.opcheck(ops.merge_states, tuple(state_args().values()))


# --- torch.compile ---------------------------------------------------------------------------


def compiled(fn):
    return torch.compile(fn, fullgraph=True, backend="inductor")


def test_decode_attention_compiles_with_fullgraph_and_matches_eager():
    def attend_and_project(q, k, v, starts, ends, key_mask, scale):
        return ops.decode_attention(q * 2.0, k, v, starts, ends, key_mask, scale) + 1.0

    args = tuple(decode_args().values())
    torch.testing.assert_close(compiled(attend_and_project)(*args), attend_and_project(*args))


def test_decode_attention_state_compiles_with_fullgraph_and_matches_eager():
    def state_of_shifted_query(q, k, v, starts, ends, key_mask, scale):
        o, lse = ops.decode_attention_state(q + 0.5, k, v, starts, ends, key_mask, scale)
        return o * 3.0, lse - 1.0

    args = tuple(decode_args(with_mask=False).values())
    torch.testing.assert_close(
        compiled(state_of_shifted_query)(*args), state_of_shifted_query(*args)
    )


def test_merge_states_compiles_with_fullgraph_and_matches_eager():
    def merge_rescaled(o_a, lse_a, o_b, lse_b):
        o, lse = ops.merge_states(o_a * 0.5, lse_a, o_b, lse_b + 1.0)
        return o.sum(dim=-1), lse

    args = tuple(state_args().values())
    torch.testing.assert_close(compiled(merge_rescaled)(*args), merge_rescaled(*args))


# --- validation: bad input raises ValueError naming the argument --------------------------


def shape_4d(name):
    return lambda a: {name: a[name][None]}


BAD_DECODE_INPUTS = [
    pytest.param(shape_4d("q"), "q", id="q-not-3d"),
    pytest.param(lambda a: {"k": a["k"][0]}, "k", id="k-not-4d"),
    pytest.param(lambda a: {"v": a["v"][:, :, :7]}, "v", id="v-shape-differs-from-k"),
    pytest.param(lambda a: {"k": a["k"][:1], "v": a["v"][:1]}, "k", id="k-batch-differs-from-q"),
    pytest.param(lambda a: {"k": a["k"][..., :32], "v": a["v"][..., :32]}, "k",
                 id="k-head-dim-differs-from-q"),
    pytest.param(lambda a: {"q": torch.zeros(2, 4, 72), "k": torch.zeros(2, 2, 8, 72),
                            "v": torch.zeros(2, 2, 8, 72)}, "q: head_dim 72", id="head-dim-72"),
    pytest.param(lambda a: {"q": torch.zeros(2, 32, 64), "k": a["k"][:, :1], "v": a["v"][:, :1]},
                 "q: GQA group 32", id="gqa-group-32"),
    pytest.param(lambda a: {"k": torch.zeros(2, 3, 8, 64), "v": torch.zeros(2, 3, 8, 64)}, "k",
                 id="kv-heads-do-not-divide-q-heads"),
    pytest.param(lambda a: {"q": a["q"].double(), "k": a["k"].double(), "v": a["v"].double()},
                 "q: dtype", id="float64-inputs"),
    pytest.param(lambda a: {"q": a["q"].int(), "k": a["k"].int(), "v": a["v"].int()},
                 "q: dtype", id="int-inputs"),
    pytest.param(lambda a: {"k": a["k"].bfloat16()}, "k", id="k-dtype-differs-from-q"),
    pytest.param(lambda a: {"v": a["v"].half()}, "v", id="v-dtype-differs-from-q"),
    pytest.param(lambda a: {"starts": torch.tensor([0, 1, 2])}, "starts", id="starts-wrong-shape"),
    pytest.param(lambda a: {"ends": a["ends"].float()}, "ends", id="ends-float"),
    pytest.param(lambda a: {"starts": a["starts"].to(torch.int16)}, "starts", id="starts-int16"),
    pytest.param(lambda a: {"key_mask": a["key_mask"].to(torch.uint8)}, "key_mask",
                 id="key-mask-uint8"),
    pytest.param(lambda a: {"key_mask": torch.ones(2, 9, dtype=torch.bool)}, "key_mask",
                 id="key-mask-wrong-shape"),
    pytest.param(lambda a: {"k": a["k"].to("meta")}, "k", id="k-on-another-device"),
    pytest.param(lambda a: {"starts": a["starts"].to("meta")}, "starts",
                 id="starts-on-another-device"),
    pytest.param(lambda a: {"key_mask": a["key_mask"].to("meta")}, "key_mask",
                 id="key-mask-on-another-device"),
]


@pytest.mark.parametrize("op", DECODE_OPS)
@pytest.mark.parametrize("bad_input, named", BAD_DECODE_INPUTS)
def test_decode_ops_reject_bad_input_naming_the_argument(op, bad_input, named):
    args = decode_args()
    args.update(bad_input(args))
    with pytest.raises(ValueError, match=f"^{named}"):
        op(*args.values())


BAD_STATES = [
    pytest.param(lambda a: {"o_a": a["o_a"].half()}, "o_a", id="o_a-fp16"),
    pytest.param(lambda a: {"o_b": a["o_b"].bfloat16()}, "o_b", id="o_b-bf16"),
    pytest.param(lambda a: {"lse_b": a["lse_b"].double()}, "lse_b", id="lse_b-fp64"),
    pytest.param(lambda a: {"lse_a": a["lse_a"][..., :2]}, "o_a", id="lse_a-shape-not-o_a-shape"),
    pytest.param(lambda a: {"o_b": a["o_b"][..., :32], "lse_b": a["lse_b"]}, "o_b",
                 id="o_b-head-dim-differs"),
    pytest.param(lambda a: {"lse_b": a["lse_b"].to("meta")}, "lse_b", id="lse_b-on-another-device"),
]


@pytest.mark.parametrize("bad_input, named", BAD_STATES)
def test_merge_states_rejects_bad_states_naming_the_argument(bad_input, named):
    args = state_args()
    args.update(bad_input(args))
    with pytest.raises(ValueError, match=f"^{named}"):
        ops.merge_states(*args.values())


def test_decode_ops_accept_int32_and_int64_ranges_together():
    args = decode_args(starts=torch.tensor([1, 5], dtype=torch.int32),
                       ends=torch.tensor([8, 5], dtype=torch.int64))
    o, lse = ops.decode_attention_state(*args.values())
    assert o.shape == (2, 4, 64) and lse.shape == (2, 4) and torch.isneginf(lse[1]).all()
