"""MAC decode-step launch variants on the GPU (CUDA only): a profiling aid behind BENCHMARKS.md
section 2h, not a ``macopt bench`` sub-command.

    python -m examples.research.mac_variants [--json FILE]

For each case (batch, context) it captures the steps of several independent layers in one CUDA
graph, as ``profile_steps mac-stack`` does, and prints the per-layer replay median of the exact
decode and of MAC at forced hit rates 1 / 0.95 / 0 under every :class:`StepTuning` variant (the
finalize's items a pass). Before timing, each variant's step on the first layer is checked
against the first variant's (outputs, ring entries, decisions, keys read).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from examples.research import profile_steps
from macopt.bench import mac as bench_mac
from macopt.bench import timing
from macopt.kernels import mac

VARIANTS = {
    "S8": mac.StepTuning(finalize_block_s=8),
    "S16": mac.StepTuning(finalize_block_s=16),
    "S32": mac.StepTuning(finalize_block_s=32),
}
CASES = [(1, 8192), (2, 8192), (1, 32768), (1, 131072), (16, 131072)]
RATES = (1.0, 0.95, 0.0)


def _steps(layers, rings):
    return [mac.mac_decode_step(x.q, x.q_pre, x.k, x.v, ring, x.positions, x.starts, x.scale,
                                offset=256, tau=0.45, t_min=0, max_depth=16)
            for x, ring in zip(layers, rings, strict=True)]


def _check(layer, rate: float) -> dict[str, float]:
    """Worst |variant - base| over the output and the written ring entry, per variant."""
    worst = {}
    results = {}
    for name, tuning in VARIANTS.items():
        mac.TUNING = tuning
        torch.manual_seed(0)  # forced_ring fills the entries' states at random
        ring = bench_mac.forced_ring(layer, 512, rate)
        o, hit, keys = _steps([layer], [ring])[0]
        torch.cuda.synchronize()
        results[name] = (o.float(), ring.o.clone(), ring.lse.clone(), hit, keys)
    base = results["S8"]
    for name, got in results.items():
        diff = max((a - b).abs().nan_to_num(nan=float("inf")).max().item()
                   for a, b in zip(got[:3], base[:3], strict=True))
        same_decisions = torch.equal(got[3], base[3]) and torch.equal(got[4], base[4])
        worst[name] = diff if same_decisions else float("inf")
    mac.TUNING = mac.StepTuning()
    return worst


def run(rows: list[dict]) -> None:
    for batch, context in CASES:
        case, layers, exact = profile_steps.stacked_layers(batch, context)
        n = len(layers)
        _record(rows, case, "exact", n, exact)
        for rate in RATES:
            worst = _check(layers[0], rate)
            print(f"{case:14s} h{rate}: worst |variant - base| {worst}", flush=True)
            rows.append(dict(case=case, rate=rate, check=worst))
            for name, tuning in VARIANTS.items():
                mac.TUNING = tuning
                rings = [bench_mac.forced_ring(x, 512, rate, seed=i)
                         for i, x in enumerate(layers)]
                _record(rows, case, f"mac h{rate} {name}", n,
                        lambda rings=rings, layers=layers: _steps(layers, rings))
            mac.TUNING = mac.StepTuning()
        del layers, exact
        torch.cuda.empty_cache()


def _record(rows: list[dict], case: str, variant: str, n: int, fn) -> None:
    fn()
    ms = timing.graph_median_ms(fn, 25, 100) / n
    rows.append(dict(case=case, variant=variant, layers=n, us_per_layer=round(ms * 1e3, 2)))
    print(f"{case:14s} {variant:28s} {ms * 1000:8.2f} us a layer", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    run(rows)
    if args.json:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                    commit=os.environ.get("MACOPT_COMMIT", ""))
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
