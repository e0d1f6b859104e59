"""Per-layer share of exact Top-K's attention mass kept by the page and channel selectors."""
import math
import sys

import torch

from macopt.kernels import topk_phi_reference as ref
from macopt.topk_phi_select import channel_selection, exact_selection

torch.set_num_threads(1)
cap = torch.load(sys.argv[1])
K_all, Q_all = cap["k"], cap["q_last"]
L, Hkv, N, D = K_all.shape; Hq = Q_all.shape[1]; g = Hq // Hkv; T = Q_all.shape[2]
scale = D ** -0.5; PAGE = 32
lo = torch.tensor([4]); hi = torch.tensor([N - 16])
rows = []
res = {}
for frac in (0.01, 0.02, 0.05):
    K = math.ceil(frac * N); n_pages = -(-K // PAGE)
    for l in range(L):
        k = K_all[l][None]; bounds = ref.build_page_bounds(k, lo, hi, PAGE)
        q = Q_all[l].transpose(0, 1)  # [T, Hq, D] as a batch of T rows
        kk = k.expand(T, -1, -1, -1); los, his = lo.expand(T), hi.expand(T)
        probs = torch.softmax(torch.einsum("bhgd,bhnd->bhgn", q.view(T, Hkv, g, D), kk) * scale, -1).reshape(T, Hq, N)
        mass = lambda tok: (probs * ref.selection_mask(tok, Hq, los, his, N)).sum(-1)
        ex = mass(exact_selection(q, kk, scale, los, his, K))
        pg = mass(ref.pages_to_tokens(ref.select_pages(ref.page_scores(q, ref.PageBounds(bounds.kmin.expand(T, -1, -1, -1), bounds.kmax.expand(T, -1, -1, -1)), los, his, PAGE, scale), Hkv, n_pages), PAGE))
        ch = mass(channel_selection(q, kk, scale, los, his, K))
        res[(frac, l)] = ((pg / ex).flatten(), (ch / ex).flatten())
print(f"N {N}; median over 9 query heads x {T} decode-like queries of mass(selector)/mass(exact Top-K)")
print("| layer | page 1% | channel 1% | page 2% | channel 2% | page 5% | channel 5% |")
print("|---|---|---|---|---|---|---|")
for l in range(L):
    print(f"| {l} | " + " | ".join(f"{res[(f, l)][i].median():.3f}" for f in (0.01, 0.02, 0.05) for i in (0, 1)) + " |")
print("| all | " + " | ".join(f"{torch.cat([res[(f, l)][i] for l in range(L)]).median():.3f}" for f in (0.01, 0.02, 0.05) for i in (0, 1)) + " |")
print("| min layer | " + " | ".join(f"{min(res[(f, l)][i].median() for l in range(L)):.3f}" for f in (0.01, 0.02, 0.05) for i in (0, 1)) + " |")
