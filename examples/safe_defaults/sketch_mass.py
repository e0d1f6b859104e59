"""Per-layer share of exact Top-K's attention mass kept by the sketch, channel and page selectors.

Usage: python examples/safe_defaults/sketch_mass.py OUT.json CAPTURE.pt [CAPTURE.pt ...]
(captures from capture_qk.py: post-RoPE keys of every layer and the prompt's last 8 queries).

Mass recall = attention mass (full softmax over all keys) on the middle keys a selector keeps,
divided by the mass on the middle keys exact Top-K keeps at the same budget (K = ceil(budget *
N) tokens; the page selector gets ceil(K / 32) whole pages). Per (layer, query head, query).
The selectors run as the decode ops run them (macopt.topk_phi_select; on CPU the torch
references of the sketch kernels, equal to the Triton kernels in tests/test_sketch_select.py).
"""
import json
import math
import sys
import time

import torch

from macopt.kernels import topk_phi_reference as ref
from macopt.topk_phi_select import (
    build_sketch,
    channel_selection,
    exact_selection,
    sketch_selection,
    sketch_shapes,
)

torch.set_num_threads(1)
BUDGETS = (0.01, 0.02, 0.05)
PAGE = 32
SINKS, TAIL = 4, 16


def selectors(D):
    return {"page": None, "channel": ("channel", 0, 2), "sketch": ("sketch", 0, 2),
            "sketch_r1": ("sketch", 0, 1), "sketch_r3": ("sketch", 0, 3),
            "sketch_c8": ("sketch", D // 8, 2)}


def measure(path):
    cap = torch.load(path)
    K_all, Q_all = cap["k"], cap["q_last"]
    L, Hkv, N, D = K_all.shape
    Hq, T = Q_all.shape[1], Q_all.shape[2]
    g, scale = Hq // Hkv, D ** -0.5
    lo, hi = torch.tensor([SINKS]), torch.tensor([N - TAIL])
    los, his = lo.expand(T), hi.expand(T)
    names = selectors(D)
    out = {name: {str(b): [] for b in BUDGETS} for name in names}
    for layer in range(L):
        k = K_all[layer][None]
        kk = k.expand(T, -1, -1, -1)
        q = Q_all[layer].transpose(0, 1)  # [T, Hq, D]: one row per decode-like query
        codes = torch.zeros(sketch_shapes(1, Hkv, N, D)[0], dtype=torch.uint8)
        scales = torch.zeros(sketch_shapes(1, Hkv, N, D)[1])
        build_sketch(k, lo, hi, codes, scales)
        codes_t, scales_t = codes.expand(T, -1, -1, -1), scales.expand(T, -1, -1)
        bounds = ref.build_page_bounds(k, lo, hi, PAGE)
        pb = ref.PageBounds(bounds.kmin.expand(T, -1, -1, -1), bounds.kmax.expand(T, -1, -1, -1))
        logits = torch.einsum("bhgd,bhnd->bhgn", q.view(T, Hkv, g, D), kk) * scale
        probs = torch.softmax(logits, -1).reshape(T, Hq, N)

        def mass(tokens):
            return (probs * ref.selection_mask(tokens, Hq, los, his, N)).sum(-1)

        for budget in BUDGETS:
            top_k = math.ceil(budget * N)
            exact = mass(exact_selection(q, kk, scale, los, his, top_k))
            for name, spec in names.items():
                if spec is None:
                    scores = ref.page_scores(q, pb, los, his, PAGE, scale)
                    tokens = ref.pages_to_tokens(ref.select_pages(scores, Hkv, -(-top_k // PAGE)),
                                                 PAGE)
                elif spec[0] == "channel":
                    tokens = channel_selection(q, kk, scale, los, his, top_k, spec[1], spec[2])
                else:
                    tokens = sketch_selection(q, kk, codes_t, scales_t, scale, los, his, top_k,
                                              spec[1], spec[2])
                out[name][str(budget)].append((mass(tokens) / exact).flatten().tolist())
        print(f"  layer {layer} done", file=sys.stderr, flush=True)
    return {"n_keys": N, "layers": L, "q_heads": Hq, "kv_heads": Hkv, "head_dim": D,
            "queries": T, "selectors": {n: list(s) if s else "page 32" for n, s in names.items()},
            "recall": out}


def median(values):
    return torch.tensor(values).median().item()


def report(result, label):
    names = list(result["recall"])
    L = result["layers"]
    lines = [f"## {label}: N {result['n_keys']}, median over {result['q_heads']} query heads x "
             f"{result['queries']} decode-like queries of mass(selector) / mass(exact Top-K)", ""]
    head = " | ".join(f"{n} {int(b * 100)}%" for b in BUDGETS for n in names)
    lines += [f"| layer | {head} |", "|---" * (1 + len(names) * len(BUDGETS)) + "|"]
    for layer in range(L):
        cells = [f"{median(result['recall'][n][str(b)][layer]):.3f}" for b in BUDGETS
                 for n in names]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    for what, fn in (("**all (median)**", median),
                     ("mean", lambda v: sum(v) / len(v)),
                     ("worst layer (median)", None)):
        cells = []
        for b in BUDGETS:
            for n in names:
                per_layer = result["recall"][n][str(b)]
                if fn is None:
                    cells.append(f"{min(median(v) for v in per_layer):.3f}")
                else:
                    cells.append(f"{fn([x for v in per_layer for x in v]):.3f}")
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    results = {}
    for path in sys.argv[2:]:
        start = time.time()
        result = measure(path)
        label = f"{result['n_keys']} tokens"
        results[label] = result
        print(report(result, label) + f"\n\n({time.time() - start:.0f} s)\n", flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)
