import math
import sys

import torch

cap = torch.load(sys.argv[1]); qp = cap["q_pre"].float()  # [L, Hq, T, D]
L, H, T, D = qp.shape
q = qp / qp.norm(dim=-1, keepdim=True) * math.sqrt(D)
mask = torch.ones(T, T, dtype=torch.bool).tril(-1) & ~torch.ones(T, T, dtype=torch.bool).tril(-513)
taus = [0.45, 0.7, 0.8, 0.85, 0.9]
print("layer " + " ".join(f"rel{t}" for t in taus) + "  abs0.45")
for l in range(L):
    d = torch.cdist(q[l], q[l]).masked_fill(~mask, float("inf"))[:, 512:].min(-1).values
    da = torch.cdist(qp[l], qp[l]).masked_fill(~mask, float("inf"))[:, 512:].min(-1).values
    print(l, " ".join(f"{(d < math.sqrt(2*D)*(1-t)).float().mean():.2f}" for t in taus), f"{(da < math.sqrt(2*D)*0.55).float().mean():.2f}")
