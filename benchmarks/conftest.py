"""pytest-benchmark harness: `python -m pytest benchmarks --benchmark-only` (or `make bench`).

Each test_bench_*.py names its op (OP = "attention", ...); this file parametrises its test by every
provider of fastgpt.bench (fastgpt's backends from fastgpt.available_backends() and the baselines, the
same objects `fastgpt bench` times) and by mode, at the largest shape of the op's quick sweep, with
one set of inputs (no rotation beyond L2: `fastgpt bench` gives the headline numbers).
Providers that cannot run here (a missing backend or library, Triton on CPU) are skipped with the
reason. The run's work (FLOPs, bytes or tokens) and throughput go into each benchmark's extra_info.

Environment: FASTGPT_BENCH_SWEEP=quick|tiny|full picks the sweep the shape comes from (default quick).
benchmarks/ is outside the test suite's testpaths, so `make test` never collects it.
"""

import os

import pytest
import torch

from fastgpt.bench.records import dtype_name
from fastgpt.bench.runner import OPS
from fastgpt.bench.timing import keep_freed_memory

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32  # fastgpt bench's defaults
SWEEP = os.environ.get("FASTGPT_BENCH_SWEEP", "quick")
WARMUP_ROUNDS = 2  # compilation and autotuning happen in the first call
ROUNDS = 10
if DEVICE.type == "cpu":
    keep_freed_memory()  # as `fastgpt bench` does on CPU (fastgpt.bench.timing, "CPU allocator")


def benchmark_shape(op, mode):
    """The largest shape of the sweep (for the gpt op: of the mode's case)."""
    return [shape for shape in OPS[op].shapes(DEVICE.type, SWEEP) if shape.get("mode", mode) == mode][-1]


def pytest_generate_tests(metafunc):
    if "provider" not in metafunc.fixturenames:
        return
    op = metafunc.module.OP
    bench = OPS[op]
    metafunc.parametrize("mode", bench.modes)
    metafunc.parametrize("provider", bench.provider_names(benchmark_shape(op, bench.modes[0]), DTYPE, DEVICE))


@pytest.fixture
def run_provider(benchmark):
    """run_provider(op, provider, mode): time one provider with pytest-benchmark."""

    def run(op, provider, mode):
        bench, shape = OPS[op], benchmark_shape(op, mode)
        call, skip = bench.benchmark_call(shape, DTYPE, DEVICE, provider, mode)
        if skip:
            pytest.skip(skip)
        benchmark.group = f"{op} {mode} {dtype_name(DTYPE)}"
        benchmark.extra_info.update(
            op=op, shape=shape, dtype=dtype_name(DTYPE), device=DEVICE.type, provider=provider, mode=mode
        )
        benchmark.pedantic(call, warmup_rounds=WARMUP_ROUNDS, rounds=ROUNDS, iterations=1)
        seconds = benchmark.stats.stats.median
        for name, amount in bench.work(shape, DTYPE, mode).items():
            if amount:
                benchmark.extra_info[name] = amount
                benchmark.extra_info[f"{name}_per_s"] = amount / seconds

    return run
