"""`fastgpt demo`'s parts that are not timing: the backend error table and the training comparison with
its loss-curve PNG and JSON record (a few steps; the whole demo takes about 2 minutes)."""

import argparse
import io
import json
import re

import pytest
import torch
from rich.console import Console

from fastgpt import demo


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: pytest-xdist runs a worker per core, where two threads each only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_backend_table_covers_every_op_with_small_errors(monkeypatch):
    # The reference backend only: conftest turns the Triton interpreter on, which would take minutes
    # at the table's shapes; each kernel's own tests check it against the reference.
    monkeypatch.setattr(demo.fastgpt, "available_backends", lambda: ["reference"])
    buffer = io.StringIO()
    Console(file=buffer, width=200).print(demo.backend_table(torch.device("cpu")))
    text = buffer.getvalue()
    for op in ("causal_attention", "fused_ffn", "layer_norm", "linear_cross_entropy"):
        row = next(line for line in text.splitlines() if op in line and "reference" in line)
        errors = [float(e) for e in re.findall(r"\d\.\de[-+]\d+", row)]
        assert len(errors) == 2 and all(0 < e < 1e-4 for e in errors), row  # float32 against float64


def test_training_comparison_plots_and_records(tmp_path):
    args = argparse.Namespace(
        steps=8, train_seconds=60.0, out=str(tmp_path), results_dir=str(tmp_path / "results")
    )
    console = Console(file=io.StringIO())
    results, fused, eager = demo.train_comparison(torch.device("cpu"), args, console)
    assert results["steps"] == 8 and results["timed_steps"] == 8 - demo.CALIBRATION_STEPS
    assert results["tokens_per_s"]["fastgpt"] > 0 and results["tokens_per_s"]["eager"] > 0
    assert results["speedup"] == pytest.approx(
        results["tokens_per_s"]["fastgpt"] / results["tokens_per_s"]["eager"]
    )
    # Same initial weights, same batches: the two runs learn the same thing.
    fused_losses = [h["loss"] for h in fused.history]
    eager_losses = [h["loss"] for h in eager.history]
    assert fused_losses == pytest.approx(eager_losses, rel=1e-3)
    assert results["held_out_loss"] < fused.evals[0]["loss"]

    demo.plot_losses(fused, eager, results, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path = demo.write_record(results, torch.device("cpu"), args, wall_seconds=1.0)
    record = json.loads(path.read_text())
    assert path.name.endswith("-demo-cpu.json") and path.parent == tmp_path / "results"
    for key in (
        "date",
        "git_sha",
        "device",
        "versions",
        "available_backends",
        "fastgpt_backends",
        "tokens_per_s",
    ):
        assert key in record
    assert record["speedup"] == results["speedup"] and record["versions"]["torch"] == torch.__version__
