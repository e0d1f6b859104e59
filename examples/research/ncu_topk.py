"""One Top-K + phi decode step (128K keys, batch 16, 2%, Llama-3.1-8B layer, default maps) per
selector, eager, inside a profiler range: what Nsight Compute reads launch by launch (memory
throughput, occupancy, registers, warp stalls) to find why the sketch's scoring and the
attention over the selection run at a fifth of the bandwidth exact decode reaches
(BENCHMARKS.md 15b).

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \
        --section Occupancy --section LaunchStats --section WarpStateStats \
        python -m examples.research.ncu_topk [SELECTOR ...]
"""

from __future__ import annotations

import sys

import torch

from examples.research.profile_steps import LAYER
from macopt.bench import decode
from macopt.bench import topk as bench_topk
from macopt.kernels.feature_maps import positive_random_features
from macopt.topk_phi_state import TopKPhiState
from macopt.topk_phi_state import decode as topk_decode
from macopt.topk_phi_state import prefill as topk_prefill


def main(selectors: list[str], batch: int = 16, context: int = 131072) -> int:
    device = torch.device("cuda")
    gen = torch.Generator(device).manual_seed(0)
    x = decode.make_inputs(decode.LayerShape(batch, context, **LAYER), device, gen)
    maps = positive_random_features(32, 8, 128, 128, generator=torch.Generator().manual_seed(0))
    config = bench_topk.TopKBenchConfig(device="cuda")
    exact = lambda: torch.ops.macopt.decode_attention(x.q, x.k, x.v, x.starts, x.ends, None,  # noqa: E731
                                                      x.scale)
    steps = [exact]
    for selector in selectors:
        method = config.method(0.02, selector)
        state = TopKPhiState.allocate(batch, 32, 8, context, 128, x.k.dtype, device,
                                      page_size=method.page_size, maps=maps,
                                      sketch=method.selector == "sketch")
        topk_prefill(state, x.k, x.v, x.starts, x.ends, method)
        steps.append(lambda s=state, m=method: topk_decode(s, x.q, x.k, x.v, x.starts, x.ends,
                                                           x.scale, m))
    for step in steps:  # compile every launch before the profiled range
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for step in steps:
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(torch.cuda.get_device_name(), "profiled:", ["exact decode", *selectors])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:] or ["sketch", "page"]))
