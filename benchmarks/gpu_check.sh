#!/usr/bin/env bash
# The single GPU command (ARCHITECTURE.md, "GPU runs"). On a machine with a CUDA GPU, from the
# repository root:
#
#   bash benchmarks/gpu_check.sh            # results in $OUT, or ./gpu-results
#   bash benchmarks/gpu_check.sh --dry-run  # the same stages on CPU at tiny sizes (no install, no GPU)
#
# Stages, most important first, each under its own timeout and all under one time budget
# (GPU_CHECK_BUDGET_S, default 470 s: the whole script stays under 8 minutes on an H200):
#   1. environment: nvidia-smi, `fastgpt info`;
#   2. install: `pip install --no-deps --no-build-isolation -e .` with the CUDA extension built for the
#      GPU present (FASTGPT_CUDA=1, TORCH_CUDA_ARCH_LIST=<detected>); a failure is recorded (with
#      fastgpt/_C_build_error.txt) and everything after runs anyway, from the source tree
#      (`python -m fastgpt` imports the checkout), without the cuda backend;
#   3. `pytest -m gpu tests` (this also fills Triton's compile cache for the benchmarks);
#   4. `fastgpt bench`: attention bf16 (head_dim 128 and 64, seq 512..16k), then FFN (GPT-2 small and
#      XL, 8k and 16k tokens), LayerNorm (GB/s against the copy bandwidth) and linear cross-entropy
#      (vocab 50257, time and peak memory), then the GPT-2 training step and generation;
#   5. the CUDA dev harnesses of csrc/dev (CMake), run, then under compute-sanitizer memcheck and
#      racecheck with --validate (their small validation shapes);
#   6. one Triton attention GPU test under compute-sanitizer memcheck and racecheck;
#   7. attention fp16;
#   8. report.md and the summary table, printed last.
# Results are written after every benchmark case, so a stage cut short by its timeout still leaves its
# finished measurements in $OUT/results.json. $OUT ends with: results.json, report.md, stages.tsv,
# gpu_check.log (every stage's output).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
PYTHON=${PYTHON:-python}
OUT=${OUT:-./gpu-results}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
SUMMARY_RESERVE=20  # seconds kept for the report at the end
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
STAGES="$OUT/stages.tsv"
: >"$LOG"
: >"$STAGES"
rm -f "$OUT/results.json"

if [[ "$DRY_RUN" == 1 ]]; then
  BENCH=("$PYTHON" -m fastgpt bench --device cpu --tiny --out "$OUT" --append --no-plots)
  BF16=fp32
  FP16=fp16
else
  BENCH=("$PYTHON" -m fastgpt bench --device cuda --out "$OUT" --append --no-plots)
  BF16=bf16
  FP16=fp16
fi

# run_stage NAME CAP_SECONDS COMMAND...: runs COMMAND under min(CAP, time left), logs its output,
# and records its status in stages.tsv.
run_stage() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - SUMMARY_RESERVE - SECONDS))
  local limit=$((cap < left ? cap : left))
  if ((limit < 5)); then
    printf '%s\tskipped\t0\tout of time budget\n' "$name" >>"$STAGES"
    echo "== $name: skipped (out of time budget)" | tee -a "$LOG"
    return 0
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS status
  timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
  status=$?
  local took=$((SECONDS - start)) result=ok
  if ((status == 124 || status == 137)); then
    result="timeout"
  elif ((status == 5)) && [[ "$name" == pytest* ]]; then
    result="no tests collected"
  elif ((status != 0)); then
    result="failed (exit $status)"
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$result" "$took" "${STAGE_NOTE:-}" >>"$STAGES"
  echo "   $result after ${took}s" | tee -a "$LOG"
  STAGE_NOTE=""
  return 0
}

note_stage() {  # note_stage NAME STATUS NOTE: a stage that was decided, not run
  printf '%s\t%s\t0\t%s\n' "$1" "$2" "$3" >>"$STAGES"
  echo "== $1: $2 ($3)" | tee -a "$LOG"
}

# ---------------------------------------------------------------------------------------------
# 1. environment
if [[ "$DRY_RUN" == 1 ]]; then
  note_stage "nvidia-smi" "dry-run" "not run"
else
  run_stage "nvidia-smi" 20 nvidia-smi
fi
run_stage "fastgpt info (before install)" 30 "$PYTHON" -m fastgpt info

# 2. install, with the CUDA extension for the GPU present
if [[ "$DRY_RUN" == 1 ]]; then
  note_stage "install + CUDA build" "dry-run" "would run: FASTGPT_CUDA=1 TORCH_CUDA_ARCH_LIST=<detected> pip install --no-deps --no-build-isolation -e ."
else
  ARCH=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>>"$LOG")
  STAGE_NOTE="TORCH_CUDA_ARCH_LIST=$ARCH"
  run_stage "install + CUDA build" 200 env FASTGPT_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
    "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
  if "$PYTHON" -c "import fastgpt, sys; sys.exit('cuda' not in fastgpt.available_backends())" 2>>"$LOG"; then
    note_stage "CUDA backend" "ok" "fastgpt.available_backends() includes cuda"
  else
    REASON=$(head -c 300 fastgpt/_C_build_error.txt 2>/dev/null | tr '\t\n' '  ')
    note_stage "CUDA backend" "missing" "${REASON:-see the install stage in gpu_check.log}"
  fi
fi
run_stage "fastgpt info" 30 "$PYTHON" -m fastgpt info

# 3. the gpu tests
run_stage "pytest -m gpu tests" 90 "$PYTHON" -m pytest -m gpu tests -q -p no:cacheprovider

# 4. the benchmark set, the headline first
run_stage "bench attention $BF16" 100 "${BENCH[@]}" --ops attention --dtype "$BF16"
run_stage "bench ffn, layer_norm, cross_entropy $BF16" 70 "${BENCH[@]}" --ops ffn,layer_norm,cross_entropy --dtype "$BF16"
run_stage "bench gpt $BF16" 80 "${BENCH[@]}" --ops gpt --dtype "$BF16"

# 5. CUDA dev harnesses: build (CMake), run, and run under compute-sanitizer at their validation sizes
DEV_SOURCES=(csrc/dev/*.cu)
if [[ ! -e "${DEV_SOURCES[0]}" ]]; then
  note_stage "dev harnesses" "skipped" "no csrc/dev/*.cu"
elif [[ "$DRY_RUN" == 1 ]]; then
  note_stage "dev harnesses" "dry-run" "would build: $(basename -a -s .cu "${DEV_SOURCES[@]}" | sed 's/^/dev_/' | tr '\n' ' ')"
elif [[ ! -f CMakeLists.txt ]] || ! command -v cmake >/dev/null; then
  note_stage "dev harnesses" "skipped" "no CMakeLists.txt or no cmake"
else
  TARGETS=()
  for source in "${DEV_SOURCES[@]}"; do TARGETS+=("dev_$(basename "$source" .cu)"); done
  run_stage "dev harnesses: cmake configure" 30 cmake -S . -B build/gpu-check -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF
  run_stage "dev harnesses: build" 90 cmake --build build/gpu-check -j "$(nproc)" --target "${TARGETS[@]}"
  for target in "${TARGETS[@]}"; do
    binary=$(find build/gpu-check -type f -name "$target" -perm -u+x | head -n 1)
    if [[ -z "$binary" ]]; then
      note_stage "$target" "missing" "not built"
      continue
    fi
    run_stage "$target" 30 "$binary"
    if command -v compute-sanitizer >/dev/null; then
      run_stage "$target memcheck" 40 compute-sanitizer --tool memcheck --error-exitcode 1 "$binary" --validate
      run_stage "$target racecheck" 40 compute-sanitizer --tool racecheck --error-exitcode 1 "$binary" --validate
    fi
  done
fi

# 6. one Triton attention test under compute-sanitizer (the caching allocator off, so memcheck sees
#    every buffer's real bounds)
TRITON_TEST=$(timeout 60 "$PYTHON" -m pytest tests/test_triton_attention.py -m gpu --collect-only -q \
  -p no:cacheprovider 2>/dev/null | grep '::' | head -n 1)
if [[ "$DRY_RUN" == 1 ]]; then
  note_stage "triton attention under compute-sanitizer" "dry-run" "would run: ${TRITON_TEST:-the first gpu test of tests/test_triton_attention.py}"
elif [[ -z "$TRITON_TEST" ]]; then
  note_stage "triton attention under compute-sanitizer" "skipped" "no gpu test in tests/test_triton_attention.py"
elif ! command -v compute-sanitizer >/dev/null; then
  note_stage "triton attention under compute-sanitizer" "skipped" "compute-sanitizer not found"
else
  for tool in memcheck racecheck; do
    STAGE_NOTE="$TRITON_TEST"
    run_stage "triton attention $tool" 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool "$tool" --error-exitcode 1 "$PYTHON" -m pytest "$TRITON_TEST" -q -p no:cacheprovider
  done
fi

# 7. the second half-precision dtype
run_stage "bench attention $FP16" 60 "${BENCH[@]}" --ops attention --dtype "$FP16"

# 8. report: the stage table, every op's table, and the speedup summary printed last
"$PYTHON" -m fastgpt.bench.report "$OUT/results.json" --stages "$STAGES" --markdown "$OUT/report.md" 2>&1 | tee -a "$LOG"
if [[ "$DRY_RUN" != 1 ]]; then
  GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())" 2>/dev/null)
  echo "commit as: benchmarks/results/$(date +%F)-${GPU:-gpu}.json (and render: python -m fastgpt bench --render ...)"
fi
echo "gpu_check: ${SECONDS}s; wrote $OUT/results.json, $OUT/report.md, $STAGES, $LOG"
