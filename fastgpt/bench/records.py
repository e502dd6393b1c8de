"""Result records, run metadata, speedups, and the results.json file.

results.json holds
- "metadata": date, git sha, device, versions, the measured peaks, the command line, how it was timed;
- "records": one per (op, shape, dtype, mode, provider) measured, with the fields of RECORD_FIELDS;
- "skipped": one per provider that was not timed at a shape, with the reason.

The file is rewritten (atomically) after every case, so a run that is stopped part-way, as a GPU run
under a time budget may be, still leaves every finished measurement on disk.
"""

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path

import torch

from fastgpt.info import package_versions

SCHEMA_VERSION = 1

# name -> the types its value may have. `tflops`, `gbps` and `tokens_per_s` are None where they do not
# apply (GB/s of attention, TFLOP/s of LayerNorm); `metric` names the headline one.
RECORD_FIELDS = {
    "op": (str,),
    "shape": (dict,),
    "dtype": (str,),
    "device": (str,),
    "provider": (str,),
    "kind": (str,),  # "fastgpt" or "baseline"
    "mode": (str,),  # "fwd" / "fwd+bwd" for kernels; "train" / "generate" for the gpt op
    "median_ms": (float,),
    "iqr_ms": (float,),
    "min_ms": (float,),
    "max_ms": (float,),
    "samples": (int,),
    "round_ms": (list,),  # median per-call time of each interleaved round
    "first_call_s": (float,),  # the first call, with compilation and autotuning
    "input_copies": (int,),  # input sets rotated through to exceed L2
    "metric": (str,),  # "tflops", "gbps" or "tokens_per_s"
    "tflops": (float, type(None)),
    "gbps": (float, type(None)),
    "tokens_per_s": (float, type(None)),
    "pct_of_peak": (float, type(None)),  # of the measured matmul peak (tflops) or copy bandwidth (gbps)
    "err_vs_reference": (float, type(None)),  # max abs error against float64, over outputs and gradients
    "err_detail": (dict,),  # that error per output and gradient
    "err_note": (str,),  # where the error was measured: the full shape, or which part of it
    "peak_mem_bytes": (int,),
    "speedup": (dict,),  # {baseline provider: speedup(baseline, this)}, same run and case
}
BASELINE = "baseline"
FASTGPT = "fastgpt"


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{model} ({threads} thread{'s' if threads > 1 else ''})"


def gpu_model(name):
    """The GPU's model from its CUDA device name, lower-case, for results file names: "NVIDIA H100 80GB
    HBM3" -> "h100", "NVIDIA H200" -> "h200", "NVIDIA A100-SXM4-80GB" -> "a100" (the first word of
    letters then digits); the name's last word where none is."""
    for word in re.split(r"[\s-]+", name):
        if re.fullmatch(r"[A-Za-z]+\d+[A-Za-z]*", word):
            return word.lower()
    return name.split()[-1].lower() if name.split() else "gpu"


def git_sha():
    """The checkout's commit (suffixed '-dirty' with uncommitted changes), or None outside a git checkout.
    FASTGPT_GIT_SHA overrides it, for a copy of the tree whose .git is absent or stale (a container, or a
    GPU machine that receives the working tree)."""
    if os.environ.get("FASTGPT_GIT_SHA"):
        return os.environ["FASTGPT_GIT_SHA"]
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def load_average():
    """The 1-minute load average, or None where the OS does not report it."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def finish_metadata(metadata):
    metadata["load_average"]["end"] = load_average()


def run_metadata(device, command, plan_name, timing_plan, peaks, cpu_allocator=None):
    device = torch.device(device)
    return {
        "schema": SCHEMA_VERSION,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "device": device_name(device),
        "device_type": device.type,
        "versions": package_versions(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        # other processes competing for the CPU: timings taken with load near or above the CPU count are
        # unreliable on CPU (a descheduled thread stalls every parallel region), less so on GPU
        "load_average": {"start": load_average(), "end": None},
        "command": command,
        "sweep": plan_name,
        "timing": {
            "method": "CUDA events over blocks of calls, inputs rotated beyond L2"
            if device.type == "cuda"
            else "torch.utils.benchmark.Timer.blocked_autorange",
            "interleaved_rounds": timing_plan.rounds,
            "warmup_calls": timing_plan.warmup_calls,
            "statistic": "median per-call time over all blocks; spread = IQR; speedup = median over the rounds "
            "of the per-round ratio of medians",
            "cpu_allocator": cpu_allocator,  # timing.keep_freed_memory's setting, or None (glibc's defaults)
        },
        "peaks": peaks,
    }


def matmul_peak(peaks, dtype):
    """The measured matmul TFLOP/s for a dtype; on CPU only float32 is measured and serves every dtype."""
    table = peaks["matmul_tflops"]
    return table.get(dtype_name(dtype), table.get("float32"))


def case_key(record):
    shape = json.dumps(record["shape"], sort_keys=True)
    return (record["op"], shape, record["dtype"], record["device"], record["mode"])


def speedup(baseline, record):
    """How many times faster record ran than baseline (same case): the median over the interleaved
    rounds of the baseline's median / the record's median in that round, so that each ratio compares
    calls made moments apart, and a round that a burst of outside load hit moves the result no more
    than any other round; the ratio of the overall medians where the rounds are not both recorded."""
    rounds = list(zip(baseline.get("round_ms") or (), record.get("round_ms") or ()))
    if not rounds or len(rounds) != len(record["round_ms"]) or len(rounds) != len(baseline["round_ms"]):
        return baseline["median_ms"] / record["median_ms"]
    return statistics.median(base / this for base, this in rounds)


def add_speedups(records):
    """Set each record's `speedup`: {baseline provider: speedup(baseline, record)} for every baseline
    timed in the same case (same op, shape, dtype, device and mode, hence the same run)."""
    baselines = {}
    for record in records:
        if record["kind"] == BASELINE:
            baselines.setdefault(case_key(record), {})[record["provider"]] = record
    for record in records:
        same_case = baselines.get(case_key(record), {})
        record["speedup"] = {name: speedup(baseline, record) for name, baseline in same_case.items()}
    return records


def check_record(record):
    """Raise ValueError (missing) or TypeError (mistyped) naming the first bad field."""
    for name, types in RECORD_FIELDS.items():
        if name not in record:
            raise ValueError(f"record is missing field {name!r}: {record}")
        value = record[name]
        if not isinstance(value, types) or isinstance(value, bool):
            raise TypeError(
                f"record field {name!r} must be {' or '.join(t.__name__ for t in types)}, got {value!r}"
            )


class Results:
    """The records of one run, written to `path` after every case."""

    def __init__(self, path, metadata, records=(), skipped=()):
        self.path = Path(path) if path else None
        self.metadata = metadata
        self.records = list(records)
        self.skipped = list(skipped)

    def add(self, records, skipped):
        for record in records:
            check_record({**record, "speedup": {}})
        self.records.extend(records)
        self.skipped.extend(skipped)
        add_speedups(self.records)
        self.write()

    def as_dict(self):
        return {"metadata": self.metadata, "records": self.records, "skipped": self.skipped}

    def write(self):
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.as_dict(), indent=1) + "\n")
        os.replace(partial, self.path)


def load_results(path):
    data = json.loads(Path(path).read_text())
    if data.get("metadata", {}).get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{path}: not a fastgpt bench results file of schema {SCHEMA_VERSION}")
    add_speedups(data["records"])
    return data


def run_summary(metadata):
    return {key: metadata.get(key) for key in ("date", "git_sha", "command", "sweep", "peaks")}


def appended_metadata(previous, metadata):
    """Metadata for a run appended to an earlier results file: the new run's, plus a list of every
    run's date, sha, command and peaks, so the file says how each of its records was produced."""
    merged = dict(metadata)
    merged["runs"] = previous.get("runs", [run_summary(previous)]) + [run_summary(metadata)]
    return merged
