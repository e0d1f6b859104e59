"""Is Top-K + phi's completion biased on a real model? (docs/REAL_MODEL.md, "Bars": phi lowers
the attention-output error on 259 of 270 heads yet doubles exp(KL) on SmolLM2.)

For one chunk of the evaluation text (CPU, fp32), every layer's real decode queries: exact
Top-K selection at a budget over the prompt's middle keys, then, per query head, the
completion's estimate of the unselected middle keys' mass (log Z_R, from the feature maps)
against the true mass of those keys (logsumexp of their scores), and the completion's value
(y_R) against the true mean value of those keys. A bias that points one way in every head and
layer compounds through the model where a per-head error of either sign would not.

    python -m examples.research.phi_mass_bias [MAPS.safetensors] [--budget 0.02] [--length 2048]

Without MAPS: the default positive random features (what ``TopKPhiConfig()`` uses).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from macopt.evaluation.capture import AttentionCall
from macopt.evaluation.text import read_text
from macopt.evaluation.topk_error import capture
from macopt.kernels import topk_phi_reference as ref
from macopt.kernels.feature_maps import load_feature_maps, log_features, positive_random_features

TEXT = "macopt/bench/results/real_text/evaluation.txt.gz"


def layer_bias(call: AttentionCall, maps, prefill: int, budget: float, queries: int,
               sinks: int = 4, tail: int = 16) -> dict:
    """Medians over query heads and ``queries`` decode positions: log Z_R - log(true rest
    mass), the estimated and true shares of the rest in the whole mass, the cosine of y_R with
    the rest's true mean value, and |y_R| / |that value|."""
    _, n_q, length, _ = call.q.shape
    n_kv = call.k.shape[1]
    group = n_q // n_kv
    k, v, scale = call.k.float(), call.v.float(), call.scale
    start = torch.zeros(1, dtype=torch.int32)
    mid_start, mid_end = ref.mid_range(start, start + prefill, sinks, tail)
    log_phi_k = log_features(k, maps.phi_k.folded())
    summary = ref.build_summary(v, log_phi_k, mid_start, mid_end)
    top_k = max(1, int(budget * length))
    rows = {"log_ratio": [], "share_est": [], "share_true": [], "cos": [], "norm": []}
    picks = torch.linspace(prefill, length - 1, queries).round().long().unique()
    for p in picks.tolist():
        q = call.q[:, :, p].float()
        ends = start + p + 1
        selected = ref.exact_topk(q, k, scale, mid_start, mid_end, top_k)
        retrieved = ref.selection_mask(selected, n_q, mid_start, mid_end, k.shape[2])
        current = ref.positions_in(start, ends, k.shape[2])[:, None, :]
        mid = ref.positions_in(mid_start, mid_end, k.shape[2])[:, None, :]
        rest = (mid & ~retrieved & current)[0]  # [Hq, N]
        logits = torch.einsum("hd,hnd->hn", q[0], k[0].repeat_interleave(group, 0)) * scale
        logits = logits.masked_fill(~current[0].expand_as(logits), float("-inf"))
        lse_all = torch.logsumexp(logits, -1)
        rest_logits = logits.masked_fill(~rest, float("-inf"))
        lse_rest = torch.logsumexp(rest_logits, -1)
        v_q = v[0].repeat_interleave(group, 0)
        o_rest = torch.einsum("hn,hnd->hd", torch.softmax(rest_logits, -1), v_q)
        u_r, t_r = ref.subtract_retrieved(summary, v, log_phi_k, retrieved)
        log_phi_q = log_features(q[:, :, None], maps.phi_q.folded())[:, :, 0]
        y, log_z = ref.completion_state(log_phi_q, summary.m.repeat_interleave(group, 1), u_r,
                                        t_r)
        attend = (current & ~mid) | (retrieved & current)
        lse_exact = torch.logsumexp(logits.masked_fill(~attend[0], float("-inf")), -1)
        ok = torch.isfinite(lse_rest)
        rows["log_ratio"] += (log_z[0] - lse_rest)[ok].tolist()
        rows["share_true"] += torch.exp(lse_rest - lse_all)[ok].tolist()
        est = torch.exp(log_z[0] - torch.logaddexp(log_z[0], lse_exact))
        rows["share_est"] += est[ok].tolist()
        rows["cos"] += torch.cosine_similarity(y[0], o_rest, dim=-1)[ok].tolist()
        rows["norm"] += (y[0].norm(dim=-1) / o_rest.norm(dim=-1).clamp_min(1e-30))[ok].tolist()
    return {key: statistics.median(values) for key, values in rows.items() if values}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("maps", nargs="?")
    parser.add_argument("--budget", type=float, default=0.02)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--queries", type=int, default=8)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from macopt.models import model_dir

    path = model_dir("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    model.set_attn_implementation("sdpa")
    ids = tokenizer(read_text([TEXT]), add_special_tokens=False)["input_ids"][:args.length]
    calls = capture(model, ids)
    prefill = args.length - args.decode
    files = load_feature_maps(args.maps) if args.maps else None
    print(f"maps: {args.maps or 'positive random features (default)'}; budget {args.budget}; "
          f"{args.length} tokens, decode queries at [{prefill}, {args.length})")
    print("layer | median over heads and queries: log Z_R - log true rest mass | "
          "rest share est / true | cos(y_R, true rest value) | norm ratio")
    from macopt.phi_files import site_name

    for call in calls:
        n_q, d = call.q.shape[1], call.q.shape[-1]
        maps = files[site_name(call.layer)] if files else positive_random_features(
            n_q, call.k.shape[1], d, d, generator=torch.Generator().manual_seed(0))
        row = layer_bias(call, maps, prefill, args.budget, args.queries)
        print(f"{call.layer:5d} | {row['log_ratio']:+.3f} | {row['share_est']:.3f} / "
              f"{row['share_true']:.3f} | {row['cos']:.3f} | {row['norm']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
