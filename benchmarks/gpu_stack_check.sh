#!/usr/bin/env bash
# Before a GPU loan, on a machine without a GPU: build and test the committed HEAD against the GPU
# machines' software, which is not this machine's. The GPU machines run torch 2.11 (CUDA 13.0) and
# Triton 3.6; the CPU machines torch 2.13 and Triton 3.9. A build that only ever met 2.13's headers
# can fail there before any kernel runs (csrc/autograd.cpp once did: 2.13 holds autograd nodes in
# c10::intrusive_ptr, 2.11 in std::shared_ptr), and that costs a GPU session its first minutes.
#
#   bash benchmarks/gpu_stack_check.sh          # venv (~4.6 GB, reused), CUDA build, the CPU test suite
#
# 1. a virtual environment ($GPU_STACK_VENV, default .gpu-stack-venv) over this Python's packages with
#    torch==2.11.0 from PyPI (its CUDA 13.0 build, which brings Triton 3.6) and numpy < 2.3 (Triton 3.6's
#    interpreter reads a scalar with int() of a one-element array, which numpy 2.3 refuses);
# 2. a copy of HEAD in a temporary directory, built with the CUDA extension for sm_90a
#    (FASTGPT_CUDA=1, against the venv's torch headers and this machine's nvcc);
# 3. the test suite from that copy (pytest -n 2): on this CPU machine the Triton kernels run in
#    Triton 3.6's interpreter and the Triton compile checks compile with Triton 3.6. The spill ledger
#    (test_register_spills_within_the_ledger) is left out: it records Triton 3.9's ptxas, and 3.6
#    spills more on sm_80 (on 2026-12-07: up to 260 bytes; on sm_90 only the LayerNorm backward at
#    N=16384, 2.5 KB against 3.9's 0.7 KB). So is test_console_entry_exits_non_zero_without_traceback,
#    which wants nothing on stderr but the error: torch's CUDA build warns there that it finds no CUDA
#    runtime (torch.utils.benchmark imports torch.utils.cpp_extension), which only a GPU-less machine sees.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${GPU_STACK_VENV:-.gpu-stack-venv}
TORCH_SPEC=${GPU_STACK_TORCH:-torch==2.11.0}
# The CUDA toolkit: $CUDA_HOME, else /usr/local/cuda, else the one around nvcc on PATH (which may be a
# wrapper script elsewhere, as on the CPU machines).
CUDA_ROOT=${CUDA_HOME:-}
[ -n "$CUDA_ROOT" ] || { [ -x /usr/local/cuda/bin/nvcc ] && CUDA_ROOT=/usr/local/cuda; } || true
[ -n "$CUDA_ROOT" ] || CUDA_ROOT=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
[ -f "$CUDA_ROOT/include/crt/host_defines.h" ] \
  || { echo "gpu_stack_check: no CUDA toolkit at '$CUDA_ROOT' (set CUDA_HOME)" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv --system-site-packages "$VENV"
fi
# --isolated: from PyPI, past this machine's pip constraints (which cap torch at its local wheels).
"$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_SPEC#torch==}')" \
  || PIP_CONSTRAINT="" "$VENV/bin/pip" install --isolated -q "$TORCH_SPEC" "numpy<2.3"

COPY=$(mktemp -d)
trap 'rm -rf "$COPY"' EXIT
git archive HEAD | tar -x -C "$COPY"
echo "gpu_stack_check: $("$VENV/bin/python" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'), HEAD $(git rev-parse --short HEAD)"
(cd "$COPY" && FASTGPT_CUDA=1 CUDA_HOME="$CUDA_ROOT" TORCH_CUDA_ARCH_LIST="9.0a" MAX_JOBS=2 \
  "$VENV/bin/python" setup.py build_ext --inplace >build.log 2>&1) \
  || { tail -n 60 "$COPY/build.log"; echo "gpu_stack_check: the build failed" >&2; exit 1; }
echo "gpu_stack_check: the CUDA extension builds against $TORCH_SPEC"
cd "$COPY" && PYTHONPATH="$COPY" "$VENV/bin/python" -m pytest -n 2 --dist loadfile -q -p no:cacheprovider \
  --deselect tests/test_triton_compile.py::test_register_spills_within_the_ledger \
  --deselect tests/test_cli_train.py::test_console_entry_exits_non_zero_without_traceback tests
