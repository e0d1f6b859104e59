"""Top-K alone at the safe-defaults bar point on a GPU (128K keys, batch 16, 2%, sketch selector,
Llama-3.1-8B heads in bf16): the launches of :mod:`macopt.kernels.sketch_select` rewritten in
the twelfth session, per setting, then the whole step (docs/SAFE_DEFAULTS.md 15).

1. The sketch's scoring launch (tokens as the product's rows, an fp16 query, the levels
   unpacked in PTX) per (tokens, warps) a program, each checked against its torch reference.
2. The candidates' exact scoring (one tensor-core product) per (candidates, warps) a program,
   each checked against torch.
3. The attention over the selection per split count (the splits of one (row, KV head)).
4. The whole decode step (``torch.ops.macopt.topk_phi_decode``, CUDA-graph replays) as the
   code stands and at the best settings of 1-3, at batch 16 and 1, exact decode beside it,
   and each launch's time (torch profiler).

    python3 -m examples.research.topk_speed_sweep      (or: gpu_session.sh topk-sweep)
    python3 -m examples.research.topk_speed_sweep --launches   (sections 1-2 only)
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
import triton

import macopt  # noqa: F401  (registers torch.ops.macopt)
from examples.research.profile_steps import kernel_us
from macopt.bench import timing
from macopt.bench.decode import LayerShape, make_inputs
from macopt.config import TopKPhiConfig
from macopt.kernels import sketch_select as kernels
from macopt.kernels import topk_phi
from macopt.kernels.feature_maps import positive_random_features
from macopt.topk_phi_select import (
    _sketch_query,
    build_sketch,
    sketch_scores_reference,
    sketch_shapes,
)
from macopt.topk_phi_state import TopKPhiState, decode, prefill

LAYER = dict(q_heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
CONTEXT = 131072
BUDGET = 0.02
DEVICE = "cuda"  # (a CPU dry run with TRITON_INTERPRET=1 may set "cpu" and a short CONTEXT)


@contextlib.contextmanager
def patched(module, **settings):
    saved = {name: getattr(module, name) for name in settings}
    for name, value in settings.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def bench_us(fn) -> float:
    fn()
    return 1000 * triton.testing.do_bench(fn, rep=200)


def fixed_splits(count: int):
    def splits(programs, n_items, block_n, device):
        return max(1, min(count, triton.cdiv(n_items, 2 * block_n)))
    return splits


def sketch_inputs(x, shape: LayerShape):
    """The scoring launch's arguments for ``x`` (the middle: all but 4 sinks and a 16-token
    tail) and the group-major queries: ``(codes, dims, q_scaled, lo, hi, n_keys), grouped``."""
    batch, n_kv, head_dim, n_keys = shape.batch, shape.kv_heads, shape.head_dim, shape.context
    lo = torch.full((batch,), 4, dtype=torch.int32, device=DEVICE)
    hi = torch.full((batch,), n_keys - 16, dtype=torch.int32, device=DEVICE)
    codes_shape, scales_shape = sketch_shapes(batch, n_kv, n_keys, head_dim)
    codes = torch.zeros(codes_shape, dtype=torch.uint8, device=DEVICE)
    scales = torch.ones(scales_shape, dtype=torch.float32, device=DEVICE)
    build_sketch(x.k, lo, hi, codes, scales)
    grouped, dims, q_scaled = _sketch_query(x.q, scales, head_dim**-0.5, n_kv, head_dim // 4)
    dims, q_scaled = dims.to(torch.int32).contiguous(), q_scaled.float().contiguous()
    return (codes, dims, q_scaled, lo, hi, n_keys), grouped


def launches(report: dict, x, shape: LayerShape) -> tuple[dict, dict]:
    """Sections 1-3: each variant's time and error; returns the best scoring and candidate
    settings."""
    head_dim, n_keys = shape.head_dim, shape.context
    args, grouped = sketch_inputs(x, shape)
    lo, hi = args[3], args[4]
    want = sketch_scores_reference(*args).float()
    finite = torch.isfinite(want)

    def err(got):
        got = got.float()
        if not torch.equal(torch.isfinite(got), finite):
            return float("inf")
        return (got[finite] - want[finite]).abs().max().item()

    rows = []
    for tokens, warps in ((256, 2), (256, 4), (512, 2), (512, 4), (1024, 4), (1024, 8)):
        with patched(kernels, SCORE_TOKENS=tokens, SCORE_WARPS=warps):
            rows.append(dict(kernel="sketch_scores", SCORE_TOKENS=tokens, SCORE_WARPS=warps,
                             us=bench_us(lambda: kernels.sketch_scores(*args)),
                             max_error=err(kernels.sketch_scores(*args))))
    report["scoring"] = rows
    for r in rows:
        print(f"scoring {r['kernel']:14s} {r.get('SCORE_TOKENS', ''):>5} "
              f"{r.get('SCORE_WARPS', ''):>2} | {r['us']:7.1f} us | max error {r['max_error']:.3g}",
              flush=True)
    ok = [r for r in rows if r["max_error"] < 0.02]
    best_scoring = min(ok, key=lambda r: r["us"]) if ok else None

    n_keep = 2 * TopKPhiConfig(budget=BUDGET).budget_tokens(n_keys)
    scores = want.half()
    block = 512
    maxima = torch.stack([want[..., a:a + block].amax(-1) for a in range(0, n_keys, block)], -1)
    candidates = kernels.select_candidates(scores, maxima, n_keep)
    k_cand = torch.gather(x.k, 2, candidates.long()[..., None].expand(-1, -1, -1, head_dim))
    plain = torch.einsum("bhgd,bhrd->bhgr", grouped.float(), k_cand.float()) * head_dim**-0.5
    scale = head_dim**-0.5

    def cerr(got):
        return (got - plain).abs().max().item()

    q = x.q.contiguous()
    rows = []
    for cand_rows, warps in ((32, 4), (64, 2), (64, 4), (128, 4), (128, 8)):
        with patched(kernels, CANDIDATE_ROWS=cand_rows, CANDIDATE_SCORE_WARPS=warps):
            fn = lambda: kernels.candidate_scores(q, x.k, candidates, lo, hi, scale)  # noqa: E731
            rows.append(dict(kernel="candidate_scores", CANDIDATE_ROWS=cand_rows,
                             CANDIDATE_SCORE_WARPS=warps,
                             us=bench_us(fn), max_error=cerr(fn())))
    report["candidate_scores"] = rows
    for r in rows:
        print(f"{r['kernel']:16s} {r.get('CANDIDATE_ROWS', ''):>4} "
              f"{r.get('CANDIDATE_SCORE_WARPS', ''):>2} | {r['us']:7.1f} us | "
              f"max error {r['max_error']:.3g}", flush=True)
    ok = [r for r in rows if r["max_error"] < 1e-2]
    best_cand = min(ok, key=lambda r: r["us"]) if ok else None
    del k_cand
    return ({k: best_scoring[k] for k in ("SCORE_TOKENS", "SCORE_WARPS")} if best_scoring
            else {}), ({k: best_cand[k] for k in ("CANDIDATE_ROWS", "CANDIDATE_SCORE_WARPS")}
                       if best_cand else {})


def inputs_at(shape: LayerShape, x, gen):
    """The inputs at ``shape``: ``x`` itself at batch 16 (where it was made), else new ones
    (smaller: both fit beside each other)."""
    return x if shape.batch == 16 else make_inputs(shape, torch.device(DEVICE), gen)


def exact_decode_us(x, batch: int) -> float:
    """Exact decode's time on ``x`` (CUDA-graph replays, median, us), printed."""
    exact = lambda: torch.ops.macopt.decode_attention(  # noqa: E731
        x.q, x.k, x.v, x.starts, x.ends, None, x.scale)
    us = 1000 * timing.graph_median_ms(exact, 25, 100)
    print(f"b{batch} exact decode {us:7.1f} us", flush=True)
    return us


def step_fn(x, shape: LayerShape, completion: bool, maps):
    method = TopKPhiConfig(budget=BUDGET, completion=completion)
    state = TopKPhiState.allocate(shape.batch, shape.q_heads, shape.kv_heads, shape.context,
                                  shape.head_dim, shape.dtype, torch.device(DEVICE), maps=maps,
                                  completion=(completion,) * shape.q_heads, sketch=True)
    prefill(state, x.k, x.v, x.starts, x.ends, method)
    return lambda: decode(state, x.q, x.k, x.v, x.starts, x.ends, x.scale, method)


def main() -> int:
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    report: dict = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                        triton=triton.__version__, context=CONTEXT, budget=BUDGET)
    gen = torch.Generator(DEVICE).manual_seed(0)
    maps = positive_random_features(32, 8, 128, 128, generator=torch.Generator().manual_seed(0))
    shape = LayerShape(16, CONTEXT, **LAYER)
    x = make_inputs(shape, torch.device(DEVICE), gen)
    best_scoring, best_cand = launches(report, x, shape)
    print("best scoring", best_scoring, "best candidate scoring", best_cand, flush=True)
    if "--launches" in sys.argv[1:]:  # sections 1-2 only (a short call)
        _write(report)
        return 0

    step = step_fn(x, shape, False, maps)
    splits = []
    for count in (3, 4, 5, 6, 8):
        with patched(topk_phi, _num_splits=fixed_splits(count)):
            step()
            splits.append(dict(splits=count, us=1000 * timing.graph_median_ms(step, 25, 100)))
        print(f"Top-K alone, attention split {count}: {splits[-1]['us']:7.1f} us", flush=True)
    report["splits"] = splits
    best_split = min(splits, key=lambda r: r["us"])["splits"]

    steps = []
    for batch in (16, 1):
        shape = LayerShape(batch, CONTEXT, **LAYER)
        x = inputs_at(shape, x, gen)
        exact_us = exact_decode_us(x, batch)
        for label, settings, split in (
                ("code as committed", {}, None),
                ("best settings", {**best_scoring, **best_cand},
                 best_split if batch == 16 else None)):
            for completion in (False, True):
                extra = {} if split is None else dict(_num_splits=fixed_splits(split))
                with patched(kernels, **settings), patched(topk_phi, **extra):
                    fn = step_fn(x, shape, completion, maps)
                    us = 1000 * timing.graph_median_ms(fn, 25, 100)
                    per_kernel = kernel_us(fn)
                row = dict(batch=batch, variant=label, settings=settings, splits=split,
                           completion=completion, us=us, exact_us=exact_us,
                           speedup=exact_us / us, kernels_us=per_kernel)
                steps.append(row)
                print(f"b{batch} {label:19s} {'+ phi' if completion else 'alone'} "
                      f"{us:7.1f} us  {exact_us / us:5.2f}x exact  {per_kernel}", flush=True)
                del fn
                torch.cuda.empty_cache()
    report["steps"] = steps
    _write(report)
    return 0


def _write(report: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "topk_speed_sweep.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
