"""Timing, peak memory and the device's measured peaks.

Timing rules (the shared ARCHITECTURE.md, Benchmarks):
- every provider is called a few times first (warm-up: compilation, autotuning, allocator caches);
- the providers of one case are interleaved: each round times every provider once, in an order that
  rotates from round to round, so a burst of load from elsewhere on the machine hits them all alike;
- CPU: each round is one `torch.utils.benchmark.Timer.blocked_autorange` per provider (when a single
  call outlasts the round: a plan's `calls_per_long_round` calls, each timed alone), run with torch's
  threads; the per-call block times are pooled over the rounds;
- GPU: each round is one block of calls between two CUDA events, the block sized to a few ms; the
  callables rotate over several copies of their inputs so the working set exceeds the L2 cache, as a
  layer inside a real model sees it;
- the result is the median per-call time over all blocks, with its interquartile range and extremes;
  on request (`cpu_time=True`) also the process CPU time per call of each round, all threads summed:
  on a machine shared with other jobs it is the steadier measure of the work a provider does.

Every benchmark script times through `measure_interleaved`; a script that wants one timed call per
provider and round on CPU (calls of seconds, or a count of single calls) uses `single_call_plan`.

CPU allocator: on glibc, `keep_freed_memory()` stops malloc from handing freed memory back to the OS
(M_TRIM_THRESHOLD 1 GiB, M_MMAP_THRESHOLD 32 MiB, the largest glibc allows), as jemalloc and tcmalloc
keep theirs. Otherwise a provider that allocates megabytes per call (the eager baselines) page-faults
them in again on every call, and on a VM each fault's cost depends on the host: the eager LayerNorm
at 512 x 768 took 2.5 ms per call with glibc's defaults and 0.25 ms without the faults (F.layer_norm:
0.12 ms either way); at 2048 x 768 it ranged over 1.5-22 ms within one process. The results record it.

Peak memory is the most memory allocated during one call beyond what was allocated before it:
- GPU: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the allocation
  before the call;
- CPU: torch's profiler with `profile_memory=True`, which reports every allocation and free of the
  CPU allocator during the call (C++ extensions included); the peak of the running sum is the answer.
  Frees of tensors allocated before the call are not reported, so the figure is the call's own peak.

`saved_for_backward` lists what autograd keeps between a forward and its backward (activation memory).
"""

import contextlib
import ctypes
import dataclasses
import itertools
import math
import os
import statistics
import sys
import time

import torch
import torch.utils.benchmark as torch_benchmark

DEFAULT_L2_BYTES = 50 * 2**20  # H100/H200; used when torch does not report the L2 size
# glibc mallopt parameters (malloc.h) and the values keep_freed_memory sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEPT_TOP_BYTES = 2**30  # freed memory at the top of the heap stays mapped up to this much
LARGEST_HEAP_ALLOCATION = (
    32 * 2**20
)  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit: larger blocks are mmapped
MAX_INPUT_COPIES = 64


@dataclasses.dataclass(frozen=True)
class TimingPlan:
    """How hard to time each case: runner.PLANS holds one per sweep (full, quick, tiny); the benchmark
    scripts build their own, leaving the fields they do not use at their defaults."""

    rounds: int  # interleaved rounds, each timing every provider once
    warmup_calls: int  # untimed calls before the first round (the first one is reported separately)
    warmup_s: float = (
        0.0  # ... and for at least this long on CPU: compiled code can stay slow for a while after
    )
    # its first call (inductor finishes compiling in background workers), for a time, not a number of calls
    # ... and on GPU, where a call takes milliseconds: 0.1 s is already ~100 calls of a 1 ms kernel. It is
    # paid once per provider and case (173 of them in benchmarks/gpu_check.sh's set, 17 s at 0.1 s)
    gpu_warmup_s: float = 0.0
    cpu_round_s: float = 0.2  # blocked_autorange min_run_time of one CPU round
    gpu_block_ms: float = 10.0  # target length of one GPU block of calls
    # Rounds of whole-model generate calls (gpt.py). CPU: many, because the speed of Python-bound calls
    # (transformers' generate at the quick sweep's small model) drifts on a timescale of seconds on a
    # shared machine: 45-66 ms in successive 4 s windows of one process on the 2-core development VM,
    # while fastgpt's calls hardly move, so the per-round ratios need many rounds (three quick sweeps:
    # fastgpt.nn vs transformers spread 3.1% with 16 rounds, 12.9% with 6). GPU: a call is a whole
    # decode loop (64 tokens at 16 sequences in the full sweep), and few rounds keep the case inside
    # benchmarks/gpu_check.sh's budget.
    cpu_generation_rounds: int = 0
    gpu_generation_rounds: int = 0
    # CPU calls timed per round when one call outlasts cpu_round_s: with a single call, five rounds gave
    # five samples, and baselines that allocate tens of MiB per call (F.cross_entropy on 50257-wide
    # logits, IQR ~30% of the median) moved the quick sweep's speedups by up to 25% run to run.
    calls_per_long_round: int = 2


def single_call_plan(rounds, warmup_calls=1):
    """A CPU plan of one call per provider and round, each timed alone (a zero-length round makes every
    call a long one)."""
    return TimingPlan(rounds=rounds, warmup_calls=warmup_calls, cpu_round_s=0.0, calls_per_long_round=1)


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    iqr_ms: float  # 75th minus 25th percentile of the per-call block times
    min_ms: float
    max_ms: float
    samples: int  # blocks pooled over all rounds
    round_ms: tuple = ()  # the median per-call time of each round, in round order
    round_cpu_ms: tuple = ()  # process CPU time per call of each round (all threads), when asked for


def summarize(per_call_seconds, rounds=(), round_cpu_seconds=()):
    """Timing from per-call times in seconds (one per block); `rounds` splits them by round;
    `round_cpu_seconds` is the process CPU time per call of each round."""
    ms = sorted(1e3 * t for t in per_call_seconds)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    round_ms = tuple(1e3 * statistics.median(times) for times in rounds)
    return Timing(
        median_ms=statistics.median(ms),
        iqr_ms=q3 - q1,
        min_ms=ms[0],
        max_ms=ms[-1],
        samples=len(ms),
        round_ms=round_ms,
        round_cpu_ms=tuple(1e3 * t for t in round_cpu_seconds),
    )


def keep_freed_memory():
    """Make glibc's malloc keep freed memory for reuse (module docstring, "CPU allocator"); returns a
    description for the results' metadata, or None where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    if not (mallopt(M_TRIM_THRESHOLD, KEPT_TOP_BYTES) and mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_ALLOCATION)):
        return None
    return (
        f"glibc malloc keeps freed memory: M_TRIM_THRESHOLD {KEPT_TOP_BYTES >> 20} MiB, "
        f"M_MMAP_THRESHOLD {LARGEST_HEAP_ALLOCATION >> 20} MiB"
    )


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def rotation_copies(set_bytes, device):
    """How many copies of a case's inputs to rotate through so that together they exceed L2 twice over.
    On CPU there is no rotation (1): its caches are small next to the inputs of any timed shape."""
    device = torch.device(device)
    if device.type != "cuda" or set_bytes <= 0:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES
    return max(1, min(MAX_INPUT_COPIES, math.ceil(2 * l2 / set_bytes)))


def rotating(fn, argument_sets):
    """A no-argument callable that calls fn(*args) with the next of argument_sets each time."""
    if len(argument_sets) == 1:
        (only,) = argument_sets
        return lambda: fn(*only)
    cycle = itertools.cycle(argument_sets)
    return lambda: fn(*next(cycle))


def timed_first_call(fn, device):
    """Run fn once (compilation and autotuning happen here); returns (seconds, its result)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def _single_calls(fn, calls):
    """Per-call times of calls each timed alone (Timer.timeit(1) would run two more, untimed, first)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _cpu_round(fn, plan, call_s):
    """Per-call times of one CPU round: blocked_autorange, or, for a call longer than the round,
    plan.calls_per_long_round single calls (blocked_autorange would spend a call estimating the block size)."""
    if call_s >= plan.cpu_round_s:
        return _single_calls(fn, plan.calls_per_long_round)
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return list(timer.blocked_autorange(min_run_time=plan.cpu_round_s).times)


def _gpu_block(fn, calls):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def _counting(fn):
    """(a callable that calls fn and counts, a function returning the count so far)."""
    count = 0

    def counted():
        nonlocal count
        count += 1
        return fn()

    return counted, lambda: count


def _warm_up(fn, device, plan):
    """Untimed calls (module docstring); returns the last one's duration in seconds."""
    warmup_s = plan.gpu_warmup_s if device.type == "cuda" else plan.warmup_s
    start, calls, call_s = time.perf_counter(), 0, 0.0
    while calls < plan.warmup_calls or time.perf_counter() - start < warmup_s:
        call_start = time.perf_counter()
        fn()
        synchronize(device)
        call_s = time.perf_counter() - call_start
        calls += 1
    return call_s


def measure_interleaved(callables, device, plan, *, cpu_time=False):
    """{name: Timing} for no-argument callables, timed in interleaved rounds after warm-up. With
    cpu_time, each Timing's round_cpu_ms holds the process CPU time per call of each round (the calls
    are then counted through a wrapper, about 0.1 us each, so leave it off for calls of a few us)."""
    device = torch.device(device)
    names = list(callables)
    call_s = {name: _warm_up(callables[name], device, plan) for name in names}
    block_calls = {}
    if device.type == "cuda":
        for name in names:
            one_call = _gpu_block(callables[name], 1)
            block_calls[name] = max(1, min(10_000, math.ceil(plan.gpu_block_ms / 1e3 / max(one_call, 1e-7))))

    def one_round(name, fn):
        if device.type == "cuda":
            return [_gpu_block(fn, block_calls[name])]
        return _cpu_round(fn, plan, call_s[name])

    rounds = {name: [] for name in names}
    cpu_per_call = {name: [] for name in names}
    for round_index in range(plan.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if not cpu_time:
                rounds[name].append(one_round(name, callables[name]))
                continue
            counted, calls_made = _counting(callables[name])
            cpu_start = time.process_time()
            rounds[name].append(one_round(name, counted))
            cpu_per_call[name].append((time.process_time() - cpu_start) / calls_made())
    return {
        name: summarize([t for times in rounds[name] for t in times], rounds[name], cpu_per_call[name])
        for name in names
    }


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's native log lines (written to fd 2 by Kineto) while it runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _cpu_peak_bytes(fn):
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [event for event in prof.profiler.kineto_results.events() if event.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def peak_memory_bytes(fn, device):
    """The most memory allocated during one call of fn beyond what was allocated before it (its result
    included, as it is alive when fn returns)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak
    return _cpu_peak_bytes(fn)


def saved_for_backward(fn, parameters):
    """The tensors autograd keeps for the backward while fn() runs, the storages of `parameters` left
    out: a list of (shape, bytes), one per storage (a storage kept by several saves counts once)."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
    storages = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[storage.data_ptr()] = (tuple(tensor.shape), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        fn()
    return list(storages.values())


def gpu_kernel_names(fn, device):
    """The names of the GPU kernels one call of fn launches, sorted and without repeats, from
    torch.profiler: which kernel a library that chooses its own (SDPA) actually ran."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        fn()
        torch.cuda.synchronize(device)
    return sorted(
        {event.name for event in trace.events() if event.device_type == torch.autograd.DeviceType.CUDA}
    )


# ----------------------------------------------------------------------------------------------
# The device's measured peaks, the denominators of "% of peak"

GPU_MATMUL_SIZE = 8192  # 1.1 TFLOP per call: long enough to reach the tensor cores' steady state
CPU_MATMUL_SIZE = 2048  # 17 GFLOP per call: ~0.1 s on a few cores, well past any cache
GPU_COPY_BYTES = 2**30  # 1 GiB each way, far beyond L2
CPU_COPY_BYTES = 2**27  # 128 MiB each way, beyond any last-level cache


def measure_matmul_tflops(device, dtype, plan):
    device = torch.device(device)
    size = GPU_MATMUL_SIZE if device.type == "cuda" else CPU_MATMUL_SIZE
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timing = measure_interleaved({"matmul": lambda: torch.mm(a, b)}, device, plan)["matmul"]
    return 2 * size**3 / (timing.median_ms * 1e-3) / 1e12


def measure_copy_gbps(device, plan):
    """Device-memory copy bandwidth, counting the bytes read and the bytes written."""
    device = torch.device(device)
    nbytes = GPU_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES
    source = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    target = torch.empty_like(source)
    timing = measure_interleaved({"copy": lambda: target.copy_(source)}, device, plan)["copy"]
    return 2 * nbytes / (timing.median_ms * 1e-3) / 1e9
