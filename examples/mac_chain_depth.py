"""What bounding MAC's hit chains costs and buys, on the tiny trained model (CPU, fp32).

An entry written on a hit reuses the matched entry's prefix state, which may itself come from
a hit: errors can compound along a chain. ``MACConfig.max_chain_depth`` bounds it: an entry
built from ``max_chain_depth`` chained hits is not reused (the step misses and recomputes its
prefix exactly, starting a new chain). This script measures, for several depths, the decode
quality and the reads of the calibrated configuration (``examples/tiny-lm/mac_calibrated.json``
by default) on held-out text: teacher-forced decode steps simulated with MAC's reference math
(:func:`macopt.calibrate_mac.measure`, the calibration's own measurement), against exact
attention on the same tokens.

    python examples/mac_chain_depth.py --json chain_depth.json

Windows of ``context - decode - 1`` prompt tokens plus ``--decode`` decode steps, spread over
``examples/tiny-lm/heldout.txt.gz`` (text the calibration never saw).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from macopt.calibrate_mac import MACCalibration, Setting, exact_window, load_result, measure
from macopt.commands.calibrate import spread_windows
from macopt.evaluation.text import read_text
from macopt.model_source import load_causal_lm, load_tokenizer

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(HERE / "tiny-lm"))
    parser.add_argument("--config", default=None, help="default: MODEL/mac_calibrated.json")
    parser.add_argument("--text", default=None, help="default: MODEL/heldout.txt.gz")
    parser.add_argument("--decode", type=int, default=256)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--depths", default="1,2,4,8,16,1000000")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model = load_causal_lm(args.model, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(args.model)
    base, overrides = load_result(args.config or Path(args.model) / "mac_calibrated.json")
    taus = {name: config.tau for name, config in overrides.items()}
    offsets = {name: config.offset for name, config in overrides.items()}
    context = model.config.max_position_embeddings
    prefill = context - args.decode - 1
    settings = MACCalibration(prefill=prefill, decode=args.decode, base=base,
                              offsets=tuple(sorted(set(offsets.values()) | {base.offset})))
    ids = tokenizer(read_text([Path(args.text or Path(args.model) / "heldout.txt.gz")]),
                    return_tensors="pt")["input_ids"][0]
    started = time.perf_counter()
    windows = [exact_window(model, w, settings)
               for w in spread_windows(ids, prefill + args.decode + 1, args.windows)]
    rows = []
    print(f"{len(windows)} windows of {prefill} + {args.decode} tokens; per-layer taus "
          f"{[round(t, 3) for t in taus.values()]}, offsets {list(offsets.values())}")
    print(f"{'max depth':>10} {'exp(KL)':>9} {'ppl ratio':>10} {'hit rate':>9} {'keys read':>10}")
    for depth in (int(d) for d in args.depths.split(",")):
        deep = dataclasses.replace(settings, base=dataclasses.replace(base,
                                                                      max_chain_depth=depth))
        setting = measure(model, windows, Setting("per_layer", taus, offsets=offsets), deep)
        row = {"max_chain_depth": depth, **setting.to_dict()}
        rows.append(row)
        print(f"{depth:>10} {row['expected_ppl_ratio']:>9.4f} {setting.ppl_ratio:>10.4f} "
              f"{setting.hit_rate:>9.3f} {setting.read_fraction:>10.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "config": str(args.config), "prefill": prefill,
            "decode": args.decode, "windows": len(windows), "device": "cpu", "dtype": "float32",
            "seconds": round(time.perf_counter() - started, 1), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
