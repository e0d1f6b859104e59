#!/bin/bash
# The GPU checks and measurements still owed, in stages, for one lent GPU call each (~10 min):
#
#   bash examples/research/gpu_session.sh STAGE [STAGE ...]     (from the repository root)
#
# Stages:
#   checks     GPU tests (run from /tmp: the repository root on sys.path is not the user's
#              path), the README quick start per method                              (~3 min)
#   topk       macopt bench topk at the safe-defaults bar point (128K, batch 1 and 16, 2%;
#              Top-K + phi and, since the tenth session, Top-K alone: no feature work)
#              and the selectors' per-kernel profile (profile_steps topk-sketch)     (~3 min)
#   topk-attn  the Top-K attention launch alone over tiles / warps / stages / feature chunks
#              (profile_steps topk-attn; ran in BENCHMARKS.md 12d)                   (~1 min)
#   gen32-b1   32 layers through generate(), batch 1, 8K and 128K, exact / MAC rows   (~6 min)
#   gen32-b2   the same at batch 2 (CONTEXTS=131072 or 8192: one context a call)     (~8 min)
#   sanity     MAC's kernel tests (mask holes) on the GPU and the MAC quick start; stops the
#              session if they fail                                                   (~1 min)
#   essentials one call when only one is possible: the new CUDA-graph test, the quick start per
#              method, then 8 layers through generate() at batch 1 and 2 (MAC all-hit before
#              hit-rate-0, so a cut run keeps the bar rows); run as `essentials topk`  (~7 min)
#   prefill-check  the routed prefill's chunk attention on the GPU (flash, lower-right causal),
#              and under generate()'s compile (tests/test_gpu_prefill.py)           (~2 min)
#   prefill-optin  the compiled causal prefill off (MACOPT_COMPILED_CAUSAL_PREFILL=0) and on,
#              8 layers, 128K, batch 2, chunks of 4096 (prefill_optin{0,1}.json)    (~7 min)
#   pool-check  MAC and Top-K + phi through generate()'s compile with a chunked prefill: their
#              state kept out of the CUDA-graph pool (tests/test_gpu_mac.py)          (~1 min)
#   selectors  the selectors' GPU tests (exact selector with its radix threshold, sketch), the
#              README quick start for Top-K + phi                                     (~1 min)
#   topk-sweep the Top-K-alone step's launches rewritten in session 12 against those before,
#              per tokens / candidates / warps / splits, then the whole step (topk_speed_sweep)
#                                                                                     (~4 min)
#   candidates the candidate passes of a copy of sketch_select.py (OLD_SKETCH=path, carried)
#              against this one's, then the Top-K-alone step with each (candidate_passes_ab)
#                                                                                     (~2 min)
#   sketch-diag  the sketch selector's scoring launch against its torch reference per shape,
#              with the channel tile's floor at 16 and at 32 (BENCHMARKS.md 15)       (~1 min)
#   pool-debug the compiled-MAC CUDA-graph test with Inductor's allocation history, side
#              stream on and off (pool_debug.log)                                     (~2 min)
#   ncu-topk   Nsight Compute over one Top-K + phi step per selector (128K, batch 16):
#              throughput, occupancy, registers, stalls per launch (ncu_topk.txt)     (~3 min)
#   mac-launches  where MAC's per-layer time goes through generate(): kernels per decode step
#              at 4 layers, 2K prompt, exact / MAC all-hit / MAC no-hit               (~2 min)
#   same-speed one-layer benches of the code before the restructuring (OLD=path of a
#              checkout of 9e3c110, carried) and of this one, same machine            (~3 min)
#
# Owed as of 2026-12-07, seventeenth session (BENCHMARKS.md 23): `prefill-check pool-check`
# (~3 min) with the compiled causal prefill on by default since 23 (its Top-K + phi case has
# run on the CPU only). Issue 16's rows are all measured (the 128K batch-2 ones: `gen32-b2`
# with PREFILL_CHUNK=4096 WARMUP_CHUNKS=2 CONTEXTS=131072, ~230 s a method).
# Also owed:
# `topk-attn`; `mac-launches`; `topk8k` with a phi file that records the completion switch.
# A call that carries a GGUF part must leave
# examples/tiny-lm/model.safetensors out of the tree (64 MiB a call), and no `git commit -a`
# may run while it is out.
#
# Writes logs and JSON under $OUT (the device tool brings them back). Install first with
# `python3 -m pip`: the machine's bare `pip` belongs to another Python.
set -u
export PYTHONUNBUFFERED=1
R=$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
t0=$(date +%s)
{ nvidia-smi --query-gpu=name --format=csv,noheader
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
  git rev-parse HEAD; } | tee "$OUT/environment.txt"
python3 -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | grep -v WARNING | tail -2
cli() { (cd /tmp && python3 -m macopt.cli "$@" 2>&1 | grep -v -i warn); }
stamp() { echo "== $1 done at $(( $(date +%s) - t0 )) s"; }
quickstart() {  # the README's Quick start, per method (default: all three), on a 2K prompt
  for m in ${*:-exact mac topk_phi}; do
    (cd /tmp && timeout 90 python3 "$R/examples/quickstart.py" --method $m --prompt-tokens 2048 \
      2>&1 | grep -v -i warn | tail -4)
  done
}

for stage in "$@"; do
  case $stage in
    checks)  # the whole pytest log stays in checks_pytest.log (failures' tracebacks included)
      (cd /tmp && timeout 150 python3 -m pytest -p no:cacheprovider -p no:logging -o addopts="" \
        -q -rf --tb=short "$R"/tests/test_gpu_*.py "$R/tests/test_kernel_decode.py" \
        -k "gpu or otherwise or fused" > "$OUT/checks_pytest.log" 2>&1)
      grep -E "^(FAILED|ERROR|E  )|passed|failed" "$OUT/checks_pytest.log" | cut -c1-200 \
        | tail -20 | tee "$OUT/checks.log"
      quickstart | tee -a "$OUT/checks.log" ;;
    essentials)
      (cd /tmp && timeout 90 python3 -m pytest -p no:cacheprovider -o addopts="" -q \
        "$R/tests/test_gpu_decode.py" -k cuda_graph_trees 2>&1 | tail -3) | tee "$OUT/checks.log"
      quickstart | tee -a "$OUT/checks.log"
      stamp quickstart
      cli bench generate --layers 8 --contexts 8192,131072 --batches 1,2 \
        --methods unmodified,exact,mac:all,mac:1 --new-tokens 32 --json "$OUT/gen8.json" \
        | grep -v '^ *File\|^    ' | tail -20 | tee "$OUT/gen8.log"
      ;;
    topk)
      cli bench topk --contexts 131072 --batches 1,16 --budgets 2% --selectors exact,sketch,page \
        --json "$OUT/topk_128k_b16.json" | tail -12 | tee "$OUT/topk.log"
      timeout 150 python3 -m examples.research.profile_steps topk-sketch 2>&1 | grep -v -i warn \
        | cut -c1-200 | tail -12 | tee -a "$OUT/profile.log" ;;
    prefill-check)
      (cd /tmp && timeout 240 python3 -m pytest -p no:cacheprovider -p no:logging \
        -o addopts="" -q "$R/tests/test_gpu_prefill.py" --tb=short -rf 2>&1 \
        | grep -v "DEBUG\|Warning\|warn" | tail -40) \
        | tee "$OUT/prefill_check.log" ;;
    pool-check)  # stateful methods through generate()'s compile with a chunked prefill
      (cd /tmp && timeout 150 python3 -m pytest -p no:cacheprovider -p no:logging -o addopts="" \
        -q "$R/tests/test_gpu_mac.py" -k "${POOL_TESTS:-chunked_prefill or cuda_graphs}" \
        --tb=short -rf 2>&1 | grep -v "DEBUG\|Warning\|warn" | tail -80) | tee "$OUT/pool_check.log" ;;
    selectors)
      (cd /tmp && timeout 200 python3 -m pytest -p no:cacheprovider -o addopts="" -q \
        "$R/tests/test_gpu_selectors.py" --tb=short -rf 2>&1 | tail -90) | tee "$OUT/selectors.log"
      quickstart topk_phi | tee -a "$OUT/selectors.log" ;;
    topk-sweep)  # the sketch launches per setting, the attention per split count, the step
      timeout 420 python3 -m examples.research.topk_speed_sweep 2>&1 | grep -v -i warn \
        | tail -60 | tee "$OUT/topk_sweep.log" ;;
    candidates)
      timeout 300 python3 -m examples.research.candidate_passes_ab --old "${OLD_SKETCH:?}" 2>&1 \
        | grep -v -i warn | cut -c1-400 | tail -20 | tee "$OUT/candidates.log" ;;
    sketch-diag)  # the sketch's scoring launch against torch per shape, channel tile 16 / 32
      (cd /tmp && timeout 150 python3 "$R/examples/research/sketch_gpu_diag.py" 2>&1 \
        | grep -v -i warn | tail -52) | tee "$OUT/sketch_diag.log" ;;
    pool-debug)  # the compiled-MAC CUDA-graph test with allocation history, side stream on / off
      (cd /tmp && timeout 200 python3 "$R/examples/research/cudagraph_pool_debug.py" \
        > "$OUT/pool_debug.log" 2>&1)
      grep -E "^===|passed|failed|Detected|Data Pointer|macopt/|kernels/|passes/" "$OUT/pool_debug.log" \
        | grep -v site-packages/torch | head -60 ;;
    ncu-topk)  # Nsight Compute over one Top-K + phi step per selector, launch by launch
      timeout 300 ncu --profile-from-start off --clock-control none --section SpeedOfLight \
        --section Occupancy --section LaunchStats --section WarpStateStats \
        --section MemoryWorkloadAnalysis python3 -m examples.research.ncu_topk ${NCU_SELECTORS:-sketch page} \
        > "$OUT/ncu_topk.txt" 2>&1
      grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occ|Theoretical Occ|Dynamic Shared|Block Limit" \
        "$OUT/ncu_topk.txt" | cut -c1-120 | head -120 ;;
    mac-launches)
      cli bench generate --layers 4 --contexts 2048 --batches 1 --methods exact,mac:all,mac:1 \
        --new-tokens 16 --profile-kernels --json "$OUT/mac_launches.json" \
        | grep -v '^ *File\|^    ' | tail -8 | tee "$OUT/mac_launches.log" ;;
    topk-attn)
      timeout 150 python3 -m examples.research.profile_steps topk-attn 2>&1 | grep -v -i warn \
        | cut -c1-150 | tail -16 | tee -a "$OUT/profile.log" ;;
    gen32-b1|gen32-b2)  # CONTEXTS=131072 for one context (a b2 run of both may pass 600 s);
      # PREFILL_CHUNK=4096: every method's prompt prefilled in chunks (128K b2 on 80 GB);
      # METHODS=unmodified, then exact,mac:all in the next call: the 128K b2 bar rows
      C=${CONTEXTS:-8192,131072}  # (no comma in file names: the device tool drops them)
      M=${METHODS:-unmodified,exact,mac:all,mac:1}
      cli bench generate --layers 32 --contexts "$C" --batches "${stage#gen32-b}" --methods "$M" \
        --new-tokens 32 ${PREFILL_CHUNK:+--prefill-chunk $PREFILL_CHUNK} \
        ${WARMUP_CHUNKS:+--warmup-chunks $WARMUP_CHUNKS} \
        --json "$OUT/$stage-${C//,/_}-${M//[,:]/_}.json" \
        | tee "$OUT/$stage-${C//,/_}-${M//[,:]/_}.log" \
        | grep --line-buffered -v '^ *File\|^    ' | tail -20 ;;  # the log keeps tracebacks
    sanity)  # before a long call: MAC's kernels with mask holes on this GPU, the quick start
      (cd /tmp && timeout 120 python3 -m pytest -p no:cacheprovider -o addopts="" -q \
        "$R/tests/test_mac_kernels.py" -k "holes or random_rings" 2>&1 | tail -3) \
        | tee "$OUT/sanity.log"
      quickstart mac | tee -a "$OUT/sanity.log"
      grep -q " passed" "$OUT/sanity.log" && ! grep -q "failed\|Error" "$OUT/sanity.log" \
        || { echo "sanity failed: stopping"; exit 3; } ;;
    same-speed)
      python3 -m pip install --no-deps --no-build-isolation -q --target /tmp/old "${OLD:?}" \
        2>&1 | grep -v WARNING | tail -2
      for side in old new; do
        path=$([ $side = old ] && echo /tmp/old || echo "")
        (cd /tmp && export PYTHONPATH=$path
         python3 -c "import macopt; print('$side:', macopt.__file__)"
         timeout 60 python3 -m macopt.cli bench decode --contexts 32K,128K --batches 1,16 \
           --skip flash,cudnn,efficient,math,repeat_kv,flex --cuda-graphs \
           --json "$OUT/same_decode_$side.json" 2>&1 | tail -6
         timeout 90 python3 -m macopt.cli bench mac --contexts 32K,128K --batches 1,16 \
           --hit-rates 1,0 --skip flash,cudnn,flex --json "$OUT/same_mac_$side.json" 2>&1 | tail -8
         timeout 60 python3 -m macopt.cli bench topk --contexts 131072 --batches 16 --budgets 2% \
           --selectors page --json "$OUT/same_topk_$side.json" 2>&1 | tail -4)
      done 2>&1 | grep -v -i warn | tee "$OUT/same_speed.log" ;;
    prefill-optin)  # the compiled causal prefill's timing: 8 layers, 128K, batch 2, chunks of
      # 4096, the untimed call as long as the timed one (no recompile); off, then on
      for opt_in in 0 1; do
        M=$([ $opt_in = 0 ] && echo unmodified,exact || echo exact,mac:all)
        MACOPT_COMPILED_CAUSAL_PREFILL=$opt_in PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
          cli bench generate --layers 8 --contexts 131072 --batches 2 --methods $M \
          --new-tokens 32 --prefill-chunk 4096 --json "$OUT/prefill_optin$opt_in.json" \
          | tee "$OUT/prefill_optin$opt_in.log" | grep --line-buffered -v '^ *File\|^    ' | tail -8
      done ;;
    *) echo "unknown stage: $stage"; exit 2 ;;
  esac
  stamp "$stage"
done
# The device tool brings back eight files a call: more go back as one archive.
if [ "$(ls "$OUT" | wc -l)" -gt 8 ]; then
  tar czf /tmp/results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tgz "$OUT/"
  echo "== $OUT packed into results.tgz"
fi
