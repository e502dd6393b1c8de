#!/usr/bin/env bash
# The single GPU command (the shared ARCHITECTURE.md, "GPU runs"). On a machine with a CUDA GPU, from the
# repository root:
#
#   bash benchmarks/gpu_check.sh               # build, GPU tests, full benchmark set; results in $OUT or ./gpu-results
#   bash benchmarks/gpu_check.sh correctness   # build, GPU tests, benchmark smoke, dev harnesses, compute-sanitizer
#   bash benchmarks/gpu_check.sh bench         # build and the full benchmark set
#   bash benchmarks/gpu_check.sh sanitizer     # build, dev harnesses, compute-sanitizer (after a run of 'all')
#   bash benchmarks/gpu_check.sh profile       # build, then where each op's time goes: host or kernels
#   bash benchmarks/gpu_check.sh --dry-run     # the same stages on CPU at tiny sizes (no build, no GPU)
#
# One area at a time, each under 3 minutes (GPU_CHECK_BUDGET_S defaults to 175 s for these), so one GPU
# loan allows several measure-change-measure rounds: build (reused when unchanged), that area's GPU tests
# (`pytest -m gpu tests -k <area>`), and `fastgpt bench --ops <area> --quick` in bf16:
#
#   bash benchmarks/gpu_check.sh attention     # tests matching 'attention or decode'; attention's quick set
#                                              # (on Hopper also the sm_90a kernels' harness, attention_sm90)
#   bash benchmarks/gpu_check.sh pack-cutlass  # before a loan, where nvidia-cutlass is installed: pack the
#                                              # CUTLASS headers into build/cutlass-include.tar.gz to carry
#   bash benchmarks/gpu_check.sh ffn           # tests matching 'ffn or gemm'; FFN at GPT-2 small and XL
#   bash benchmarks/gpu_check.sh layer_norm    # tests matching 'layer_norm or layernorm'; LayerNorm GB/s
#   bash benchmarks/gpu_check.sh cross_entropy # tests matching 'cross_entropy' (and the cuda backend's
#                                              # load, opcheck and float32 tests); vocab 50257
#   bash benchmarks/gpu_check.sh gpt           # the training step's tests (eager, compile, CUDA graph,
#                                              # determinism), generate's (the per-op loop, the CLI and the
#                                              # CUDA-graph decode step), and
#                                              # the GPT-2 step and generation, with the
#                                              # fastgpt.nn+torch.compile and fastgpt.nn+cuda-graph providers
#
# Several areas in one run build once and then take the areas in the order given, each with an equal
# share of the time left (GPU_CHECK_BUDGET_S defaults to 175 s per area, at most 570 s, so the run fits
# one 10-minute call of a lent machine, which starts bare and would rebuild for every call):
#
#   bash benchmarks/gpu_check.sh cross_entropy attention ffn gpt
#
# Stages, in this order, each under its own timeout and all under one time budget
# (GPU_CHECK_BUDGET_S, default 470 s: the whole script stays under 8 minutes on an H200; 175 s for an
# area); [all], [correctness], [bench], [sanitizer], [profile] and [area] say which runs include a stage:
#   1. environment: nvidia-smi, `fastgpt info` after the build;
#   2. build: `python setup.py build_ext --inplace` with the CUDA extension for the GPU present
#      (FASTGPT_CUDA=1, TORCH_CUDA_ARCH_LIST=<detected>); everything after runs from the source tree
#      (`python -m fastgpt` and pytest import the checkout), so nothing is installed and no pip or
#      network is needed; a failure is recorded (with fastgpt/_C_build_error.txt) and everything after
#      runs anyway, without the cuda backend [every part]. The build is reused when build/gpu-check.stamp
#      holds the hash of csrc/, setup.py and the architecture it was built from and the cuda backend
#      loads (setuptools alone would miss a changed header). The CUDA dev harnesses of csrc/dev (CMake,
#      for this GPU's architecture only) then build in the background while the GPU tests run
#      [correctness, sanitizer];
#   3. `pytest -m gpu tests -v` (each test's result is logged as it ends, so a stage its timeout cuts
#      still names what passed and failed), on one xdist worker per CPU core when pytest-xdist is there
#      (their Triton compilations run in parallel; this also fills Triton's compile cache for the
#      benchmarks), with the ten slowest tests listed [all, correctness];
#      then `fastgpt bench` at tiny sizes, so the benchmark code itself runs on the GPU [correctness];
#      or only the area's GPU tests [area];
#   4. `fastgpt bench` [all, bench]: attention bf16 (head_dim 64 and 128, seq 512..16k), the GPT-2
#      training step and generation, FFN (GPT-2 small and XL, 8k tokens), LayerNorm (GB/s against the
#      copy bandwidth) and linear cross-entropy (vocab 50257, time and peak memory), then attention
#      fp16 at the quick set (head_dim 64 and 128 at seq 512, 4k and 16k; without the opt-in Gluon
#      provider, which bf16 times); the GPT stage leaves out
#      fastgpt.nn+torch.compile (its compilation would take the stage past its cap; the gpt part times it);
#      or `fastgpt bench --ops <area> --quick` in bf16 [area];
#      benchmarks/host_overhead.py [profile]: each op's wall time per call against its kernels' time
#      (torch.profiler) and fastgpt's Python hotspots, into host_overhead.json and host_overhead.md;
#   5. the dev harnesses validate against their CPU references (--validate) [correctness, sanitizer];
#   6. compute-sanitizer memcheck, then racecheck, on each GPU harness with --validate (their small
#      validation shapes) and on tests/test_gpu_sanitizer.py (Triton attention forward, backward and
#      decode at awkward shapes) [correctness, sanitizer];
#   7. report.md and the summary table, printed last.
# On a copy of the tree with a stale or no .git, set FASTGPT_GIT_SHA to the commit it holds (results.json).
# Stage times on the H200 of 'all' (2026-11-30, benchmarks/results/2026-11-30-h200.*): build 28 s, GPU
# tests over 90 s (cut then with one test left), attention bf16 82 s, GPT 101 s, FFN + LayerNorm +
# cross-entropy over 111 s (cut in cross-entropy's second shape), leaving 18 s for attention fp16 (which
# ran 69 s at all 12 shapes on 2026-11-29). Since then cross-entropy has one GPU shape, fp16 attention
# runs the quick set (6 shapes), each of the ~173 timed (case, provider) pairs warms up for 0.1 s instead
# of 0.2 s, and the report's reserve is 10 s instead of 20 s: an estimated 440 s of the 460 s the stages
# may take, before the fastgpt:triton[gluon] provider added about 36 pairs to attention bf16 (fp16
# leaves it out). Not yet confirmed on a GPU: the areas above are the measured way to spend a loan.
# Results are written after every benchmark case, so a stage cut short by its timeout still leaves its
# finished measurements in $OUT/results.json. $OUT ends with: stages.tsv, gpu_check.log (every stage's
# output) and report.md; results.json where benchmarks ran; host_overhead.json and .md for 'profile'.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
PART=all
AREAS=()
FIRST_PART=""
for argument in "$@"; do
  case "$argument" in
    --dry-run)
      DRY_RUN=1
      continue
      ;;
    attention | ffn | layer_norm | cross_entropy | gpt) GIVEN=areas AREAS+=("$argument") ;;
    pack-cutlass | all | correctness | bench | sanitizer | profile) GIVEN=$argument ;;
    *)
      echo "gpu_check.sh: expected all, correctness, bench, sanitizer, profile, attention, ffn, layer_norm," \
        "cross_entropy, gpt or --dry-run, got '$argument'" >&2
      exit 2
      ;;
  esac
  if [[ -n "$FIRST_PART" && ("$GIVEN" != areas || "$PART" != areas) ]]; then
    echo "gpu_check.sh: only areas combine in one run, got '$FIRST_PART' and '$argument'" >&2
    exit 2
  fi
  FIRST_PART=${FIRST_PART:-$argument}
  PART=$GIVEN
done
# area_tests AREA: the pytest -k expression choosing the area's GPU tests (test and module names)
area_tests() {
  case "$1" in
    attention) echo "attention or decode or sdpa" ;;
    ffn) echo "ffn or gemm" ;;
    layer_norm) echo "layer_norm or layernorm" ;;
    gpt) echo "train_step or training_step or torch_compile or gpt or generate" ;;
    # cross_entropy (the first area of a loan's run) also takes the cuda backend's tests of no one op:
    # whether it loaded, its operators' opcheck, and its refusal of float32
    cross_entropy) echo "cross_entropy or cuda_backend_is_available or opcheck or float32_is_declined" ;;
    *) echo "$1" ;;
  esac
}
PYTHON=${PYTHON:-python3}

# The CUTLASS/CuTe headers of the Hopper attention kernel (csrc/cuda/attention_fwd_sm90.cu) come from the
# nvidia-cutlass wheel, which the GPU machine cannot download: `gpu_check.sh pack-cutlass`, run where
# the wheel is installed, packs them (cute/ and cutlass/, 2.4 MB) into $CUTLASS_BUNDLE, a path to carry
# along with the tree; on the GPU machine they are unpacked from there when no installed copy is found.
CUTLASS_BUNDLE=${CUTLASS_BUNDLE:-build/cutlass-include.tar.gz}
if [[ "$PART" == pack-cutlass ]]; then
  CUTLASS_INCLUDE=$("$PYTHON" fastgpt/_cutlass_paths.py | sed -n 1p)
  if [[ -z "$CUTLASS_INCLUDE" ]]; then
    echo "gpu_check.sh pack-cutlass: no CUTLASS headers here (pip install --no-deps nvidia-cutlass)" >&2
    exit 1
  fi
  mkdir -p "$(dirname "$CUTLASS_BUNDLE")"
  tar -czf "$CUTLASS_BUNDLE" -C "$CUTLASS_INCLUDE" cute cutlass
  echo "packed $CUTLASS_INCLUDE into $CUTLASS_BUNDLE ($(du -h "$CUTLASS_BUNDLE" | cut -f1)): carry it to the GPU machine"
  exit 0
fi
OUT=${OUT:-./gpu-results}
if ((${#AREAS[@]})); then
  AREA_BUDGET=$((175 * ${#AREAS[@]}))
  BUDGET=${GPU_CHECK_BUDGET_S:-$((AREA_BUDGET < 570 ? AREA_BUDGET : 570))}
else
  BUDGET=${GPU_CHECK_BUDGET_S:-470}
fi
SUMMARY_RESERVE=10  # seconds kept for the report at the end (it takes 4 s on a 2-core CPU)
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
STAGES="$OUT/stages.tsv"
: >"$LOG"
: >"$STAGES"
rm -f "$OUT/results.json"

if [[ "$DRY_RUN" == 1 ]]; then
  BENCH=("$PYTHON" -m fastgpt bench --device cpu --tiny --out "$OUT" --append --no-plots)
  HOST_OVERHEAD_ARGS=(--device cpu --tiny)
  BF16=fp32
  FP16=fp16
else
  BENCH=("$PYTHON" -m fastgpt bench --device cuda --out "$OUT" --append --no-plots)
  HOST_OVERHEAD_ARGS=(--device cuda)
  BF16=bf16
  FP16=fp16
fi

wants() {  # wants STAGE_SET: whether this run includes the stages of tests, smoke, bench, sanitizer or profile
  case "$1" in
    tests) [[ "$PART" == all || "$PART" == correctness ]] ;;
    smoke) [[ "$PART" == correctness ]] ;;
    bench) [[ "$PART" == all || "$PART" == bench ]] ;;
    sanitizer) [[ "$PART" == correctness || "$PART" == sanitizer ]] ;;
    profile) [[ "$PART" == profile ]] ;;
  esac
}

# stage_result NAME EXIT_STATUS: what stages.tsv records for a stage that ran (a timeout's kill is 124
# or 137; pytest exits 5 when it collected nothing).
stage_result() {
  local name=$1 status=$2
  if ((status == 124 || status == 137)); then
    echo "timeout"
  elif ((status == 5)) && [[ "$name" == pytest* ]]; then
    echo "no tests collected"
  elif ((status != 0)); then
    echo "failed (exit $status)"
  else
    echo "ok"
  fi
}

# run_stage NAME CAP_SECONDS COMMAND...: runs COMMAND under min(CAP, time left), logs its output,
# and records its status in stages.tsv. The time left ends at the budget's, or earlier at AREA_END
# (in seconds of $SECONDS), where the area being run must end to leave the later areas their shares.
AREA_END=$BUDGET
run_stage() {
  local name=$1 cap=$2
  shift 2
  local end=$((BUDGET - SUMMARY_RESERVE < AREA_END ? BUDGET - SUMMARY_RESERVE : AREA_END))
  local left=$((end - SECONDS))
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
  local took=$((SECONDS - start)) result
  result=$(stage_result "$name" "$status")
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

# 2. build the extension with the CUDA kernels for the GPU present (with the Hopper attention kernel
#    when the CUTLASS headers are installed or carried along in $CUTLASS_BUNDLE)
if [[ "$DRY_RUN" != 1 && -z "$("$PYTHON" fastgpt/_cutlass_paths.py)" ]]; then
  if [[ -f "$CUTLASS_BUNDLE" ]]; then
    mkdir -p build/cutlass-include && tar -xzf "$CUTLASS_BUNDLE" -C build/cutlass-include
    export FASTGPT_CUTLASS_INCLUDE=$PWD/build/cutlass-include
  fi
fi
CUTLASS_FOUND=$("$PYTHON" fastgpt/_cutlass_paths.py | tr '\n' ' ')
if [[ -n "$CUTLASS_FOUND" ]]; then
  note_stage "CUTLASS headers" "ok" "$CUTLASS_FOUND"
else
  note_stage "CUTLASS headers" "missing" "no nvidia-cutlass wheel and no $CUTLASS_BUNDLE (gpu_check.sh pack-cutlass): built without the sm_90a attention kernel"
fi
if [[ "$DRY_RUN" == 1 ]]; then
  note_stage "CUDA build" "dry-run" "would run: FASTGPT_CUDA=1 TORCH_CUDA_ARCH_LIST=<detected> $PYTHON setup.py build_ext --inplace"
else
  ARCH=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>>"$LOG")
  BUILD_STAMP=build/gpu-check.stamp
  SOURCES_HASH=$( (echo "arch $ARCH cutlass $CUTLASS_FOUND" && find csrc setup.py -type f -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1)
  if [[ -f "$BUILD_STAMP" && "$(cat "$BUILD_STAMP")" == "$SOURCES_HASH" ]] &&
    "$PYTHON" -c "import fastgpt, sys; sys.exit('cuda' not in fastgpt.available_backends())" 2>>"$LOG"; then
    note_stage "CUDA build" "reused" "csrc/ and setup.py unchanged since the last build for $ARCH"
  else
    rm -f "$BUILD_STAMP"
    STAGE_NOTE="TORCH_CUDA_ARCH_LIST=$ARCH"
    run_stage "CUDA build" 200 env FASTGPT_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
      "$PYTHON" setup.py build_ext --inplace
    [[ "$(tail -n 1 "$STAGES" | cut -f 2)" == ok ]] || SOURCES_HASH=""  # a failed build is never reused
  fi
  if "$PYTHON" -c "import fastgpt, sys; sys.exit('cuda' not in fastgpt.available_backends())" 2>>"$LOG"; then
    note_stage "CUDA backend" "ok" "fastgpt.available_backends() includes cuda"
    [[ -n "$SOURCES_HASH" ]] && mkdir -p build && echo "$SOURCES_HASH" >"$BUILD_STAMP"
  else
    REASON=$(head -c 300 fastgpt/_C_build_error.txt 2>/dev/null | tr '\t\n' '  ')
    note_stage "CUDA backend" "missing" "${REASON:-see the build stage in gpu_check.log}"
  fi
fi
run_stage "fastgpt info" 30 "$PYTHON" -m fastgpt info

# The dev harnesses build on the CPU cores in the background (under their own timeout) while the GPU
# tests run; stage 5 waits for them.
DEV_SOURCES=(csrc/dev/*.cu)
DEV_TARGETS=()
DEV_BUILD_PID=""
DEV_BUILD_LOG=build/gpu-check-harnesses.log
if ! wants sanitizer; then
  :
elif [[ ! -e "${DEV_SOURCES[0]}" ]]; then
  note_stage "dev harnesses" "skipped" "no csrc/dev/*.cu"
elif [[ "$DRY_RUN" == 1 ]]; then
  note_stage "dev harnesses" "dry-run" "would build: $(basename -a -s .cu "${DEV_SOURCES[@]}" | sed 's/^/dev_/' | tr '\n' ' ')"
elif [[ ! -f CMakeLists.txt ]] || ! command -v cmake >/dev/null; then
  note_stage "dev harnesses" "skipped" "no CMakeLists.txt or no cmake"
else
  for source in "${DEV_SOURCES[@]}"; do
    # the sm_90a harnesses run only on compute capability 9.0 and build only with the CUTLASS headers
    [[ "$source" == *sm90* && ("$ARCH" != 9.0 || -z "$CUTLASS_FOUND") ]] && continue
    DEV_TARGETS+=("dev_$(basename "$source" .cu)")
  done
  mkdir -p build/gpu-check
  DEV_BUILD_START=$SECONDS
  # 9.0 -> 90a (the harnesses are built as the CMake default builds them for Hopper), 8.0 -> 80
  HARNESS_ARCH=${ARCH/./}
  [[ "$HARNESS_ARCH" == 90 ]] && HARNESS_ARCH=90a
  timeout -k 5 240 bash -c 'cmake -S . -B build/gpu-check -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF \
      -DFASTGPT_CUDA_ARCHS="$0" &&
    cmake --build build/gpu-check -j "$(nproc)" --target "$@"' "$HARNESS_ARCH" "${DEV_TARGETS[@]}" \
    >"$DEV_BUILD_LOG" 2>&1 &
  DEV_BUILD_PID=$!
fi

# 3. the gpu tests. A test that hangs (a kernel waiting on a barrier that never completes) fails after
#    TEST_TIMEOUT_S where pytest-timeout is installed (the GPU machines have it): its xdist worker is
#    ended and replaced, and the other tests go on instead of the stage's timeout ending them all.
#    60 s leaves a test's compilations (torch.compile of a GPT step, Triton autotuning) their tens of
#    seconds; a test that hangs from its start still fails inside an area's 75 s test stage.
TEST_TIMEOUT_S=60
PYTEST_OPTIONS=()
"$PYTHON" -c "import xdist" 2>/dev/null && PYTEST_OPTIONS=(-n "$(nproc)" --dist load)
"$PYTHON" -c "import pytest_timeout" 2>/dev/null && PYTEST_OPTIONS+=(--timeout="$TEST_TIMEOUT_S" --timeout-method=thread)
if wants tests; then
  run_stage "pytest -m gpu tests" 110 "$PYTHON" -m pytest -m gpu tests -v -p no:cacheprovider --durations=10 "${PYTEST_OPTIONS[@]}"
fi

# ... or the areas', each with its share of the time left: its GPU tests, then (for attention on Hopper)
#     the sm_90a forward and backward (opt-in: FASTGPT_CUDA_ATTENTION=sm90) against the CPU reference
#     and timed beside the sm_80 kernels by their harness (csrc/dev/attention_sm90.cu), then its
#     benchmarks' quick set. The harness builds in the background from the start (its kernel objects
#     and the CuTe ones, compiled on the CPU cores while the GPU tests of the areas before run); a
#     binary left from an earlier build is removed first, so a failed build never runs a stale one. It
#     runs at the lowest priority on half the cores, so the areas timed before it ends keep theirs.
SM90_HARNESS_PID=""
SM90_HARNESS_LOG=build/gpu-check-attention-sm90.log
if [[ " ${AREAS[*]} " == *" attention "* && "$DRY_RUN" != 1 && "${ARCH:-}" == 9.0 && -n "$CUTLASS_FOUND" ]]; then
  SM90_DEV_ARCH="-gencode arch=compute_90a,code=sm_90a"
  rm -f csrc/dev/attention_sm90
  mkdir -p build
  SM90_HARNESS_START=$SECONDS
  timeout -k 5 240 nice -n 19 make -C csrc/dev -j "$(($(nproc) / 2))" ARCH="$SM90_DEV_ARCH" SM90_ARCH="$SM90_DEV_ARCH" \
    CUTLASS_INCLUDE="$(echo "$CUTLASS_FOUND" | cut -d' ' -f1)" attention_sm90 >"$SM90_HARNESS_LOG" 2>&1 &
  SM90_HARNESS_PID=$!
fi
for index in "${!AREAS[@]}"; do
  AREA=${AREAS[$index]}
  AREA_END=$((SECONDS + (BUDGET - SUMMARY_RESERVE - SECONDS) / (${#AREAS[@]} - index)))
  STAGE_NOTE="-k '$(area_tests "$AREA")'"
  run_stage "pytest -m gpu tests ($AREA)" 75 "$PYTHON" -m pytest -m gpu tests -k "$(area_tests "$AREA")" -v \
    -p no:cacheprovider --durations=5 "${PYTEST_OPTIONS[@]}"
  if [[ "$AREA" == attention && -n "$SM90_HARNESS_PID" ]]; then
    wait "$SM90_HARNESS_PID"
    BUILD_STATUS=$?
    cat "$SM90_HARNESS_LOG" >>"$LOG"
    BUILD_NAME="dev attention_sm90: build (background)"
    printf '%s\t%s\t%s\t%s\n' "$BUILD_NAME" "$(stage_result "$BUILD_NAME" "$BUILD_STATUS")" \
      "$((SECONDS - SM90_HARNESS_START))" "done by now; the time is since it started" >>"$STAGES"
    [[ -x csrc/dev/attention_sm90 ]] && run_stage "dev attention_sm90 (validate, time)" 120 csrc/dev/attention_sm90
  fi
  run_stage "bench $AREA $BF16 (quick set)" 150 "${BENCH[@]}" --ops "$AREA" --dtype "$BF16" --quick
done
AREA_END=$BUDGET

# ... and, when the benchmarks are not run, the benchmark code on this device at tiny sizes (seconds)
if wants smoke; then
  run_stage "bench smoke (tiny sizes)" 60 "${BENCH[@]}" --tiny --dtype "$BF16,$FP16" --skip-providers "*torch.compile"
fi

# 4. the benchmark set, the headline first
if wants bench; then
  run_stage "bench attention $BF16" 130 "${BENCH[@]}" --ops attention --dtype "$BF16"
  run_stage "bench gpt $BF16" 120 "${BENCH[@]}" --ops gpt --dtype "$BF16" --skip-providers "fastgpt.nn+torch.compile"
  run_stage "bench ffn, layer_norm, cross_entropy $BF16" 110 "${BENCH[@]}" --ops ffn,layer_norm,cross_entropy --dtype "$BF16"
  # fp16 checks the second dtype of the kernels bf16 timed: the opt-in Gluon provider is left out there
  run_stage "bench attention $FP16 (quick set)" 60 "${BENCH[@]}" --ops attention --dtype "$FP16" --quick \
    --skip-providers "*gluon*"
fi

# ... or where the time of each op's call goes (host or kernels)
#     (37 records with the profiler's post-processing: about 3 minutes, so all of the part's budget after
#     the build; host_overhead.py rewrites its files after each record, so a cut run keeps what it measured)
if wants profile; then
  run_stage "host overhead" 400 env PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/host_overhead.py \
    --out "$OUT" "${HOST_OVERHEAD_ARGS[@]}"
fi

# 5. the dev harnesses validate against their CPU references
HARNESSES=()
if [[ -n "$DEV_BUILD_PID" ]]; then
  wait "$DEV_BUILD_PID"
  BUILD_STATUS=$?
  cat "$DEV_BUILD_LOG" >>"$LOG"
  BUILD_NAME="dev harnesses: build (background)"
  printf '%s\t%s\t%s\t%s\n' "$BUILD_NAME" "$(stage_result "$BUILD_NAME" "$BUILD_STATUS")" "$((SECONDS - DEV_BUILD_START))" \
    "done by now; the time is since it started" >>"$STAGES"
  for target in "${DEV_TARGETS[@]}"; do
    binary=$(find build/gpu-check -type f -name "$target" -perm -u+x | head -n 1)
    if [[ -z "$binary" ]]; then
      note_stage "$target" "missing" "not built"
    else
      HARNESSES+=("$binary")
    fi
  done
  # validation only: their timing loops take 30 s and more each, and `fastgpt bench` times the kernels
  for binary in "${HARNESSES[@]}"; do run_stage "$(basename "$binary") --validate" 30 "$binary" --validate; done
fi

# 6. compute-sanitizer, memcheck first: each harness at its validation sizes (--validate), and the Triton
#    sanitizer test (the caching allocator off, so memcheck sees every buffer's real bounds)
SANITIZER_TEST=tests/test_gpu_sanitizer.py::test_triton_attention_sanitizer_smoke
if ! wants sanitizer; then
  :
elif [[ "$DRY_RUN" == 1 ]]; then
  note_stage "compute-sanitizer" "dry-run" "would run: memcheck and racecheck on each harness --validate and on $SANITIZER_TEST"
elif ! command -v compute-sanitizer >/dev/null; then
  note_stage "compute-sanitizer" "skipped" "compute-sanitizer not found"
else
  for tool in memcheck racecheck; do
    for binary in "${HARNESSES[@]}"; do
      # dev_index_checks and dev_sm90_layout_checks run on the CPU only: compute-sanitizer has no GPU
      # call to instrument and exits 255 (dev_index_checks, 2026-11-30-h200-sanitizer.stages.tsv)
      case "$(basename "$binary")" in dev_index_checks | dev_sm90_layout_checks) continue ;; esac
      run_stage "$(basename "$binary") $tool" 40 compute-sanitizer --tool "$tool" --error-exitcode 1 "$binary" --validate
    done
    STAGE_NOTE="$SANITIZER_TEST"
    run_stage "triton attention $tool" 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool "$tool" --error-exitcode 1 "$PYTHON" -m pytest "$SANITIZER_TEST" -q -p no:cacheprovider
  done
fi

# 7. report: the stage table, every op's table, and the speedup summary printed last
"$PYTHON" -m fastgpt.bench.report "$OUT/results.json" --stages "$STAGES" --markdown "$OUT/report.md" 2>&1 | tee -a "$LOG"
if [[ "$DRY_RUN" != 1 ]]; then
  GPU=$("$PYTHON" -c "import torch; from fastgpt.bench.records import gpu_model; print(gpu_model(torch.cuda.get_device_name()))" 2>/dev/null)
  echo "commit as: benchmarks/results/$(date +%F)-${GPU:-gpu}.json (and render: python -m fastgpt bench --render ...)"
fi
echo "gpu_check: ${SECONDS}s; wrote in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
