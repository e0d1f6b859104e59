"""Sweep the exact decode kernel's launch parameters on a GPU (tuning aid, not a user command).

    python -m examples.research.decode_sweep --json sweep.json

Times every (block_n, num_warps, num_stages, split factor, fused merge) at a few Llama-3.1-8B
layer shapes under CUDA-graph replay and prints, per shape, the default config's time beside
the best one, so :func:`macopt.kernels.launch.decode_launch_config` can be set from measurements.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from macopt.bench.timing import environment, graph_median_ms
from macopt.kernels import decode, launch

SHAPES = ((1, 4096), (1, 32768), (1, 131072), (8, 32768), (32, 131072))
BLOCK_N = (32, 64)
WARPS = (4,)
STAGES = (2, 3)
SPLIT_FACTORS = (0.5, 1.0, 2.0)
FUSE_MERGE = (False, True)


def _inputs(batch, n_keys, q_heads=32, kv_heads=8, head_dim=128):
    q = torch.randn(batch, q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, n_keys, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    starts = torch.zeros(batch, dtype=torch.int32, device="cuda")
    ends = torch.full((batch,), n_keys, dtype=torch.int32, device="cuda")
    return q, k, v, starts, ends


def sweep_shape(batch: int, n_keys: int) -> list[dict]:
    q, k, v, starts, ends = _inputs(batch, n_keys)
    default = launch.decode_launch_config(batch, 8, n_keys, 128, 4, q.device)
    rows = []
    grid = itertools.product(BLOCK_N, WARPS, STAGES, SPLIT_FACTORS, FUSE_MERGE)
    for block_n, warps, stages, factor, fuse in grid:
        splits = max(1, min(128, round(default.num_splits * factor)))

        def run(block_n=block_n, warps=warps, stages=stages, splits=splits, fuse=fuse):
            return decode.decode_attention(q, k, v, starts, ends, None, 128**-0.5, splits,
                                           block_n=block_n, num_warps=warps, num_stages=stages,
                                           fuse_merge=fuse)

        try:
            ms = graph_median_ms(run)
        except Exception as err:  # a config the compiler rejects (e.g. out of shared memory)
            rows.append(dict(batch=batch, n_keys=n_keys, block_n=block_n, num_warps=warps,
                             num_stages=stages, num_splits=splits, fuse_merge=fuse,
                             error=str(err)[:200]))
            continue
        rows.append(dict(batch=batch, n_keys=n_keys, block_n=block_n, num_warps=warps,
                         num_stages=stages, num_splits=splits, fuse_merge=fuse, ms=ms,
                         is_default=(block_n, warps, stages, splits, fuse) == (
                             default.block_n, default.num_warps, default.num_stages,
                             default.num_splits, default.fuse_merge)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write all timings here")
    args = parser.parse_args()
    results = []
    for batch, n_keys in SHAPES:
        rows = sweep_shape(batch, n_keys)
        results.extend(rows)
        timed = [r for r in rows if "ms" in r]
        best = min(timed, key=lambda r: r["ms"])
        default = next((r for r in timed if r["is_default"]), None)
        kv_bytes = 2 * batch * 8 * n_keys * 128 * 2
        fused = min((r for r in timed if r["fuse_merge"]), key=lambda r: r["ms"])
        print(f"B={batch:3d} N={n_keys:6d}  default {default and default['ms']:.4f} ms  "
              f"best {best['ms']:.4f} ms ({kv_bytes / best['ms'] / 1e6:.0f} GB/s) "
              f"block_n={best['block_n']} warps={best['num_warps']} stages={best['num_stages']} "
              f"splits={best['num_splits']} fused={best['fuse_merge']}  "
              f"best fused {fused['ms']:.4f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment("cuda"), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
