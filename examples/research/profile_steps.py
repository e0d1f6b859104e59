"""Per-kernel GPU times of one decode step (CUDA only): where a step's time goes.

Not a ``macopt bench`` sub-command: a profiling aid behind the numbers in BENCHMARKS.md. For
each case it prints the CUDA-graph replay median (``do_bench``, as ``macopt bench``) and the mean
device time of every kernel in the replayed graph (``torch.profiler``, 30-50 replays).

    python -m examples.research.profile_steps mac   # exact vs MAC at forced hit rates 1 / 0.95 / 0
    python -m examples.research.profile_steps topk  # Top-K + phi, page selector, 1% and 2%
    python -m examples.research.profile_steps topk-small  # the same at batch 16, 2 / 16 features
    python -m examples.research.profile_steps topk-sketch  # selectors per kernel, 128K 2%, b16, b1
    python -m examples.research.profile_steps topk-attn  # the Top-K attention launch's tiles/warps
    python -m examples.research.profile_steps mac-stack  # per layer, many layers in one graph
    python -m examples.research.profile_steps mac-topk  # MAC + Top-K + phi vs each alone and exact

``mac-stack`` captures the steps of several independent layers (each its own K/V cache and
ring, so nothing is served from L2 by a previous layer) in one CUDA graph and divides the replay
median by the layer count: a per-layer time without a graph launch per layer, as inside a
decode graph of a whole model (a single-layer replay pays ~8-12 us of graph launch).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import torch

from examples.research.results import write_rows
from macopt.bench import decode, timing

LAYER = dict(q_heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)  # Llama-3.1-8B


def kernel_us(fn: Callable[[], object], replays: int = 50) -> dict[str, float]:
    """Mean device time (us) per replay of each kernel of ``fn``'s CUDA graph."""
    from torch.profiler import ProfilerActivity, profile

    graph = timing.capture_graph(fn)
    for _ in range(5):
        graph()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph()
        torch.cuda.synchronize()
    total: dict[str, float] = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            name = event.name[:40]
            total[name] = total.get(name, 0.0) + event.device_time_total
    return {name: round(us / replays, 2) for name, us in total.items()}


def _record(rows: list[dict], case: str, variant: str, fn: Callable[[], object]) -> None:
    fn()
    ms = timing.graph_median_ms(fn, 25, 100)
    kernels = kernel_us(fn)
    rows.append(dict(case=case, variant=variant, ms=round(ms, 4), kernels_us=kernels))
    print(f"{case:10s} {variant:26s} {ms * 1000:8.1f} us  {kernels}", flush=True)


def _record_exact_decode(rows: list[dict], case: str, x) -> None:
    """macopt's exact decode of the same inputs: the baseline beside each case."""
    _record(rows, case, "exact decode (baseline)",
            lambda: torch.ops.macopt.decode_attention(x.q, x.k, x.v, x.starts, x.ends, None,
                                                      x.scale))


def profile_mac(rows: list[dict]) -> None:
    from macopt.bench import mac as bench_mac

    config = bench_mac.MACBenchConfig(device="cuda")
    for batch, context in [(1, 8192), (1, 32768), (1, 131072), (2, 131072), (16, 131072)]:
        _mac_case(rows, bench_mac.make_layer(config, batch, context), batch, context)
        torch.cuda.empty_cache()


def _mac_case(rows: list[dict], layer, batch: int, context: int) -> None:
    from macopt.bench import mac as bench_mac
    from macopt.kernels import mac

    case = f"b{batch} {context // 1024}K"
    inputs = decode.DecodeInputs(layer.q, layer.k, layer.v, layer.starts, layer.positions + 1,
                                 layer.scale)
    attend = decode._build_macopt(decode.LayerShape(batch, context, **LAYER), inputs)
    _record(rows, case, "exact", lambda: attend(inputs))
    for rate in (1.0, 0.99, 0.95, 0.9, 0.0):
        ring = bench_mac.forced_ring(layer, 512, rate)
        for splits in ((None, 4) if rate == 1.0 else (None,)):
            def step(splits=splits, ring=ring):
                return mac.mac_decode_step(
                    layer.q, layer.q_pre, layer.k, layer.v, ring, layer.positions,
                    layer.starts, layer.scale, offset=256, tau=0.45, t_min=0,
                    max_depth=16, num_splits=splits)
            _record(rows, case, f"mac h{rate} sp{splits}", step)


def stacked_layers(batch: int, context: int, kv_gib: float = 24):
    """Up to 16 independent MAC bench layers whose K/V take about ``kv_gib`` together: (case
    name, layers, the exact decode over all of them)."""
    from macopt.bench import mac as bench_mac

    config = bench_mac.MACBenchConfig(device="cuda")
    per_layer_gib = 2 * batch * 8 * context * 128 * 2 / 2**30
    n = max(1, min(16, int(kv_gib // per_layer_gib)))
    layers = [bench_mac.make_layer(dataclasses.replace(config, seed=i), batch, context)
              for i in range(n)]
    inputs = [decode.DecodeInputs(x.q, x.k, x.v, x.starts, x.positions + 1, x.scale)
              for x in layers]
    attend = decode._build_macopt(decode.LayerShape(batch, context, **LAYER), inputs[0])
    return f"b{batch} {context // 1024}K x{n}", layers, lambda: [attend(x) for x in inputs]


def profile_mac_stack(rows: list[dict]) -> None:
    from macopt.bench import mac as bench_mac
    from macopt.kernels import mac

    for batch, context in [(1, 8192), (1, 32768), (1, 131072), (16, 131072)]:
        case, layers, exact = stacked_layers(batch, context)
        n = len(layers)
        _record_stack(rows, case, "exact", n, exact)
        for rate in (1.0, 0.95, 0.0):
            rings = [bench_mac.forced_ring(x, 512, rate, seed=i) for i, x in enumerate(layers)]

            def steps(rings=rings, layers=layers):
                return [mac.mac_decode_step(x.q, x.q_pre, x.k, x.v, ring, x.positions, x.starts,
                                            x.scale, offset=256, tau=0.45, t_min=0,
                                            max_depth=16)
                        for x, ring in zip(layers, rings, strict=True)]
            _record_stack(rows, case, f"mac h{rate}", n, steps)
        del layers, exact
        torch.cuda.empty_cache()


def _record_stack(rows: list[dict], case: str, variant: str, n: int,
                  fn: Callable[[], object]) -> None:
    fn()
    ms = timing.graph_median_ms(fn, 25, 100) / n
    rows.append(dict(case=case, variant=variant, layers=n, ms_per_layer=round(ms, 4)))
    print(f"{case:14s} {variant:12s} {ms * 1000:8.1f} us a layer", flush=True)


def profile_mac_topk(rows: list[dict]) -> None:
    """MAC + Top-K + phi (page selector, 2%) at forced hit rates 1 / 0.95 / 0 against exact, MAC
    alone and Top-K + phi alone, same K/V (:mod:`examples.research.mac_topk`)."""
    from examples.research.mac_topk import mac_topk_variants
    from macopt.bench import mac as bench_mac
    from macopt.kernels.feature_maps import positive_random_features

    config = bench_mac.MACBenchConfig(device="cuda")
    maps = positive_random_features(32, 8, 128, 128,
                                    generator=torch.Generator().manual_seed(0)).to("cuda")
    for batch, context in [(16, 131072), (1, 131072), (16, 32768)]:
        layer = bench_mac.make_layer(config, batch, context)
        for variant, step in mac_topk_variants(layer, maps, budget=0.02):
            _record(rows, f"b{batch} {context // 1024}K", variant, step)
        del layer
        torch.cuda.empty_cache()


def profile_topk(rows: list[dict], variants: tuple[tuple[int, int], ...] = ((128, 32),),
                 batches: tuple[int, ...] = (1, 16)) -> None:
    """Page selector at 1% and 2%, 128K, for each ``(d_phi, page_size)`` of ``variants``."""
    from macopt.bench import topk as bench_topk
    from macopt.kernels.feature_maps import positive_random_features

    device = torch.device("cuda")
    gen = torch.Generator(device).manual_seed(0)
    for batch in batches:
        x = decode.make_inputs(decode.LayerShape(batch, 131072, **LAYER), device, gen)
        for d_phi, page_size in variants:
            config = bench_topk.TopKBenchConfig(device="cuda", d_phi=d_phi, page_size=page_size)
            maps = positive_random_features(32, 8, 128, d_phi,
                                            generator=torch.Generator().manual_seed(0))
            for budget in (0.01, 0.02):
                _topk_case(rows, x, batch, config.method(budget, "page"), maps, device)
        del x
        torch.cuda.empty_cache()


def profile_topk_sketch(rows: list[dict]) -> None:
    """128K, 2%, default maps (d_phi 128), batch 16 then 1: the sketch selector (rerank 2 and
    3) against the page and exact selectors, kernel by kernel."""
    from macopt.bench import topk as bench_topk
    from macopt.kernels.feature_maps import positive_random_features

    device = torch.device("cuda")
    config = bench_topk.TopKBenchConfig(device="cuda")
    maps = positive_random_features(32, 8, 128, 128, generator=torch.Generator().manual_seed(0))
    for batch in (16, 1):
        _selectors_case(rows, batch, config, maps, device)
        torch.cuda.empty_cache()


def _selectors_case(rows: list[dict], batch: int, config, maps, device: torch.device) -> None:
    gen = torch.Generator(device).manual_seed(0)
    x = decode.make_inputs(decode.LayerShape(batch, 131072, **LAYER), device, gen)
    _record_exact_decode(rows, f"b{batch} 128K", x)
    for selector in ("sketch", "sketch:0:3", "page", "exact"):
        _topk_case(rows, x, batch, config.method(0.02, selector), maps, device)


def profile_topk_attn(rows: list[dict], context: int = 131072, device: str = "cuda") -> None:
    """The Top-K attention launch alone (the selection fixed, page selector, 2%, default maps)
    at 128K, batch 16 and 1, for each (keys per tile, warps, pipeline stages): the launch takes
    ~5x its K/V bytes' time (BENCHMARKS.md 12d: 292 us at 64 keys, 4 warps, 2 stages; variants
    with fewer registers, and the map's features in chunks, were slower)."""
    from macopt.kernels.feature_maps import positive_random_features

    maps = positive_random_features(32, 8, 128, 128, generator=torch.Generator().manual_seed(0))
    for batch in (16, 1):
        _topk_attn_case(rows, batch, context, torch.device(device), maps)
        torch.cuda.empty_cache()


def _topk_attn_case(rows: list[dict], batch: int, context: int, device: torch.device,
                    maps) -> None:
    from macopt.bench import topk as bench_topk
    from macopt.kernels import topk_phi
    from macopt.kernels.feature_maps import FoldedFeatureMap
    from macopt.kernels.topk_phi_reference import PhiSummary
    from macopt.topk_phi_state import TopKPhiState, budget_summary_tokens, decode_impl
    from macopt.topk_phi_state import prefill as topk_prefill

    gen = torch.Generator(device).manual_seed(0)
    x = decode.make_inputs(decode.LayerShape(batch, context, **LAYER), device, gen)
    method = bench_topk.TopKBenchConfig(device=device.type).method(0.02, "page")
    st = TopKPhiState.allocate(batch, 32, 8, context, 128, x.k.dtype, device,
                               page_size=method.page_size, maps=maps)
    topk_prefill(st, x.k, x.v, x.starts, x.ends, method)
    selected = decode_impl(
        x.q, x.k, x.v, x.starts, x.ends, st.m, st.u, st.t, st.mid_start, st.mid_end,
        st.kmin, st.kmax, st.phi_q, st.phi_q_mlp, st.phi_k, st.phi_k_mlp, st.completion,
        x.scale, method.budget_tokens(context), method.page_size, method.selector_spec(),
        state=True, summary_tokens=budget_summary_tokens(method, st.t, x.k.dtype))[2]
    summary = PhiSummary(st.m, st.u, st.t, st.mid_start, st.mid_end)
    folded_k = FoldedFeatureMap(*st.phi_k, has_mlp=st.phi_k_mlp)
    log_phi_q = topk_phi.query_log_features(x.q, FoldedFeatureMap(*st.phi_q,
                                                                  has_mlp=st.phi_q_mlp))
    case = f"b{batch} {context // 1024}K"
    _record_exact_decode(rows, case, x)
    # (keys per tile, warps, pipeline stages (None: the launch's default, 2 since BENCHMARKS
    # 12d), the feature share in its own launch, that launch's warps)
    for block_n, warps, stages, apart, share_warps, share_n in [
            (64, 4, None, False, 4, None), (64, 4, None, True, 4, None),
            (64, 4, None, True, 4, 32), (64, 4, None, True, 4, 16),
            (64, 4, None, True, 2, 16)]:
        def attend(block_n=block_n, warps=warps, stages=stages, apart=apart,
                   share_warps=share_warps, share_n=share_n):
            topk_phi.SHARE_WARPS, topk_phi.SHARE_BLOCK_N = share_warps, share_n
            return topk_phi.topk_phi_decode_state(
                x.q, x.k, x.v, x.scale, x.starts, x.ends, summary, selected, log_phi_q,
                folded_k, st.completion, block_n=block_n, num_warps=warps, num_stages=stages,
                separate_share=apart)
        share = f" share apart n{share_n or block_n} w{share_warps}" if apart else ""
        _record(rows, case, f"attn n{block_n} w{warps} s{stages}{share}", attend)
    topk_phi.SHARE_WARPS, topk_phi.SHARE_BLOCK_N = 4, None


def profile_topk_small(rows: list[dict]) -> None:
    """Batch 16, small maps (2 / 16 features, what calibration gives) at pages of 32 and 64."""
    profile_topk(rows, variants=((16, 32), (16, 64), (2, 64)), batches=(16,))


def _topk_case(rows: list[dict], x, batch: int, method, maps, device: torch.device) -> None:
    from macopt.topk_phi_state import TopKPhiState
    from macopt.topk_phi_state import decode as topk_decode
    from macopt.topk_phi_state import prefill as topk_prefill

    state = TopKPhiState.allocate(batch, 32, 8, 131072, 128, torch.bfloat16, device,
                                  page_size=method.page_size, maps=maps,
                                  sketch=method.selector == "sketch")
    topk_prefill(state, x.k, x.v, x.starts, x.ends, method)
    variant = (f"{method.selector_spec()} {method.budget:g} d_phi {method.d_phi} page_size "
               f"{method.page_size}")
    _record(rows, f"b{batch} 128K", variant,
            lambda: topk_decode(state, x.q, x.k, x.v, x.starts, x.ends, x.scale, method))


def main(argv: list[str] | None = None) -> int:
    what = (argv or sys.argv[1:] or ["mac"])[0]
    rows: list[dict] = []
    cases = {"mac": profile_mac, "mac-stack": profile_mac_stack, "topk": profile_topk,
             "topk-small": profile_topk_small, "mac-topk": profile_mac_topk,
             "topk-sketch": profile_topk_sketch, "topk-attn": profile_topk_attn}
    cases[what](rows)
    write_rows(f"profile_{what}", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
