"""The sweep: every (op, shape, dtype) case of the chosen ops, run in turn, written after each case."""

import contextlib
import os

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fastgpt.bench.attention import AttentionBench
from fastgpt.bench.cross_entropy import CrossEntropyBench
from fastgpt.bench.ffn import FFNBench
from fastgpt.bench.gpt import GPTBench
from fastgpt.bench.layer_norm import LayerNormBench
from fastgpt.bench.records import (
    Results,
    appended_metadata,
    device_name,
    dtype_name,
    finish_metadata,
    load_average,
    load_results,
    run_metadata,
)
from fastgpt.bench.timing import TimingPlan, keep_freed_memory, measure_copy_gbps, measure_matmul_tflops

OPS = {
    bench.name: bench
    for bench in (AttentionBench(), FFNBench(), LayerNormBench(), CrossEntropyBench(), GPTBench())
}

# quick: under 3 minutes on a 2-core CPU; tiny: seconds (tests and gpu_check.sh --dry-run)
PLANS = {
    "full": TimingPlan(
        rounds=7,
        warmup_calls=3,
        warmup_s=1.0,
        gpu_warmup_s=0.1,
        cpu_round_s=0.2,
        gpu_block_ms=10.0,
        cpu_generation_rounds=16,
        gpu_generation_rounds=3,
    ),
    "quick": TimingPlan(
        rounds=5,
        warmup_calls=2,
        warmup_s=0.3,
        gpu_warmup_s=0.1,
        cpu_round_s=0.05,
        gpu_block_ms=5.0,
        cpu_generation_rounds=16,
        gpu_generation_rounds=2,
    ),
    "tiny": TimingPlan(
        rounds=2,
        warmup_calls=1,
        warmup_s=0.0,
        gpu_warmup_s=0.0,
        cpu_round_s=0.005,
        gpu_block_ms=1.0,
        cpu_generation_rounds=2,
        gpu_generation_rounds=1,
    ),
}
PEAK_PLAN = TimingPlan(
    rounds=3,
    warmup_calls=1,
    warmup_s=0.0,
    gpu_warmup_s=0.0,
    cpu_round_s=0.2,
    gpu_block_ms=20.0,
    cpu_generation_rounds=0,
    gpu_generation_rounds=0,
)
TINY_PEAK_PLAN = TimingPlan(
    rounds=1,
    warmup_calls=1,
    warmup_s=0.0,
    gpu_warmup_s=0.0,
    cpu_round_s=0.01,
    gpu_block_ms=1.0,
    cpu_generation_rounds=0,
    gpu_generation_rounds=0,
)


def measure_peaks(device, dtypes, sweep):
    """The denominators of % of peak, measured once per run: a large matmul and a device-memory copy.
    GPU: the matmul in each dtype of the run, and always in bf16. CPU: in float32 only, the peak for
    every dtype (half-precision matmul on most CPUs is converted in software and would take minutes)."""
    plan = TINY_PEAK_PLAN if sweep == "tiny" else PEAK_PLAN
    device = torch.device(device)
    if device.type == "cuda":
        wanted = list(dict.fromkeys([*dtypes, torch.bfloat16]))
    else:
        wanted = [torch.float32]
    return {
        "device": device_name(device),
        "matmul_tflops": {dtype_name(d): measure_matmul_tflops(device, d, plan) for d in wanted},
        "copy_gbps": measure_copy_gbps(device, plan),
    }


def cases(ops, device, dtypes, sweep):
    """[(bench, shape, dtype)] in the order they run."""
    device_type = torch.device(device).type
    return [
        (OPS[op], shape, dtype)
        for op in ops
        for dtype in dtypes
        for shape in OPS[op].shapes(device_type, sweep)
    ]


def run(
    ops,
    device,
    dtypes,
    sweep,
    results_path,
    *,
    include=None,
    exclude=None,
    append=False,
    command=None,
    show_progress=True,
):
    """Run the sweep and return its Results (also written to results_path after every case)."""
    device = torch.device(device)
    todo = cases(ops, device, dtypes, sweep)
    load = load_average()
    if device.type == "cpu" and torch.get_num_threads() > 1 and load and load > 0.5 * (os.cpu_count() or 1):
        print(
            f"fastgpt bench: the load average is {load:.1f} on {os.cpu_count()} CPUs; CPU timings taken while "
            "other processes compete for the cores are noisy (try an idle machine, or --threads 1)"
        )
    plan = PLANS[sweep]
    cpu_allocator = keep_freed_memory() if device.type == "cpu" else None  # before any timing, peaks included
    peaks = measure_peaks(device, dtypes, sweep)
    metadata = run_metadata(device, command, sweep, plan, peaks, cpu_allocator)
    if append and results_path is not None and results_path.exists():
        previous = load_results(results_path)
        results = Results(
            results_path,
            appended_metadata(previous["metadata"], metadata),
            previous["records"],
            previous["skipped"],
        )
    else:
        results = Results(results_path, metadata)
    results.write()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not show_progress,
    )
    with progress if show_progress else contextlib.nullcontext():
        task = progress.add_task("bench", total=len(todo))
        for bench, shape, dtype in todo:
            label = " ".join(f"{k}={v}" for k, v in shape.items())
            progress.update(task, description=f"{bench.name} {dtype_name(dtype)} {label}")
            records, skipped = bench.run_case(shape, dtype, device, plan, peaks, include, exclude)
            results.add(records, skipped)
            progress.advance(task)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finish_metadata(results.metadata)
    results.write()
    return results
