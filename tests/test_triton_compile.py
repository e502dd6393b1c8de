"""Every GPU configuration of every Triton kernel compiles for sm_80 and sm_90, fits in shared memory,
and uses tensor cores where it multiplies matrices. Needs Triton, not a GPU."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compile_records():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "fastgpt.ops.triton_compile"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert records, "no compile cases were reported"
    return records


def test_every_case_compiles(compile_records):
    failures = [f"{r['name']} sm_{r['capability']}: {r['error']}" for r in compile_records if "error" in r]
    assert not failures, "\n".join(failures)


def test_shared_memory_fits(compile_records):
    over = [
        f"{r['name']} sm_{r['capability']}: {r['shared_bytes']} > {r['shared_limit']} bytes"
        for r in compile_records
        if "error" not in r and r["shared_bytes"] > r["shared_limit"]
    ]
    assert not over, "\n".join(over)


def test_tensor_core_instructions(compile_records):
    missing = [
        f"{r['name']} sm_{r['capability']}"
        for r in compile_records
        if "error" not in r and r["tensor_cores_expected"] and not (r["has_mma"] or r["has_wgmma"])
    ]
    assert not missing, "no mma/wgmma in the PTX of: " + ", ".join(missing)
    assert any(r["capability"] == 80 and r["has_mma"] for r in compile_records)


def test_pipelined_matrix_kernels_use_cp_async(compile_records):
    """A tensor-core kernel configured with two or more stages must actually pipeline its loads."""
    unpipelined = [
        f"{r['name']} sm_{r['capability']}"
        for r in compile_records
        if "error" not in r and r["tensor_cores_expected"] and r["num_stages"] >= 2 and not r["has_cp_async"]
    ]
    assert not unpipelined, "no cp.async in: " + ", ".join(unpipelined)
