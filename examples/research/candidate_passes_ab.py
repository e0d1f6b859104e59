"""The sketch selector's candidate passes before and after a change, on a GPU, in one process:
`select_candidates` and `rerank_select` of another copy of :mod:`macopt.kernels.sketch_select`
(``--old FILE``, e.g. a checkout's file carried to the machine) against this one's, on the
inputs of the safe-defaults bar point (128K keys, batch 16, Llama-3.1-8B heads, 2%): equality
(with the torch reference; between old and new for the rerank), time, each launch's time, then
the whole Top-K-alone step with each (exact decode beside it, same process).

    python3 -m examples.research.candidate_passes_ab --old PATH_TO_OLD_sketch_select.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import torch

import macopt  # noqa: F401  (registers torch.ops.macopt)
from examples.research.profile_steps import kernel_us
from examples.research.topk_speed_sweep import (
    BUDGET,
    CONTEXT,
    DEVICE,
    LAYER,
    bench_us,
    exact_decode_us,
    inputs_at,
    patched,
    sketch_inputs,
    step_fn,
)
from macopt.bench import timing
from macopt.bench.decode import LayerShape, make_inputs
from macopt.config import TopKPhiConfig
from macopt.kernels import sketch_select as kernels


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sketch_scores_of(x, shape: LayerShape):
    """The fp16 group scores and block maxima a decode step hands the candidate passes."""
    args, _ = sketch_inputs(x, shape)
    return kernels.sketch_scores(*args, block_max=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="another copy of sketch_select.py")
    args = parser.parse_args()
    old = load_module(args.old, "old_sketch_select")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    report: dict = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                        context=CONTEXT, budget=BUDGET, passes=[], steps=[])
    gen = torch.Generator(DEVICE).manual_seed(0)
    shape = LayerShape(16, CONTEXT, **LAYER)
    x = make_inputs(shape, torch.device(DEVICE), gen)
    scores, maxima = sketch_scores_of(x, shape)
    n_keep = 2 * TopKPhiConfig(budget=BUDGET).budget_tokens(CONTEXT)
    want = kernels.select_candidates_reference(scores, n_keep)

    best: dict = {}  # the fastest new setting of each pass, tried in the step too
    variants = [("old", old, {})] + [
        (f"new, compaction {w} warps", kernels, dict(COMPACT_WARPS=w)) for w in (4, 8, 16)]
    for label, module, settings in variants:
        with patched(module, **settings):
            fn = lambda m=module: m.select_candidates(scores, maxima, n_keep)  # noqa: E731
            row = dict(variant=label, equal_to_reference=torch.equal(fn(), want),
                       us=bench_us(fn), kernels_us=kernel_us(fn))
        report["passes"].append(row)
        device_us = sum(row["kernels_us"].values())  # (do_bench's time holds the host's launches)
        if module is kernels and row["equal_to_reference"] and device_us < best.get("c", 1e9):
            best["c"], best["compact"] = device_us, settings
        print(f"{label:24s} equal {row['equal_to_reference']} {row['us']:7.1f} us  "
              f"{row['kernels_us']}", flush=True)

    candidates = kernels.select_candidates(scores, maxima, n_keep)
    k_cand = torch.gather(x.k, 2, candidates.long()[..., None].expand(-1, -1, -1, shape.head_dim))
    group = shape.q_heads // shape.kv_heads
    exact = torch.einsum("bhgd,bhrd->bhgr", x.q.view(16, shape.kv_heads, group, -1).float(),
                         k_cand.float()) * shape.head_dim**-0.5
    del k_cand
    top_k = n_keep // 2
    old_choice = None
    for label, module, warps, tile in [("old", old, 8, 2048)] + [
            ("new", kernels, w, t) for w in (4, 8, 16) for t in (2048, 4096)]:
        fn = lambda m=module: m.rerank_select(exact, candidates, top_k)  # noqa: E731
        with patched(kernels, RERANK_WARPS=warps, RANK_TILE=tile):
            choice = fn().sort(dim=-1).values
            old_choice = choice if old_choice is None else old_choice
            row = dict(variant=f"rerank {label} {warps} warps {tile}", us=bench_us(fn),
                       same_keys_as_old=torch.equal(choice, old_choice),
                       kernels_us=kernel_us(fn))
        report["passes"].append(row)
        device_us = sum(row["kernels_us"].values())
        if module is kernels and row["same_keys_as_old"] and device_us < best.get("r", 1e9):
            best["r"], best["rerank"] = device_us, dict(RERANK_WARPS=warps, RANK_TILE=tile)
        print(f"{row['variant']:29s} same as old {row['same_keys_as_old']} {row['us']:7.1f} us  "
              f"{row['kernels_us']}", flush=True)

    for batch in (16, 1):
        shape = LayerShape(batch, CONTEXT, **LAYER)
        x = inputs_at(shape, x, gen)
        exact_us = exact_decode_us(x, batch)
        settings = {**best.get("compact", {}), **best.get("rerank", {})}
        report["best_settings"] = settings
        for label, module, extra in (("old", old, {}), ("new", kernels, {}),
                                     ("new, best settings", kernels, settings)):
            with patched(kernels, select_candidates=module.select_candidates,
                         rerank_select=module.rerank_select), patched(kernels, **extra):
                fn = step_fn(x, shape, False, None)
                us = 1000 * timing.graph_median_ms(fn, 25, 100)
                per_kernel = kernel_us(fn)
            report["steps"].append(dict(batch=batch, passes=label, settings=extra, us=us,
                                        exact_us=exact_us,
                                        speedup=exact_us / us, kernels_us=per_kernel))
            print(f"b{batch} Top-K alone, {label} passes {extra or ''} {us:7.1f} us  "
                  f"{exact_us / us:5.2f}x exact  {per_kernel}", flush=True)
            del fn
            torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "candidate_passes_ab.json"), "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
