"""Top-K + phi split-kernel variants on the GPU (CUDA only; run from a checkout: the error
part reuses the kernel tests' problems from ``tests/``). A profiling aid behind BENCHMARKS.md
section 3d, not a ``macopt bench`` sub-command.

    python -m examples.research.topk_variants          # precision variants: error and step time
    python -m examples.research.topk_variants warps    # launch variants of the default precision
    python -m examples.research.topk_variants splits   # splits x warps, 16 features, 64-key pages

Error: worst |kernel - fp64 reference| over the states of the bf16 kernel-test problems.
Time: CUDA-graph replay median of the whole decode step (selection included) at batch 16,
128K, page selector, 2% (the Top-K + phi issue's bar point), plus per-kernel device times.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

from examples.research import profile_steps
from examples.research.results import write_rows
from macopt.bench import decode, timing
from macopt.bench import topk as bench_topk
from macopt.kernels import topk_phi
from macopt.kernels import topk_phi_reference as ref

VARIANTS = [(True, "tf32x3"), (True, "tf32"), (False, "tf32"), (False, "tf32x3"), (True, "ieee")]


def worst_errors() -> dict[str, float]:
    """Worst state error of the kernel against fp64 on the bf16 kernel-test problems."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    import test_topk_phi_kernels as cases

    worst = {}
    for head_dim in (64, 128):
        for group in (1, 4, 8):
            p = cases.make_problem(n_q_heads=2 * group, n_kv_heads=2, head_dim=head_dim,
                                   d_phi=32, n_keys=112, dtype=torch.bfloat16,
                                   lengths=[100, 57], n_generated=5, seed=group)
            if group == 4:
                cases._switch_mlp_on(p)
            selected = ref.exact_topk(p.q, p.k, p.scale, p.mid_start, p.mid_end, top_k=24)
            kernel, oracle = cases._both_decodes(p, selected, num_splits=3, block_n=16)
            worst[f"D{head_dim} g{group}"] = max(
                (kernel[i] - oracle[i].float()).abs().max().item() for i in (0, 1))
    return worst


def _bar_step(d_phi: int = 128, page_size: int = 32):
    """The decode step at the bar point, and a function that rebuilds its prefill state."""
    from macopt.kernels.feature_maps import positive_random_features
    from macopt.topk_phi_state import TopKPhiState
    from macopt.topk_phi_state import decode as topk_decode
    from macopt.topk_phi_state import prefill as topk_prefill

    device = torch.device("cuda")
    config = bench_topk.TopKBenchConfig(device="cuda", d_phi=d_phi, page_size=page_size)
    maps = positive_random_features(32, 8, 128, config.d_phi,
                                    generator=torch.Generator().manual_seed(0))
    shape = decode.LayerShape(16, 131072, **profile_steps.LAYER)
    x = decode.make_inputs(shape, device, torch.Generator(device).manual_seed(0))
    method = config.method(0.02, "page")

    def build():
        state = TopKPhiState.allocate(16, 32, 8, 131072, 128, torch.bfloat16, device,
                                      page_size=method.page_size, maps=maps)
        topk_prefill(state, x.k, x.v, x.starts, x.ends, method)  # the summary follows HALF
        return lambda: topk_decode(state, x.q, x.k, x.v, x.starts, x.ends, x.scale, method)
    return build


def precision_variants(rows: list[dict]) -> None:
    build = _bar_step()
    for half, precision in VARIANTS:
        topk_phi.HALF_FEATURES, topk_phi.SHARE_PRECISION = half, precision
        errors = worst_errors()
        step = build()
        ms = timing.graph_median_ms(step)
        rows.append(dict(half=half, share_precision=precision, ms=ms, max_error=errors,
                         kernels_us=profile_steps.kernel_us(step)))
        print(f"half={half} share={precision:7s} step {ms * 1000:7.1f} us  "
              f"worst error {max(errors.values()):.4f}", flush=True)
        del step
        torch.cuda.empty_cache()


def launch_variants(rows: list[dict]) -> None:
    step = _bar_step()()
    original = topk_phi.topk_phi_decode
    try:
        for warps in (4, 8):
            for block_n in (None, 32):
                topk_phi.topk_phi_decode = functools.partial(original, num_warps=warps,
                                                             block_n=block_n)
                ms = timing.graph_median_ms(step)
                rows.append(dict(warps=warps, block_n=block_n, ms=ms))
                print(rows[-1], flush=True)
    finally:
        topk_phi.topk_phi_decode = original


def split_variants(rows: list[dict]) -> None:
    """Splits and warps of the split kernel with small maps and 64-key pages (BENCHMARKS 3g)."""
    step = _bar_step(d_phi=16, page_size=64)()
    original = topk_phi.topk_phi_decode
    try:
        for splits in (None, 8, 12, 16):
            for warps in (4, 8):
                topk_phi.topk_phi_decode = functools.partial(original, num_warps=warps,
                                                             num_splits=splits)
                ms = timing.graph_median_ms(step)
                rows.append(dict(splits=splits, warps=warps, ms=ms,
                                 kernels_us=profile_steps.kernel_us(step)))
                print({k: v for k, v in rows[-1].items() if k != "kernels_us"},
                      rows[-1]["kernels_us"].get("_decode_split_kernel"), flush=True)
    finally:
        topk_phi.topk_phi_decode = original


def main(argv: list[str] | None = None) -> int:
    what = (argv or sys.argv[1:] or ["precision"])[0]
    rows: list[dict] = []
    {"precision": precision_variants, "warps": launch_variants,
     "splits": split_variants}[what](rows)
    write_rows(f"topk_variants_{what}", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
