"""The benchmark runner (fastgpt/bench) on CPU: FLOP and byte counts, timing and memory measurement,
the record schema, speedups, a tiny `fastgpt bench` run with its results file, report and plots, and
the README render."""

import ctypes
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastgpt import cli
from fastgpt.bench import flops, records, report, timing
from fastgpt.bench.command import OP_NAMES
from fastgpt.bench.runner import OPS

REPO_ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------
# FLOP and byte counts, against numbers worked out by hand in the comments


def test_attention_flops_follow_the_causal_convention():
    # 4 * B * H * N * N * D / 2 = 4 * 2 * 3 * 4 * 4 * 5 / 2
    assert flops.attention_flops(2, 3, 4, 4, 5, "fwd") == 960
    # backward is 2.5x the forward: 960 * 3.5
    assert flops.attention_flops(2, 3, 4, 4, 5, "fwd+bwd") == 3360
    # GPT-2 small at 1k: 4 * 1 * 12 * 1024^2 * 64 / 2
    assert flops.attention_flops(1, 12, 1024, 1024, 64) == 1_610_612_736


def test_attention_flops_with_a_kv_cache():
    # q_len 2 at the end of kv_len 6: rectangle 2*6 minus the masked triangle 2*2/2 = 10 pairs
    assert flops.causal_pairs(2, 6) == 10
    # the exact count (query 0 sees 5 keys, query 1 sees 6) differs by q_len / 2
    exact = sum(min(i + 6 - 2 + 1, 6) for i in range(2))
    assert exact == 11
    assert flops.attention_flops(1, 1, 2, 6, 8) == 4 * 8 * 10
    # q_len == kv_len gives back the N*N/2 convention
    assert flops.causal_pairs(4, 4) == 8


def test_gemm_ffn_and_cross_entropy_flops():
    assert flops.gemm_flops(2, 3, 4) == 48
    # fc 2*10*16*4 + proj 2*10*4*16 = 2560; backward 2x
    assert flops.ffn_flops(10, 4, 16, mode="fwd") == 2560
    assert flops.ffn_flops(10, 4, 16, mode="fwd+bwd") == 7680
    # logits 2*3*5*4 = 120; backward 2x
    assert flops.linear_cross_entropy_flops(3, 4, 5, "fwd") == 120
    assert flops.linear_cross_entropy_flops(3, 4, 5, "fwd+bwd") == 360


def test_gpt_training_flops():
    # matmul params 12*1*2*2 + 3*2 = 54; dense 6 * 54 * 2 tokens = 648;
    # attention forward 4*1*1*2 (D) * 2 (pairs of T=2) = 16, fwd+bwd 3.5x = 56
    assert flops.gpt_matmul_params(1, 2, 3) == 54
    assert flops.gpt_train_flops(1, 2, 1, 1, 2, 3) == 704


def test_memory_bound_bytes():
    # tokens 10 x C 4 in 2-byte elements: one stream is 80 bytes, weight/bias 8 bytes each
    assert flops.layer_norm_bytes(10, 4, 2, residual=False, mode="fwd") == 2 * 80 + 16
    assert flops.layer_norm_bytes(10, 4, 2, residual=False, mode="fwd+bwd") == 176 + 3 * 80 + 24
    assert flops.layer_norm_bytes(10, 4, 2, residual=True, mode="fwd") == 4 * 80 + 16
    assert flops.layer_norm_bytes(10, 4, 2, residual=True, mode="fwd+bwd") == 336 + 4 * 80 + 24
    # x 24 + W 40 + int64 targets 24 + float32 loss 4; backward writes dx 24 and dW 40
    assert flops.linear_cross_entropy_bytes(3, 4, 5, 2, "fwd") == 92
    assert flops.linear_cross_entropy_bytes(3, 4, 5, 2, "fwd+bwd") == 156


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="mode must be one of"):
        flops.attention_flops(1, 1, 1, 1, 1, "bwd")


# ----------------------------------------------------------------------------------------------
# Timing and memory


def test_summarize_median_and_iqr():
    result = timing.summarize([0.005, 0.001, 0.004, 0.002, 0.003])
    assert result.median_ms == pytest.approx(3.0)
    assert result.iqr_ms == pytest.approx(2.0)  # quartiles 2 and 4
    assert (result.min_ms, result.max_ms, result.samples) == (pytest.approx(1.0), pytest.approx(5.0), 5)


def test_interleaved_timing_ranks_callables():
    calls = []

    def short():
        calls.append("short")
        time.sleep(0.002)

    def long():
        calls.append("long")
        time.sleep(0.006)

    plan = timing.TimingPlan(
        rounds=3,
        warmup_calls=1,
        warmup_s=0.0,
        gpu_warmup_s=0.0,
        cpu_round_s=0.02,
        gpu_block_ms=1.0,
        cpu_generation_rounds=0,
        gpu_generation_rounds=0,
    )
    result = timing.measure_interleaved({"short": short, "long": long}, "cpu", plan)
    assert 1.8 < result["long"].median_ms / result["short"].median_ms < 3.5
    # interleaved: the order of the providers rotates between rounds, so neither always runs first
    firsts = [name for index, name in enumerate(calls) if index == 0 or calls[index - 1] != name]
    assert firsts.count("short") >= 2 and firsts.count("long") >= 2


def test_single_call_rounds_time_each_call_and_its_cpu_time():
    calls = {"sleep": 0, "spin": 0}

    def sleep():
        calls["sleep"] += 1
        time.sleep(0.003)

    def spin():
        calls["spin"] += 1
        end = time.perf_counter() + 0.003
        while time.perf_counter() < end:
            pass

    plan = timing.single_call_plan(rounds=3)
    result = timing.measure_interleaved({"sleep": sleep, "spin": spin}, "cpu", plan, cpu_time=True)
    assert calls == {"sleep": 4, "spin": 4}  # one warm-up call and one call per round, none untimed besides
    for timed in result.values():
        assert timed.samples == 3 and len(timed.round_ms) == len(timed.round_cpu_ms) == 3
        assert timed.median_ms >= 3.0
    # process CPU time: a sleeping call uses next to none, a spinning one about its wall time
    assert (
        statistics.median(result["sleep"].round_cpu_ms) < 1.0 < statistics.median(result["spin"].round_cpu_ms)
    )


def test_cpu_peak_memory_counts_the_call_only():
    existing = torch.ones(2**20)  # allocated before the call, freed during it: not counted

    def work():
        nonlocal existing
        kept = torch.ones(2**20)  # 4 MiB, returned
        temporary = torch.ones(2**21)  # 8 MiB, freed before returning
        del temporary
        existing = None
        return kept

    peak = timing.peak_memory_bytes(work, "cpu")
    assert 12 * 2**20 <= peak < 12 * 2**20 + 2**16


def test_no_rotation_on_cpu():
    assert timing.rotation_copies(10, "cpu") == 1


# ----------------------------------------------------------------------------------------------
# Records and speedups


def _record(provider, kind, median_ms, dtype="float32"):
    return {
        "op": "attention",
        "shape": {"seq": 128},
        "dtype": dtype,
        "device": "cpu",
        "mode": "fwd",
        "provider": provider,
        "kind": kind,
        "median_ms": median_ms,
    }


def test_speedups_are_taken_within_one_case():
    rows = [
        _record("eager", records.BASELINE, 2.0),
        _record("sdpa", records.BASELINE, 4.0),
        _record("fastgpt:cpu", records.FASTGPT, 1.0),
        _record("eager", records.BASELINE, 10.0, dtype="float16"),  # another case: never compared
    ]
    records.add_speedups(rows)
    assert rows[2]["speedup"] == {"eager": pytest.approx(2.0), "sdpa": pytest.approx(4.0)}
    assert rows[0]["speedup"]["sdpa"] == pytest.approx(2.0)
    assert rows[3]["speedup"] == {"eager": pytest.approx(1.0)}
    summary = report.summary_rows({"records": rows, "skipped": []})
    assert summary == [
        (
            "attention",
            "float32",
            "fwd",
            "fastgpt:cpu",
            {"eager": (pytest.approx(2.0), 2.0, 2.0), "sdpa": (pytest.approx(4.0), 4.0, 4.0)},
        )
    ]


def test_speedup_is_the_median_of_per_round_ratios():
    baseline = {**_record("eager", records.BASELINE, 3.0), "round_ms": [2.0, 8.0, 3.0, 40.0]}
    fast = {**_record("fastgpt:cpu", records.FASTGPT, 1.0), "round_ms": [1.0, 1.0, 1.0, 1.0]}
    # per round 2x, 8x, 3x and a 40x spike: 5.5x, where the ratio of the overall medians would say 3x
    assert records.speedup(baseline, fast) == pytest.approx(5.5)
    # without matching rounds (older results files, or a record missing them): the medians' ratio
    assert records.speedup(_record("eager", records.BASELINE, 3.0), fast) == pytest.approx(3.0)
    assert records.speedup({**baseline, "round_ms": [2.0]}, fast) == pytest.approx(3.0)


def test_geometric_mean():
    assert report.geometric_mean([1.0, 4.0]) == pytest.approx(2.0)


def test_check_record_names_the_bad_field():
    with pytest.raises(ValueError, match="missing field 'op'"):
        records.check_record({})


def test_every_op_is_on_the_command_line():
    assert tuple(OPS) == OP_NAMES


# ----------------------------------------------------------------------------------------------
# A tiny run end to end: `fastgpt bench --tiny` on CPU


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "bench",
        "--tiny",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--ops",
        "attention,layer_norm,cross_entropy,gpt",
        "--skip-providers",
        "nanogpt*,hf+fastgpt.patch",
    ]
    assert cli.main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def test_tiny_run_writes_every_op_and_mode(tiny_run):
    _, data = tiny_run
    measured = {(r["op"], r["mode"]) for r in data["records"]}
    assert measured == {
        ("attention", "fwd"),
        ("attention", "fwd+bwd"),
        ("layer_norm", "fwd"),
        ("layer_norm", "fwd+bwd"),
        ("cross_entropy", "fwd"),
        ("cross_entropy", "fwd+bwd"),
        ("gpt", "train"),
        ("gpt", "generate"),
    }
    providers = {r["provider"] for r in data["records"]}
    assert {"eager", "torch.compile", "sdpa", "F.layer_norm", "F.cross_entropy", "hf (sdpa)"} <= providers
    assert not any(p.startswith("nanogpt") for p in providers)  # --skip-providers


def test_tiny_run_record_schema(tiny_run):
    _, data = tiny_run
    for record in data["records"]:
        records.check_record(record)
        assert record["median_ms"] > 0 and record["peak_mem_bytes"] > 0
        assert record["device"] == data["metadata"]["device"]
        metric = record["metric"]
        assert isinstance(record[metric], float) and record[metric] > 0
    meta = data["metadata"]
    for key in ("date", "git_sha", "device", "versions", "peaks", "command", "timing"):
        assert key in meta
    assert {"python", "torch", "triton", "transformers", "fastgpt", "flash-attn", "liger-kernel"} <= set(
        meta["versions"]
    )
    assert meta["peaks"]["matmul_tflops"]["float32"] > 0 and meta["peaks"]["copy_gbps"] > 0
    if platform.libc_ver()[0] == "glibc":  # the CPU run kept freed memory (timing.keep_freed_memory)
        assert "M_TRIM_THRESHOLD" in meta["timing"]["cpu_allocator"]


FREED_BLOCK_HEAP = """
import ctypes, sys, torch
from fastgpt.bench import timing
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert timing.keep_freed_memory() is not None
block = torch.empty(30 * 2**20, dtype=torch.uint8)
mapped = libc.mallinfo2().hblkhd  # bytes in mmapped blocks while it lives
del block
print(mapped, libc.mallinfo2().fordblks)  # ... and free bytes kept in the heap after it is freed
"""


def test_keep_freed_memory_keeps_a_freed_block_for_reuse():
    """A 30 MiB block, in a fresh process each time (a process's history moves glibc's dynamic
    thresholds): with glibc's defaults it is mmapped and unmapped on free, so every reallocation
    page-faults it in again; after keep_freed_memory it comes from the heap and stays there when freed."""
    if platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("needs glibc 2.33+ (mallopt and mallinfo2)")

    def heap_after_free(setting):
        result = subprocess.run(
            [sys.executable, "-c", FREED_BLOCK_HEAP, setting],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO_ROOT,
        )
        return [int(value) for value in result.stdout.split()]

    block = 30 * 2**20
    mapped, kept_free = heap_after_free("default")
    assert mapped >= block and kept_free < block, (mapped, kept_free)
    mapped, kept_free = heap_after_free("keep")
    assert mapped < block and kept_free >= block, (mapped, kept_free)


def test_tiny_run_errors_against_float64(tiny_run):
    _, data = tiny_run
    for record in data["records"]:
        if record["op"] != "gpt":
            # float32 against float64 at tiny shapes: the error is rounding, far below 1e-3
            assert 0 < record["err_vs_reference"] < 1e-3, record
            expected_outputs = 2 if record["shape"].get("residual") else 1
            gradients = {
                "attention": 3,
                "layer_norm": 4 if record["shape"].get("residual") else 3,
                "cross_entropy": 2,
            }[record["op"]]
            expected = expected_outputs + (gradients if record["mode"] == "fwd+bwd" else 0)
            assert len(record["err_detail"]) == expected, record["err_detail"]
        elif record["mode"] == "generate":
            assert record["err_detail"] == {"token_mismatch_fraction": 0.0}
        else:
            assert record["err_vs_reference"] < 1e-4


def test_tiny_run_speedups_and_skips(tiny_run):
    _, data = tiny_run
    by_case = {}
    for record in data["records"]:
        by_case.setdefault(records.case_key(record), {})[record["provider"]] = record
    for case in by_case.values():
        for record in case.values():
            for baseline, ratio in record["speedup"].items():
                per_round = [
                    b / r for b, r in zip(case[baseline]["round_ms"], record["round_ms"], strict=True)
                ]
                assert ratio == pytest.approx(statistics.median(per_round))
    reasons = {(s["op"], s["provider"]): s["reason"] for s in data["skipped"]}
    assert reasons[("attention", "fastgpt:triton")].startswith("interpreter: not timed")
    assert reasons[("attention", "flash_attn")] == "flash_attn runs on CUDA only"
    assert reasons[("attention", "fastgpt:triton[gluon]")] == (
        "the Gluon forward runs with the triton backend on CUDA only"
    )
    for pinned in ("sdpa[cudnn]", "sdpa[flash]"):
        assert reasons[("attention", pinned)] == "SDPA's cuDNN and flash kernels run on CUDA only"
    # the compiled GPT is a training provider; CUDA graphs (the step, the decode step) need CUDA
    gpt_skips = {(s["mode"], s["provider"]): s["reason"] for s in data["skipped"] if s["op"] == "gpt"}
    for mode in ("train", "generate"):
        assert gpt_skips[(mode, "fastgpt.nn+cuda-graph")] == "CUDA graphs need a CUDA device, got cpu"
    assert gpt_skips[("generate", "fastgpt.nn+torch.compile")].startswith("a training-step provider")
    trained = {r["provider"] for r in data["records"] if (r["op"], r["mode"]) == ("gpt", "train")}
    assert {"fastgpt.nn", "fastgpt.nn+torch.compile"} <= trained


def test_tiny_run_report_and_plots(tiny_run):
    out, _ = tiny_run
    assert "| shape | provider | median ms ± IQR" in (out / "report.md").read_text()
    for name in (
        "attention_fwd.png",
        "attention_fwd_bwd.png",
        "attention_memory.png",
        "layer_norm.png",
        "gpt.png",
    ):
        header = (out / name).read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", header[16:24])
        assert width > 200 and height > 200


def _results_copy(data, path, device=None, date=None):
    """A results file at path holding data, under another device name or date where given."""
    metadata = {
        **data["metadata"],
        "device": device or data["metadata"]["device"],
        "date": date or data["metadata"]["date"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**data, "metadata": metadata}))
    return path


def test_render_readme_writes_a_summary_per_device_between_markers(tiny_run, tmp_path):
    _, data = tiny_run
    results = _results_copy(data, tmp_path / "results" / "2026-01-02-cpu.json")
    older = _results_copy(
        data, tmp_path / "results" / "2026-01-01-cpu.json", date="2026-01-01T00:00:00+00:00"
    )
    other_device = _results_copy(data, tmp_path / "results" / "2026-01-01-other.json", device="Other CPU")
    readme = tmp_path / "README.md"
    markers = f"{report.START_MARKER}\nold numbers\n{report.END_MARKER}"
    readme.write_text(f"# title\n\nintro\n\n## Performance\n\n{markers}\n\n## after\n")
    assert (
        cli.main(["bench", "--render", str(older), str(results), str(other_device), "--readme", str(readme)])
        == 0
    )
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n\n## Performance\n\n" + report.START_MARKER)
    assert text.endswith(report.END_MARKER + "\n\n## after\n")
    assert "old numbers" not in text
    section = text.split(report.START_MARKER)[1].split(report.END_MARKER)[0]
    # one summary per device, of its newest file: the older file of the same device is left out
    device = data["metadata"]["device"]
    assert f"### {device} — {data['metadata']['date'][:10]}" in section
    assert "### Other CPU — " in section
    assert "(results/2026-01-01-cpu" not in section  # no link to it (the command in the comment names it)
    assert "[results file](results/2026-01-02-cpu.json)" in section
    assert "[full per-shape report](results/2026-01-02-cpu.report.md)" in section
    assert "[plots](results/2026-01-02-cpu)" in section
    # the summary, not the per-shape tables: the README holds no per-shape time ...
    assert not any(report.format_time(record) in section for record in data["records"])
    # ... and its speedups are the medians over the shapes of the file's per-shape speedups
    attention = [
        r
        for r in data["records"]
        if (r["op"], r["mode"], r["provider"]) == ("attention", "fwd", "fastgpt:cpu")
    ]
    sdpa = statistics.median(records.speedup(_matching_record(data, r, "sdpa"), r) for r in attention)
    row = next(
        line
        for line in section.splitlines()
        if line.startswith("| attention | float32 | fwd | fastgpt:cpu |")
    )
    assert f"sdpa {sdpa:.2f}x" in row and f"| {len(attention)} |" in row
    # the full report is written beside the results file, with every per-shape time and the plots
    full = (tmp_path / "results" / "2026-01-02-cpu.report.md").read_text()
    assert all(report.format_time(record) in full for record in data["records"])
    assert "![attention_fwd](2026-01-02-cpu/attention_fwd.png)" in full
    assert (tmp_path / "results" / "2026-01-02-cpu" / "attention_fwd.png").exists()
    assert not (tmp_path / "results" / "2026-01-01-cpu.report.md").exists()


def _matching_record(data, record, provider):
    """The record of provider in the same case as record."""
    return next(
        r
        for r in data["records"]
        if r["provider"] == provider and records.case_key(r) == records.case_key(record)
    )


def test_render_keeps_a_committed_full_report(tiny_run, tmp_path):
    _, data = tiny_run
    results = _results_copy(data, tmp_path / "2026-01-01-cpu.json")
    committed = tmp_path / "2026-01-01-cpu.report.md"
    committed.write_text("## Stages\n\nthe GPU check's own report\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.START_MARKER}\n{report.END_MARKER}\n")
    report.render_readme(readme, [results])
    assert committed.read_text() == "## Stages\n\nthe GPU check's own report\n"
    assert "[full per-shape report](2026-01-01-cpu.report.md)" in readme.read_text()


def test_best_fastgpt_provider_is_fastest_at_the_most_shapes():
    def timed(provider, seq, median_ms):
        return {**_record(provider, records.FASTGPT, median_ms), "shape": {"seq": seq}}

    table = [
        timed("fastgpt:cuda", 1, 2.0),
        timed("fastgpt:triton", 1, 1.0),
        timed("fastgpt:cuda", 2, 1.0),
        timed("fastgpt:triton", 2, 3.0),
        timed("fastgpt:triton", 3, 1.0),
        timed("fastgpt:cuda", 3, 1.5),
        _record("sdpa", records.BASELINE, 0.5),
    ]
    assert report.best_fastgpt_provider(table) == "fastgpt:triton"  # 2 shapes of 3
    assert report.best_fastgpt_provider(table[:4]) == "fastgpt:cuda"  # a tie: the first in run order
    assert report.best_fastgpt_provider(table[-1:]) is None


WITHOUT_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None  # as if it were not installed: importing it raises ImportError
from fastgpt import cli
out, readme = sys.argv[1], sys.argv[2]
assert cli.main(["bench", "--tiny", "--device", "cpu", "--ops", "layer_norm", "--providers", "F.layer_norm,fastgpt:cpu",
                 "--out", out]) == 0
print("--- render")
assert cli.main(["bench", "--render", out + "/results.json", "--readme", readme]) == 0
"""


def test_bench_without_matplotlib_says_so_first_and_writes_everything_else(tmp_path):
    out, readme = tmp_path / "out", tmp_path / "README.md"
    readme.write_text(f"{report.START_MARKER}\n{report.END_MARKER}\n")
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_MATPLOTLIB, str(out), str(readme)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run, render = result.stdout.split("--- render\n")
    notice = "fastgpt bench: matplotlib is not installed, so no plots will be drawn"
    assert run.startswith(notice), run[:500]  # before the sweep, not after it
    assert "pip install matplotlib" in run and "fastgpt[test]" in run
    assert render.startswith(notice)
    assert json.loads((out / "results.json").read_text())["records"]
    assert "| shape | provider | median ms ± IQR" in (out / "report.md").read_text()
    assert "layer_norm · float32 · fwd" in run  # the tables were printed
    assert not list(tmp_path.rglob("*.png"))
    assert "[full per-shape report](out/results.report.md)" in readme.read_text()


def test_render_needs_the_markers(tiny_run, tmp_path):
    out, _ = tiny_run
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="perf:start"):
        cli.main(["bench", "--render", str(out / "results.json"), "--readme", str(readme)])


# ----------------------------------------------------------------------------------------------
# benchmarks/gpu_check.sh: what can be checked without a GPU (its --dry-run takes minutes)


@pytest.mark.parametrize(
    "arguments, error",
    [
        (
            ["everything"],
            (
                "expected all, correctness, bench, sanitizer, profile, attention, ffn, layer_norm, "
                "cross_entropy, gpt or --dry-run, got 'everything'"
            ),
        ),
        (["attention", "bench"], "only areas combine in one run, got 'attention' and 'bench'"),
        (["sanitizer", "ffn"], "only areas combine in one run, got 'sanitizer' and 'ffn'"),
    ],
)
def test_gpu_check_rejects_what_it_cannot_run(tmp_path, arguments, error):
    script = REPO_ROOT / "benchmarks" / "gpu_check.sh"
    result = subprocess.run(
        ["bash", str(script), *arguments],
        capture_output=True,
        text=True,
        env={**os.environ, "OUT": str(tmp_path / "out")},
        check=False,
    )
    assert result.returncode == 2
    assert error in result.stderr
    assert not (tmp_path / "out").exists()  # rejected before anything was written


def run_host_overhead(*args):
    """benchmarks/host_overhead.py in a subprocess, importing this checkout's fastgpt."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "host_overhead.py"), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_host_overhead_profiles_each_provider_on_cpu(tmp_path):
    """benchmarks/host_overhead.py (gpu_check.sh profile) at the tiny shapes: a record per op, mode and
    provider, measured or skipped with the reason, and fastgpt's Python hotspots ranked by own time."""
    run_host_overhead("--device", "cpu", "--tiny", "--ops", "layer_norm,gpt", "--out", str(tmp_path))
    found = json.loads((tmp_path / "host_overhead.json").read_text())
    by_key = {(r["op"], r["mode"], r["provider"]): r for r in found["records"]}
    assert set(by_key) == {
        *(
            ("layer_norm", mode, p)
            for mode in ("fwd", "fwd+bwd")
            for p in ("fastgpt:triton", "fastgpt:cpu", "F.layer_norm")
        ),
        *(
            ("gpt", mode, p)
            for mode in ("train", "generate")
            for p in ("fastgpt.nn", "fastgpt.nn+cuda-graph", "nanogpt", "hf (sdpa)")
        ),
    }
    assert (
        by_key[("gpt", "train", "fastgpt.nn+cuda-graph")]["skipped"]
        == "CUDA graphs need a CUDA device, got cpu"
    )
    assert by_key[("layer_norm", "fwd", "fastgpt:triton")]["skipped"].startswith("interpreter: not timed")
    fused = by_key[("layer_norm", "fwd+bwd", "fastgpt:cpu")]
    assert fused["wall_ms"] > 0 and fused["device_ms"] is None and fused["calls"] >= 3
    own = [h["own_us_per_call"] for h in fused["python_hotspots"]]
    assert own == sorted(own, reverse=True) and own[0] > 0
    # fastgpt's operator call (torch._ops.fastgpt.*, ~12 us of own time) ranks near the top; its Python
    # functions (2-3 us each) compete for the last of the TOP rows with torch's, which a loaded machine
    # reorders, so they are not required. Paths are shortened to the library or checkout root.
    assert any("torch._ops.fastgpt" in h["function"] for h in fused["python_hotspots"])
    assert not any(h["function"].startswith(os.sep) for h in fused["python_hotspots"])
    assert "python_hotspots" not in by_key[("layer_norm", "fwd+bwd", "F.layer_norm")]  # baselines: times only
    assert (
        "| layer_norm | fwd+bwd | 64x32 +residual | fastgpt:cpu | "
        in (tmp_path / "host_overhead.md").read_text()
    )


TINY_CALL_ROWS = {
    *(
        (op, mode, backend)
        for op in (
            "layer_norm",
            "layer_norm +residual",
            "causal_attention",
            "fused_ffn",
            "linear_cross_entropy",
        )
        for mode in ("fwd", "fwd+bwd")
        for backend in ("cpu", "auto")
    ),
    ("linear (decode)", "fwd", "cpu"),
    ("linear (decode)", "fwd", "auto"),
}


def test_host_overhead_times_each_op_against_torch_at_tiny_shapes(tmp_path):
    """host_overhead.py --calls-at-tiny-shapes: a row per op, mode and backend, in the JSON and in the
    printed and written table, with positive times and the ratio against issue 17's target."""
    result = run_host_overhead("--calls-at-tiny-shapes", "--tiny", "--out", str(tmp_path))
    found = json.loads((tmp_path / "host_overhead.json").read_text())
    assert found["metadata"]["threads"] == 1
    by_key = {(r["op"], r["mode"], r["backend"]): r for r in found["records"]}
    assert set(by_key) == TINY_CALL_ROWS and len(found["records"]) == len(TINY_CALL_ROWS)
    for record in found["records"]:
        for key in ("fastgpt_us", "fastgpt_cpu_us", "torch_us", "torch_cpu_us", "ratio", "wall_ratio"):
            assert isinstance(record[key], float) and record[key] > 0, (key, record)
        assert record["target"] == {"fwd": 3.0, "fwd+bwd": 1.3}[record["mode"]]
        assert record["within_target"] == (record["ratio"] <= record["target"])
        assert record["max_difference"] < 1e-4, record  # fastgpt and torch computed the same thing
    table = (tmp_path / "host_overhead.md").read_text()
    assert table in result.stdout  # printed as written
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| op |")
    ]
    assert {(row[0], row[1], row[3]) for row in rows} == TINY_CALL_ROWS and len(rows) == len(TINY_CALL_ROWS)
    for row in rows:
        assert all(float(row[column]) > 0 for column in (4, 5, 7, 8))  # CPU and wall us of fastgpt and torch
        assert row[9].endswith("x") and row[10].endswith("x") and row[12] in ("yes", "no")


def load_host_overhead():
    """benchmarks/host_overhead.py imported as a module."""
    import importlib.util

    path = REPO_ROOT / "benchmarks" / "host_overhead.py"
    spec = importlib.util.spec_from_file_location("host_overhead", path)
    host_overhead = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_overhead)
    return host_overhead


def test_host_overhead_writes_each_record_as_it_is_measured(tmp_path, monkeypatch):
    """gpu_check.sh profile runs host_overhead.py under a timeout that kills it where its GPU profile
    runs long: the outputs are rewritten after every record, so what was measured before the kill is
    in DIR/host_overhead.json and .md (the kill is a BaseException raised at the third record)."""
    host_overhead = load_host_overhead()
    measure = host_overhead.measure

    class Killed(BaseException):
        pass

    def measure_until_killed(*args):
        if (tmp_path / "host_overhead.json").exists() and len(
            json.loads((tmp_path / "host_overhead.json").read_text())["records"]
        ) == 2:
            raise Killed
        return measure(*args)

    monkeypatch.setattr(host_overhead, "measure", measure_until_killed)
    with pytest.raises(Killed):
        host_overhead.main(["--device", "cpu", "--tiny", "--ops", "layer_norm", "--out", str(tmp_path)])
    found = json.loads((tmp_path / "host_overhead.json").read_text())
    assert [(r["mode"], r["provider"]) for r in found["records"]] == [
        ("fwd", "fastgpt:triton"),
        ("fwd", "fastgpt:cpu"),
    ]
    assert found["records"][1]["wall_ms"] > 0 and found["metadata"]["dtype"] == "float32"
    assert (
        "| layer_norm | fwd | 64x32 +residual | fastgpt:cpu | " in (tmp_path / "host_overhead.md").read_text()
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["host_overhead.json", "host_overhead.md"]


def test_host_overhead_keeps_what_was_measured_when_a_provider_fails():
    host_overhead = load_host_overhead()
    calls = []

    def call():  # compiles fine, then fails: as a kernel that breaks on its second launch would
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("launch failed")

    class Bench:
        name = "layer_norm"

        def benchmark_call(self, shape, dtype, device, provider, mode):
            return call, None

    record = host_overhead.measure(
        Bench(), {"tokens": 4}, "fwd", "fastgpt:cpu", torch.float32, torch.device("cpu")
    )
    assert record["first_call_s"] >= 0 and record["error"] == "RuntimeError: launch failed"
    assert "wall_ms" not in record


def test_gpu_model_names_the_results_file():
    """gpu_check.sh suggests benchmarks/results/<date>-<model>.json: the H100's CUDA name ends in its
    memory type, which the last word (the earlier rule) gave instead of the model."""
    assert records.gpu_model("NVIDIA H100 80GB HBM3") == "h100"
    assert records.gpu_model("NVIDIA H200") == "h200"
    assert records.gpu_model("NVIDIA A100-SXM4-80GB") == "a100"
    assert records.gpu_model("NVIDIA GeForce RTX 4090") == "4090"


def test_git_sha_is_the_checkouts_commit_unless_overridden(monkeypatch):
    monkeypatch.delenv("FASTGPT_GIT_SHA", raising=False)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False, cwd=REPO_ROOT
    ).stdout.strip()
    if head:
        assert records.git_sha().removesuffix("-dirty") == head
    monkeypatch.setenv("FASTGPT_GIT_SHA", "0123abc")
    assert records.git_sha() == "0123abc"


def test_a_backend_without_a_kernel_for_the_op_is_skipped_with_the_reason(monkeypatch):
    import fastgpt
    from fastgpt.bench.providers import fastgpt_providers

    monkeypatch.setattr(fastgpt, "available_backends", lambda: ["cpu", "triton", "cuda"])
    by_name = {p.name: p for p in fastgpt_providers(fastgpt.linear, "cuda")}
    assert by_name["fastgpt:cuda"].skip == "backend 'cuda' has no kernel for linear"
    assert by_name["fastgpt:triton"].skip == "backend 'triton' has no kernel for linear"
    for op in (fastgpt.layer_norm, fastgpt.linear_cross_entropy):
        by_name = {p.name: p for p in fastgpt_providers(op, "cuda")}
        assert by_name["fastgpt:cuda"].skip is None and by_name["fastgpt:cuda"].fn is not None


def test_every_provider_is_reached_by_its_own_name():
    """benchmark_call (host_overhead.py, gpu_check.sh profile; the pytest-benchmark harness) selects one
    provider by its name through the glob filter: names with brackets (`sdpa[cudnn]`,
    `fastgpt:triton[gluon]`) must select themselves, not read as a character class and select nothing."""
    from fastgpt.bench.providers import select

    bench = OPS["attention"]
    shape = bench.shapes("cpu", "tiny")[0]
    names = bench.provider_names(shape, torch.float32, "cpu")
    assert {"sdpa[cudnn]", "sdpa[flash]", "fastgpt:triton[gluon]"} <= set(names)
    for name in names:
        call, skip = bench.benchmark_call(shape, torch.float32, "cpu", name, "fwd")
        assert (call is None) != (skip is None), name
    assert [p.name for p in select(bench.providers(shape, torch.float32, "cpu"), include=["sdpa*"])] == [
        "sdpa",
        "sdpa[cudnn]",
        "sdpa[flash]",
    ]
    kept = select(bench.providers(shape, torch.float32, "cpu"), exclude=["sdpa[cudnn]", "*gluon*"])
    assert "sdpa[cudnn]" not in {p.name for p in kept} and "sdpa[flash]" in {p.name for p in kept}


def test_gpt_providers_named_in_skips_are_not_built_and_carry_the_reason():
    from fastgpt.bench import gpt

    shape = gpt.TINY[1]
    providers = gpt.build_providers(
        gpt._hf_model(shape, seed=0),
        "cpu",
        torch.float32,
        include=["nanogpt*"],
        skips={"nanogpt+torch.compile": "not here"},
    )
    by_name = {p.name: p for p in providers}
    assert set(by_name) == {"nanogpt", "nanogpt+torch.compile"}
    assert by_name["nanogpt+torch.compile"].skip == "not here"
    assert (
        by_name["nanogpt+torch.compile"].model is None
        and by_name["nanogpt+torch.compile"].kind == records.BASELINE
    )
    assert by_name["nanogpt"].skip is None and by_name["nanogpt"].model is not None


def test_a_training_step_whose_capture_fails_is_skipped_and_the_others_are_timed(monkeypatch):
    """fastgpt.nn+cuda-graph's step runs eagerly at its first call and is captured in a CUDA graph at its
    second: a capture that fails (a host synchronisation or an allocation the graph cannot record) skips
    that provider with the error, as a failing first call does, instead of ending the case (and the
    gpt stage) in the unguarded warm-up. The CPU stands in for the GPU: the captured step is
    fastgpt.nn's eager step wrapped in a CapturedStep whose capture raises CUDA's error."""
    pytest.importorskip("transformers")
    from fastgpt.bench import gpt
    from fastgpt.bench.runner import PLANS

    class FailingCapture(gpt.CapturedStep):
        def __init__(self, step):  # CapturedStep.__init__ wants a CUDA device
            self.step_fn, self.warmup_steps, self.calls, self.graph = step, gpt.CAPTURE_WARMUP_STEPS, 0, None

        def __call__(self):
            self.calls += 1
            if self.calls > self.warmup_steps:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
            return self.step_fn()

    train_step = gpt._train_step

    def captured_fastgpt_nn(provider, x, y, device):
        step = train_step(provider, x, y, device)
        return FailingCapture(step) if provider.name == "fastgpt.nn" else step

    monkeypatch.setattr(gpt, "_train_step", captured_fastgpt_nn)
    peaks = {"device": "cpu", "matmul_tflops": {"float32": 1.0}, "copy_gbps": 1.0}
    records, skipped = gpt.GPTBench().run_case(
        gpt.TINY[0], torch.float32, "cpu", PLANS["tiny"], peaks, include=["fastgpt.nn", "nanogpt"]
    )
    assert [r["provider"] for r in records] == ["nanogpt"] and records[0]["median_ms"] > 0
    assert [(s["provider"], s["reason"]) for s in skipped] == [
        ("fastgpt.nn", "error: RuntimeError: CUDA error: operation not permitted when stream is capturing")
    ]


# ----------------------------------------------------------------------------------------------
# The nanoGPT baseline


def test_nanogpt_baseline_trains_on_the_padded_vocabulary_as_nanogpt_does():
    """The baseline pads its vocabulary as nanoGPT's train.py does (97 -> 128 here, 50257 -> 50304 at
    GPT-2): the loss takes the padded zero logits into its softmax, and generation reads the real
    vocabulary's logits only, equal to the unpadded model's."""
    pytest.importorskip("transformers")
    from fastgpt.bench.gpt import _hf_model
    from fastgpt.bench.nanogpt import NanoGPT

    shape = {"n_layer": 1, "n_head": 2, "n_embd": 32, "vocab_size": 97, "block_size": 16}
    hf_model = _hf_model(shape, seed=0).float()
    padded, unpadded = NanoGPT.from_hf(hf_model, vocab_multiple=64), NanoGPT.from_hf(hf_model)
    assert padded.lm_head.weight.shape == (128, 32) and padded.lm_head.weight is padded.transformer.wte.weight
    assert torch.equal(padded.lm_head.weight[97:], torch.zeros(31, 32))

    idx, targets = torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        positions = torch.arange(8)
        for model in (padded, unpadded):
            model.setup_cache(2, 8)
        torch.testing.assert_close(padded(idx, positions=positions), unpadded(idx, positions=positions))
        unpadded_logits = unpadded.lm_head(unpadded.transformer.ln_f(hidden(unpadded, idx)))  # (B, T, 97)
        with_zeros = torch.cat([unpadded_logits, torch.zeros(2, 8, 31)], dim=-1)  # (B, T, 128)
        expected = torch.nn.functional.cross_entropy(with_zeros.flatten(0, 1), targets.flatten())
        torch.testing.assert_close(padded(idx, targets), expected)


def hidden(model, idx):
    """The residual stream before ln_f of a bench NanoGPT, for the loss above."""
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.shape[1]))  # (B, T, C)
    for block in model.transformer.h:
        x = block(x, None)
    return x


def test_report_names_the_kernels_a_profiled_provider_ran():
    record = {
        "provider": "sdpa",
        "shape": {"batch": 2, "heads": 16, "kv_heads": 16, "seq": 4096, "head_dim": 128},
        "gpu_kernels": ["cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "elementwise_kernel"],
    }
    (line, blank) = report.kernel_lines(
        "attention", [record, {**record, "provider": "eager", "gpu_kernels": []}]
    )
    assert line.startswith("- sdpa at ") and "`cudnn_generated_fort_native_sdpa_sm90_flash_fprop`" in line
    assert blank == ""
    assert report.kernel_lines("attention", [{**record, "gpu_kernels": []}]) == []


@pytest.mark.gpu
def test_gpu_kernel_names_name_what_sdpa_ran():
    q = torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16)
    names = timing.gpu_kernel_names(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), "cuda")
    assert names and any(
        "attention" in name.lower()
        or "fmha" in name.lower()
        or "sdpa" in name.lower()
        or "flash" in name.lower()
        for name in names
    ), names
