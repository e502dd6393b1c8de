# The two commands of the README's Quickstart, `make demo` and `make test`, work on a fresh machine:
# they install what is missing first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# CPU torch from the local wheel cache on CI machines; any torch >= 2.6 already installed is kept.
TORCH_SPEC ?= torch==2.13.0
PYTEST_WORKERS ?= 2
STAMP := .make/installed
# Editing any C++/CUDA source rebuilds the extension fastgpt._C on the next `make install`/`make test`.
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: install demo test ctest cuda-compile-deps bench lint clean

$(STAMP): setup.py pyproject.toml $(CSRC)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install setuptools wheel
	$(PIP) install --no-build-isolation -e ".[test,triton]"
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

install: $(STAMP)

demo: install
	$(PYTHON) -m fastgpt demo

# The C++ kernels' own tests (csrc/cpu/tests, no torch), and the CUDA sources compiled when nvcc exists.
ctest: cuda-compile-deps
	command -v cmake >/dev/null || $(PIP) install cmake
	cmake -S . -B build && cmake --build build -j2 && ctest --test-dir build --output-on-failure

# Where nvcc exists, the compile checks of the CUDA sources (tests/test_cuda_compile.py) also need
# cuBLASLt's header: the nvidia-cublas wheel that torch's CUDA builds install (about 0.6 GB); and the
# Hopper attention kernel (csrc/cuda/attention_fwd_sm90.cu) the CUTLASS/CuTe headers: the
# nvidia-cutlass wheel (6 MB; --no-deps: only its headers are used, not its Python DSL).
cuda-compile-deps:
	command -v nvcc >/dev/null || exit 0; \
	$(PYTHON) fastgpt/_cublaslt_paths.py | grep -q . || $(PIP) install nvidia-cublas; \
	test -n "$$($(PYTHON) fastgpt/_cutlass_paths.py)" || $(PIP) install --no-deps "nvidia-cutlass==4.2.0.0"

test: install ctest
	$(PYTHON) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=15 tests

# The pytest-benchmark files (one shape per op, every provider), then the `fastgpt bench --quick` sweep
# with its tables, plots and bench-results/results.json.
bench: install
	$(PYTHON) -m pytest benchmarks --benchmark-only -q -p no:cacheprovider
	$(PYTHON) -m fastgpt bench --quick --out bench-results

# ruff from the registry, at the [dev] extra's lower bound; linting needs neither torch nor a build.
lint:
	$(PYTHON) -m ruff --version || $(PIP) install "ruff>=0.15"
	$(PYTHON) -m ruff check fastgpt tests benchmarks
	$(PYTHON) -m ruff format --check fastgpt tests benchmarks

clean:
	rm -rf .make build *.egg-info fastgpt/*.so fastgpt/_C_build_error.txt
