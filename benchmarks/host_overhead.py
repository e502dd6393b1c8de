"""Where the time of one call goes: the GPU's kernels, or the host (Python, dispatch, kernel launches).

    PYTHONPATH=. python benchmarks/host_overhead.py [--device cuda] [--dtype bf16] [--out DIR] [--tiny]
    bash benchmarks/gpu_check.sh profile      # the same on a GPU, after the build

Every op at its first GPU benchmark shape (fastgpt bench's, so the numbers sit next to the committed
results), in each mode, for fastgpt's backends and the fused torch baseline (F.layer_norm, sdpa, the
torch FFN, F.cross_entropy), and the GPT-2 training step and generation (fastgpt.nn against nanoGPT and
transformers). For each:
- wall: the median time of one call, synchronised, after warm-up;
- device: the kernels' time per call, summed over torch.profiler's CUDA events, and the kernel launches
  per call; busy = device / wall. Well below 100% means the GPU waits between kernels: the call is
  bound by the host, and a faster kernel cannot make it faster;
- on GPU, the kernels with the most device time (for the training step: whose kernels fill its time);
- for fastgpt's providers, the Python functions with the most host time per call (cProfile's own time;
  cProfile slows Python down, so these rank the overhead rather than time it).

The H200's LayerNorm times raised the question (benchmarks/results/2026-11-30-h200.json): the Triton
forward is flat at 0.11-0.145 ms and forward+backward at 1.0-1.14 ms from 768 to 4096 columns, so
something other than memory traffic sets them. Writes DIR/host_overhead.json and DIR/host_overhead.md.
On CPU there is no device time; the host profile still runs (the tests run --tiny on CPU).
"""

import argparse
import cProfile
import json
import os
import pstats
import statistics
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fastgpt.bench import runner
from fastgpt.bench.command import DEFAULT_DTYPE, DTYPES
from fastgpt.bench.records import device_name, dtype_name
from fastgpt.bench.report import markdown_table, shape_label
from fastgpt.bench.timing import synchronize

OP_ORDER = ("layer_norm", "attention", "ffn", "cross_entropy", "gpt")
BASELINES = {
    "layer_norm": ("F.layer_norm",),
    "attention": ("sdpa",),
    "ffn": ("torch",),
    "cross_entropy": ("F.cross_entropy",),
    "gpt": ("nanogpt", "hf (sdpa)"),
}
# Calls per measurement: as many as fit in about a second, between these bounds (a GPT-2 generate call
# takes 0.25-0.45 s on the H200, a LayerNorm 0.1 ms).
MIN_CALLS, MAX_CALLS, SECONDS_PER_MEASUREMENT = 3, 200, 1.0
TOP = 8  # rows of each hotspot table
REPO_ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = ("wall_ms", "device_ms", "busy", "skipped", "error")  # printed as each record is done


def cases(op, device_type, tiny):
    """(bench, shape, mode): the op's first shape in each mode; for gpt, its training and generation cases."""
    bench = runner.OPS[op]
    shapes = bench.shapes(device_type, "tiny" if tiny else "full")
    if op == "gpt":
        return [(bench, shape, shape["mode"]) for shape in shapes]
    return [(bench, shapes[0], mode) for mode in bench.modes]


def providers(op, bench, shape, dtype, device):
    """fastgpt's providers of the op, then its fused baselines."""
    names = bench.provider_names(shape, dtype, device)
    return [name for name in names if name.startswith("fastgpt")] + [b for b in BASELINES[op] if b in names]


def median_wall_ms(call, calls):
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def device_profile(call, calls, device):
    """(device ms per call, kernel launches per call, the top kernels) from torch.profiler."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(calls):
            call()
        synchronize(device)
    kernels = [event for event in profiler.key_averages() if event.device_type == DeviceType.CUDA]
    device_us = sum(event.device_time_total for event in kernels)
    launches = sum(event.count for event in kernels)
    top = sorted(kernels, key=lambda event: event.device_time_total, reverse=True)[:TOP]
    return device_us / 1e3 / calls, launches / calls, [
        {"kernel": event.key[:90], "us_per_call": event.device_time_total / calls, "launches_per_call": event.count / calls}
        for event in top
    ]


def python_hotspots(call, calls):
    """The functions with the most own time per call under cProfile."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    # {(file, line, function): (primitive calls, calls, own seconds, cumulative seconds, callers)}; its
    # get_stats_profile() would round the seconds to milliseconds
    functions = pstats.Stats(profiler).stats
    top = sorted(functions.items(), key=lambda item: item[1][2], reverse=True)[:TOP]
    return [
        {
            "function": f"{short_path(file_name)}:{line}({name})",
            "calls_per_call": total_calls / calls,
            "own_us_per_call": 1e6 * own_seconds / calls,
        }
        for (file_name, line, name), (_, total_calls, own_seconds, _, _) in top
    ]


def short_path(file_name):
    """A source path from the library or checkout root on: '.../site-packages/torch/_ops.py' ->
    'torch/_ops.py', '<checkout>/fastgpt/dispatch.py' -> 'fastgpt/dispatch.py'."""
    for marker in ("site-packages/", "dist-packages/", f"{REPO_ROOT}{os.sep}"):
        if marker in file_name:
            return file_name.split(marker, 1)[1]
    return os.path.basename(file_name)


def measure(bench, shape, mode, provider, dtype, device):
    """One record: the provider at one shape and mode, or the reason it did not run."""
    record = {"op": bench.name, "mode": mode, "shape": shape, "provider": provider}
    try:
        call, reason = bench.benchmark_call(shape, dtype, device, provider, mode)
        if call is None:
            return {**record, "skipped": reason}
        first_start = time.perf_counter()
        call()  # compilation and autotuning
        record["first_call_s"] = time.perf_counter() - first_start
        warm_s = median_wall_ms(call, 2) / 1e3
        calls = max(MIN_CALLS, min(MAX_CALLS, int(SECONDS_PER_MEASUREMENT / max(warm_s, 1e-6))))
        record["calls"] = calls
        record["wall_ms"] = median_wall_ms(call, calls)
        record["device_ms"] = record["launches_per_call"] = record["busy"] = None
        if device.type == "cuda":
            device_ms, launches, kernels = device_profile(call, calls, device)
            record.update(device_ms=device_ms, launches_per_call=launches, busy=device_ms / record["wall_ms"],
                          kernels=kernels)
        if provider.startswith("fastgpt"):
            record["python_hotspots"] = python_hotspots(call, calls)
    except Exception as error:  # noqa: BLE001 - keep what was measured, report it, go on with the others
        record["error"] = f"{type(error).__name__}: {error}"[:500]
    return record


def _number(value, template):
    return template.format(value) if value is not None else "-"


def markdown(records, metadata):
    rows = [
        [r["op"], r["mode"], shape_label(r["op"], r["shape"]), r["provider"], _number(r.get("wall_ms"), "{:.3f}"),
         _number(r.get("device_ms"), "{:.3f}"), _number(r.get("busy"), "{:.0%}"),
         _number(r.get("launches_per_call"), "{:.0f}"), r.get("skipped") or (f"error: {r['error']}" if "error" in r else "")]
        for r in records
    ]
    lines = [
        f"# Host overhead: {metadata['device']}, {metadata['dtype']}, {metadata['date']}",
        "",
        "wall: median synchronised call; device: kernel time per call (torch.profiler); busy = device / wall.",
        "",
        markdown_table(["op", "mode", "shape", "provider", "wall ms", "device ms", "busy", "launches/call", "note"], rows),
    ]
    for r in records:
        if "python_hotspots" not in r and not r.get("kernels"):
            continue
        lines += ["", f"## {r['op']} {r['mode']}, {r['provider']}"]
        if "python_hotspots" in r:
            lines += ["", markdown_table(
                ["Python function (cProfile own time)", "calls per call", "us per call"],
                [[f"`{h['function']}`", f"{h['calls_per_call']:g}", f"{h['own_us_per_call']:.1f}"]
                 for h in r["python_hotspots"]])]
        if r.get("kernels"):
            lines += ["", markdown_table(
                ["kernel", "launches per call", "us per call"],
                [[f"`{k['kernel']}`", f"{k['launches_per_call']:g}", f"{k['us_per_call']:.1f}"] for k in r["kernels"]])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--ops", default=",".join(OP_ORDER), help=f"comma-separated, from {', '.join(OP_ORDER)}")
    parser.add_argument("--tiny", action="store_true", help="the benchmarks' tiny shapes (seconds, for tests)")
    parser.add_argument("--out", default="host-overhead", help="folder for host_overhead.json and .md")
    args = parser.parse_args(argv)
    device_type = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_type)
    ops = args.ops.split(",")
    unknown = sorted(set(ops) - set(OP_ORDER))
    if unknown:
        parser.error(f"--ops: expected names from {', '.join(OP_ORDER)}, got {', '.join(unknown)}")
    dtype = DTYPES[args.dtype or DEFAULT_DTYPE[device_type]]
    records = []
    for op in ops:
        for bench, shape, mode in cases(op, device_type, args.tiny):
            for provider in providers(op, bench, shape, dtype, device):
                records.append(measure(bench, shape, mode, provider, dtype, device))
                r = records[-1]
                print(f"{op} {mode} {provider}: {json.dumps({k: r.get(k) for k in SUMMARY_KEYS if k in r})}", flush=True)
    metadata = {"device": device_name(device), "dtype": dtype_name(dtype), "date": time.strftime("%Y-%m-%d"),
                "torch": torch.__version__, "tiny": args.tiny}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_overhead.json").write_text(json.dumps({"metadata": metadata, "records": records}, indent=1))
    (out / "host_overhead.md").write_text(markdown(records, metadata))
    print(f"wrote {out / 'host_overhead.json'} and {out / 'host_overhead.md'}")


if __name__ == "__main__":
    main()
