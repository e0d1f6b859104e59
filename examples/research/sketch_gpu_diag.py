"""Where the sketch selector's scores go wrong on a GPU: `sketch_scores` against its torch
reference per shape, with the channel tile's floor at 16 and at 32 (BENCHMARKS.md 15).

    python3 examples/research/sketch_gpu_diag.py   (or: gpu_session.sh sketch-diag)
"""

import torch

import macopt  # noqa: F401
from macopt.kernels import sketch_select as kernels
from macopt.topk_phi_select import (
    _sketch_query,
    build_sketch,
    sketch_scores_reference,
    sketch_shapes,
)

SHAPES = [(3, 3, 64, 8224), (8, 4, 64, 8224), (3, 3, 128, 8224), (8, 4, 128, 32768),
          (2, 8, 64, 4096)]  # (KV heads, group, head dim, keys)


def score_error(n_kv, group, head_dim, n_keys, floor):
    gen = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(1, n_kv * group, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, n_kv, n_keys, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    lo = torch.tensor([4], dtype=torch.int32, device="cuda")
    hi = torch.tensor([n_keys - 16], dtype=torch.int32, device="cuda")
    codes_shape, scales_shape = sketch_shapes(1, n_kv, n_keys, head_dim)
    codes = torch.zeros(codes_shape, dtype=torch.uint8, device="cuda")
    scales = torch.ones(scales_shape, dtype=torch.float32, device="cuda")
    build_sketch(k, lo, hi, codes, scales)
    _, dims, q_scaled = _sketch_query(q, scales, head_dim**-0.5, n_kv, head_dim // 4)
    want = sketch_scores_reference(codes, dims, q_scaled, lo, hi, n_keys).float()
    kernels.MIN_BLOCK_C = floor
    got = kernels.sketch_scores(codes, dims, q_scaled, lo, hi, n_keys).float()
    ok = torch.isfinite(want)
    return (got[ok] - want[ok]).abs().max().item(), want[ok].abs().max().item()


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__)
    print("KVheads group headdim keys | max error floor16 | floor32 | max |score|")
    for shape in SHAPES:
        e16, size = score_error(*shape, 16)
        e32, _ = score_error(*shape, 32)
        print(*shape, f"| {e16:.4g} | {e32:.4g} | {size:.3g}")
    kernels.MIN_BLOCK_C = 32
