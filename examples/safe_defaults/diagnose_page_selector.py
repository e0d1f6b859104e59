"""Mass recall of page vs exact Top-K selection per layer on captured real-text q/k."""
import math
import sys

import torch

from macopt.kernels import topk_phi_reference as ref

cap = torch.load(sys.argv[1])
K_all, Q_all = cap["k"], cap["q_last"]   # [L, Hkv, N, D], [L, Hq, T, D]
ids = cap["input_ids"][0].tolist()
L, Hkv, N, D = K_all.shape; Hq = Q_all.shape[1]; g = Hq // Hkv
scale = D ** -0.5; SINKS, TAIL, PAGE = 4, 16, 32
mid_start = torch.tensor([SINKS]); mid_end = torch.tensor([N - TAIL])
import os; STATIC = bool(os.environ.get('STATIC'))
variants = sys.argv[2].split(",") if len(sys.argv) > 2 else ["quest"]

def group_probs(q, k):
    """full-softmax probs over all N keys per query head, [Hq, N] (causal: all keys visible)."""
    s = torch.einsum("hgd,hnd->hgn", q.view(Hkv, g, D), k) * scale
    return torch.softmax(s.reshape(Hq, N), -1)

def mass(probs, tokens):
    """mass per query head of the mid keys in tokens [Hkv, K]."""
    sel = ref.selection_mask(tokens[None], Hq, mid_start, mid_end, N)[0]
    return (probs * sel).sum(-1)

def page_select(q, k, n_pages, how, bounds):
    global KTOK
    sc = ref.page_scores(q[None], bounds, mid_start, mid_end, PAGE, scale)[0]  # [Hq, P]
    if how.startswith("sparq"):  # r shared channels of the group by sum |q|, approx scores, exact rerank of c*K
        r, c = map(int, how[5:].split("x"))
        qg = q.view(Hkv, g, D)
        if STATIC:  # channels fixed at prefill from the keys' mean |k|
            ins0 = ref.positions_in(mid_start, mid_end, N)[0]
            ch = k[:, ins0].abs().mean(1).topk(r, -1).indices
        else:
            ch = qg.abs().sum(1).topk(r, -1).indices  # [Hkv, r]
        kr = torch.gather(k, 2, ch[:, None, :].expand(-1, N, -1))
        qr = torch.gather(qg, 2, ch[:, None, :].expand(-1, g, -1))
        s = torch.einsum("hgr,hnr->hgn", qr, kr) * scale
        ins = ref.positions_in(mid_start, mid_end, N)[0]
        s = s.masked_fill(~ins, -math.inf)
        s = (s - torch.logsumexp(s, -1, keepdim=True)).amax(1)
        cand = torch.topk(s, min(c * KTOK, N), -1).indices  # [Hkv, C]
        kc = torch.gather(k, 1, cand[..., None].expand(-1, -1, D))
        s2 = torch.einsum("hgd,hcd->hgc", qg, kc) * scale
        s2 = s2.masked_fill(~ins[cand][:, None], -math.inf)
        s2 = (s2 - torch.logsumexp(s2, -1, keepdim=True)).amax(1)
        return torch.gather(cand, 1, torch.topk(s2, KTOK, -1).indices).int()
    if how == "quest":
        pages = ref.select_pages(sc[None], Hkv, n_pages)[0]
    elif how == "lse":  # normalise each head by logsumexp of its page bounds (+ log page)
        lse = torch.logsumexp(sc, -1, keepdim=True)
        rel = (sc - lse).view(Hkv, g, -1).amax(1)
        pages = ref.top_indices(rel[None], min(n_pages, rel.shape[-1]))[0]
    elif how.startswith("two"):  # Quest bounds pick c x pages, exact scores keep the top K
        c = int(how[3:]); cand = ref.select_pages(sc[None], Hkv, c * n_pages)[0]
        toks = ref.pages_to_tokens(cand, PAGE).long()  # [Hkv, C]
        toks = toks.clamp(max=N - 1)
        kc = torch.gather(k, 1, toks[..., None].expand(-1, -1, D))
        s = torch.einsum("hgd,hcd->hgc", q.view(Hkv, g, D), kc) * scale
        ok = (toks >= mid_start) & (toks < mid_end)
        s = s.masked_fill(~ok[:, None], -math.inf)
        s = (s - torch.logsumexp(s, -1, keepdim=True)).amax(1)
        top = torch.topk(s, min(KTOK, s.shape[-1]), -1).indices
        return torch.gather(toks, 1, top).int()
    elif how == "oracle":  # true best key score per page, lse normalised (granularity limit)
        s = torch.einsum("hgd,hnd->hgn", q.view(Hkv, g, D), k) * scale
        ins = ref.positions_in(mid_start, mid_end, N)[0]
        s = s.masked_fill(~ins, -math.inf)
        s = s - torch.logsumexp(s, -1, keepdim=True)
        P = -(-N // PAGE); s = torch.nn.functional.pad(s, (0, P * PAGE - N), value=-math.inf)
        rel = s.view(Hkv, g, P, PAGE).amax(-1).amax(1)
        pages = ref.top_indices(rel[None], n_pages)[0]
    return ref.pages_to_tokens(pages, PAGE)

# needle positions: digit run 4 8 2 1 3
toks = [str(t) for t in ids]
from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained("/root/.cache/macopt/smollm2-135m-instruct")
dec = [tok.decode([t]).strip() for t in ids]
needle = [i for i in range(N - 4) if dec[i:i + 5] == list("48213")]
needle_pos = sorted({i + j for i in needle for j in range(5)})
print("N", N, "needle starts", needle)
for frac in (0.01, 0.02, 0.05):
    K = max(1, math.ceil(frac * N)); KTOK = K; n_pages = -(-K // PAGE)
    print(f"\n== budget {frac:.0%}: K {K} tokens, page selector {n_pages} pages = {n_pages*PAGE} tokens")
    print("layer " + " ".join(f"{v:>16s}" for v in variants) + "  exact_mid_mass  needle(exact/" + "/".join(variants) + ")")
    allrec = {v: [] for v in variants}
    for l in range(L):
        k = K_all[l]; bounds = ref.build_page_bounds(k[None], mid_start, mid_end, PAGE)
        recs = {v: [] for v in variants}; em = []; nd = {v: 0 for v in ["exact"] + variants}
        for t in range(Q_all.shape[2]):
            q = Q_all[l, :, t]
            p = group_probs(q, k)
            ex = ref.exact_topk(q[None], k[None], scale, mid_start, mid_end, K)[0]
            m_ex = mass(p, ex); em.append(m_ex)
            def has_needle(tokens):
                return int(any(pos in set(tokens.flatten().tolist()) for pos in needle_pos))
            if t == Q_all.shape[2] - 1: nd["exact"] = has_needle(ex)
            for v in variants:
                pt = page_select(q, k, n_pages, v, bounds)
                recs[v].append(mass(p, pt) / m_ex.clamp(min=1e-12))
                if t == Q_all.shape[2] - 1: nd[v] = has_needle(pt)
        row = []
        for v in variants:
            r = torch.stack(recs[v]).median(0).values.median().item()  # median over steps, then heads
            allrec[v].append(torch.stack(recs[v]).flatten()); row.append(f"{r:16.3f}")
        print(f"{l:5d} " + " ".join(row) + f"  {torch.stack(em).median().item():14.3f}  " + "/".join(str(nd[x]) for x in ["exact"] + variants))
    print("all-layers median over heads*steps: " + ", ".join(f"{v} {torch.cat(allrec[v]).median().item():.3f} (mean {torch.cat(allrec[v]).mean().item():.3f})" for v in variants))
