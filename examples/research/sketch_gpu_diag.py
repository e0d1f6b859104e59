"""The sketch selector's scoring launch on a GPU (BENCHMARKS.md 15): its error against the torch
reference per shape with the channel tile's floor at 16 and at 32, then the launch's tokens per
program and warps, and the candidate passes' chunk, load block and warps, checked and timed at
Llama-3.1-8B shapes, batch 16, 128K keys. Earlier variants, timed here and since removed
(BENCHMARKS.md 15, 16): even / odd tokens joined into token order before one product (415
against 397 us); integer-to-float conversions of the levels instead of the 0x6400 bit trick
(376 against 272 us); several blocks per program in a pipelined loop (slower at every depth).

    python3 examples/research/sketch_gpu_diag.py   (or: gpu_session.sh sketch-diag)
"""

import itertools
import json
import os
import sys

import torch
import triton

import macopt  # noqa: F401
from macopt.kernels import sketch_select as kernels
from macopt.topk_phi_select import (
    _sketch_query,
    build_sketch,
    sketch_scores_reference,
    sketch_shapes,
)

SHAPES = [(1, 3, 3, 64, 8224), (1, 8, 4, 64, 8224), (1, 3, 3, 128, 8224), (1, 8, 4, 128, 32768),
          (1, 2, 8, 64, 4096)]  # (batch, KV heads, group, head dim, keys)
TIMED = (16, 8, 4, 128, 131072)


def problem(batch, n_kv, group, head_dim, n_keys):
    gen = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(batch, n_kv * group, head_dim, device="cuda", dtype=torch.bfloat16,
                    generator=gen)
    k = torch.randn(batch, n_kv, n_keys, head_dim, device="cuda", dtype=torch.bfloat16,
                    generator=gen)
    lo = torch.full((batch,), 4, dtype=torch.int32, device="cuda")
    hi = torch.full((batch,), n_keys - 16, dtype=torch.int32, device="cuda")
    codes_shape, scales_shape = sketch_shapes(batch, n_kv, n_keys, head_dim)
    codes = torch.zeros(codes_shape, dtype=torch.uint8, device="cuda")
    scales = torch.ones(scales_shape, dtype=torch.float32, device="cuda")
    build_sketch(k, lo, hi, codes, scales)
    _, dims, q_scaled = _sketch_query(q, scales, head_dim**-0.5, n_kv, head_dim // 4)
    del k
    return codes, dims, q_scaled, lo, hi, n_keys


def run(args, **settings):
    saved = {name: getattr(kernels, name) for name in settings}
    for name, value in settings.items():
        setattr(kernels, name, value)
    try:
        return kernels.sketch_scores(*args, block_max=True)
    finally:
        for name, value in saved.items():
            setattr(kernels, name, value)


def error(args, want, **settings):
    got = run(args, **settings)[0].float()
    ok = torch.isfinite(want)
    return (got[ok] - want[ok]).abs().max().item()


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    print("batch KVheads group headdim keys | max error: floor16 | floor32 | max |score|")
    for shape in SHAPES:
        args = problem(*shape)
        want = sketch_scores_reference(*args).float()
        size = want[torch.isfinite(want)].abs().max().item()
        print(*shape, f"| {error(args, want, MIN_BLOCK_C=16):.4g} | {error(args, want):.4g} | "
              f"{size:.3g}")
    args = problem(*TIMED)
    want = sketch_scores_reference(*args).float()
    rows = []
    for tokens, warps in itertools.product((256, 512, 1024), (4, 8)):
        settings = dict(SCORE_TOKENS=tokens, SCORE_WARPS=warps)
        err = error(args, want, **settings)
        ms = triton.testing.do_bench(lambda s=settings: run(args, **s), rep=200)
        rows.append(dict(settings, max_error=err, us=1000 * ms))
        print(f"tokens {tokens:4} warps {warps} | {1000 * ms:7.1f} us | max error {err:.3g}")
    # The candidate passes (histogram, threshold, compaction) over the default launch's scores:
    # tokens a program owns (chunk) and loads at once (block), warps. Every variant must keep
    # the same candidates.
    scores, block_max = run(args)
    n_keep = 2 * int(0.02 * TIMED[-1])
    keep = kernels.select_candidates(scores, block_max, n_keep).sort(dim=-1).values
    candidate_rows = []
    for chunk, block, warps in itertools.product((4096, 16384), (1024, 4096), (4, 8)):
        settings = dict(_CHUNK=chunk, _BLOCK_S=block, HISTOGRAM_WARPS=warps, COMPACT_WARPS=warps)
        saved = {name: getattr(kernels, name) for name in settings}
        for name, value in settings.items():
            setattr(kernels, name, value)
        try:
            same = torch.equal(kernels.select_candidates(scores, block_max, n_keep)
                               .sort(dim=-1).values, keep)
            ms = triton.testing.do_bench(
                lambda: kernels.select_candidates(scores, block_max, n_keep), rep=200)
        finally:
            for name, value in saved.items():
                setattr(kernels, name, value)
        candidate_rows.append(dict(settings, same=same, us=1000 * ms))
        print(f"candidates: chunk {chunk:5} block {block:4} warps {warps} | {1000 * ms:7.1f} us"
              f" | same candidates {same}")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "sketch_scores_variants.json"), "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), shape=TIMED, rows=rows,
                           candidate_rows=candidate_rows), f, indent=1)
    sys.exit(0)
