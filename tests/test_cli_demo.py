"""`fastgpt demo`'s parts that are not timing: the backend error table, the training comparison and the
training on alone after it, the loss-curve PNG and JSON record, and where the demo writes (a few steps;
the whole demo takes about 2 minutes)."""

import argparse
import io
import json
import re
import subprocess
import time

import pytest
import torch
from rich.console import Console

from fastgpt import demo
from fastgpt.nn import GPT, GPTConfig
from fastgpt.train.tokenizer import ByteTokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: pytest-xdist runs a worker per core, where two threads each only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def demo_args(out, steps, continue_steps):
    return argparse.Namespace(
        device="cpu", out=str(out), train_seconds=60.0, continue_seconds=60.0, steps=steps,
        continue_steps=continue_steps,
    )  # fmt: skip


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


def test_training_comparison_then_alone_plots_and_records(tmp_path):
    args = demo_args(tmp_path, steps=8, continue_steps=4)
    console = Console(file=io.StringIO())
    results, fused, eager = demo.train_comparison(torch.device("cpu"), args, console)
    assert results["steps"] == 8 and results["timed_steps"] == 8 - demo.CALIBRATION_STEPS
    assert results["tokens_per_s"]["fastgpt"] > 0 and results["tokens_per_s"]["eager"] > 0
    speedup = results["tokens_per_s"]["fastgpt"] / results["tokens_per_s"]["eager"]
    assert results["speedup"] == pytest.approx(speedup)
    # Same initial weights, same batches: the two runs learn the same thing.
    fused_losses = [h["loss"] for h in fused.history]
    eager_losses = [h["loss"] for h in eager.history]
    assert fused_losses == pytest.approx(eager_losses, rel=1e-3)
    assert results["held_out_loss"] < fused.evals[0]["loss"]
    assert fused.settings.steps == 12  # one schedule over the comparison and the steps alone after it

    alone = demo.train_alone(fused, args, console)
    assert alone["steps"] == 4 and fused.step == 12 and eager.step == 8
    assert fused.evals[-1] == {
        "step": 12,
        "loss": alone["held_out_loss"],
        "perplexity": alone["held_out_perplexity"],
    }
    assert alone["held_out_loss"] < results["held_out_loss"]
    results["continued"] = alone

    demo.plot_losses(fused, eager, results, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path = demo.write_record(results, torch.device("cpu"), args, wall_seconds=1.0)
    record = json.loads(path.read_text())
    assert path == tmp_path / "results.json"
    assert record["command"] == "fastgpt demo --steps 8 --continue-steps 4"
    keys = {"date", "git_sha", "device", "versions", "available_backends", "fastgpt_backends", "continued"}
    assert keys <= record.keys()
    assert record["speedup"] == results["speedup"] and record["versions"]["torch"] == torch.__version__


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_chosen_backends_asks_with_the_facts_of_the_models_own_calls(device_type, monkeypatch):
    """What the demo prints and records as fastgpt's backends is dispatch's answer for the routing facts
    of the calls the demo model makes in a training step. The CUDA model's shape (context 256) is
    run on the CPU: the facts do not depend on the device, and on CUDA a fact left out flips
    causal_attention to the other order (dispatch.CUDA_ORDER's kv_len split)."""
    spec = {
        k: v for k, v in demo.DEMO_MODEL[device_type].items() if k not in ("batch_size", "lr", "max_steps")
    }
    config = GPTConfig.preset("tiny", vocab_size=ByteTokenizer().vocab_size, **{**spec, "n_layer": 1})
    asked = []
    choose_backend = demo.dispatch.choose_backend

    def recording_choose_backend(op, backend, device_type, dtype, facts):
        asked.append((op, facts))
        return choose_backend(op, backend, device_type, dtype, facts)

    monkeypatch.setattr(demo.dispatch, "choose_backend", recording_choose_backend)
    model = GPT(config)
    tokens = torch.randint(0, config.vocab_size, (1, config.block_size + 1))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    model_calls = {(op, facts) for op, facts in asked if op != "linear"}
    asked.clear()
    demo.chosen_backends(config, tokens.shape[0], torch.device("cpu"), torch.float32)
    assert set(asked) == model_calls


def test_steps_left_at_the_median_pace():
    # Slow first steps drop out of the latest PACE_STEPS, and the median leaves out one slow step.
    step_seconds = [50.0] * 5 + [2.0] * (demo.PACE_STEPS - 1) + [100.0]
    assert demo.steps_left(time.perf_counter() + 10.5, step_seconds) == 5
    assert demo.steps_left(time.perf_counter() - 1.0, step_seconds) == 0


def test_training_alone_out_of_time_ends_its_schedule_where_it_stops(tmp_path):
    fused, _, _ = demo.demo_trainers(torch.device("cpu"))
    fused.evaluate()
    args = demo_args(tmp_path, steps=None, continue_steps=None)
    args.continue_seconds = 0.0
    alone = demo.train_alone(fused, args, Console(file=io.StringIO()))
    assert alone["steps"] == 1 and fused.settings.steps == fused.step == 1
    assert fused.evals[-1]["step"] == 1


def test_sample_goes_on_past_the_context_window():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=32, block_size=16))
    tokenizer = ByteTokenizer(eot=False)  # an untrained model may write 256 at any step: no end of document
    ids = demo.sample(model, tokenizer, demo.PROMPT, 3 * 16 + 5)
    assert len(ids) == 3 * 16 + 5 and ids[: len(demo.PROMPT)] == tokenizer.encode(demo.PROMPT)


def git_status(repo):
    return subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=all"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def test_demo_writes_only_under_out(tmp_path, monkeypatch):
    """The whole demo, its tables stubbed out and a few steps, leaves the checkout as it found it and
    writes nothing in the working directory: everything goes under --out."""
    try:
        before = git_status(demo.REPO_ROOT)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for table in ("backend_table", "attention_table", "speed_table"):
        monkeypatch.setattr(demo, table, lambda device: "(table left out)")
    working_dir, out = tmp_path / "cwd", tmp_path / "out"
    working_dir.mkdir()
    monkeypatch.chdir(working_dir)
    assert demo.run(demo_args(out, steps=6, continue_steps=2)) == 0
    assert git_status(demo.REPO_ROOT) == before
    assert list(working_dir.iterdir()) == []
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint", "loss.png", "results.json"]


@pytest.mark.gpu
def test_demo_gpt_on_cuda_runs_and_records_the_backends_that_ran(tmp_path, monkeypatch):
    """The demo's CUDA training branches (bfloat16, the CUDA model and its Trainers, the checkpoint of
    CUDA tensors and RNG state, the sample), a few steps, the tables left out (their Triton autotuning
    at other shapes would not fit the GPU stage's per-test timeout; each op's GPU tests run the
    kernels): it finishes, and results.json names for each op the backend its calls ran on."""
    for table in ("backend_table", "attention_table", "speed_table"):
        monkeypatch.setattr(demo, table, lambda device: "(table left out)")
    ran = {}
    choose_backend = demo.dispatch.choose_backend

    def recording_choose_backend(op, backend, device_type, dtype, facts):
        name = choose_backend(op, backend, device_type, dtype, facts)
        if backend == "auto" and device_type == "cuda":
            ran.setdefault(op, set()).add(name)
        return name

    monkeypatch.setattr(demo.dispatch, "choose_backend", recording_choose_backend)
    monkeypatch.chdir(tmp_path)
    args = demo_args(tmp_path / "out", steps=demo.CALIBRATION_STEPS + 2, continue_steps=2)
    args.device = "cuda"
    assert demo.run(args) == 0
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["device_type"] == "cuda" and record["dtype"] == "bfloat16"
    assert record["continued"]["steps"] == 2 and record["steps"] == demo.CALIBRATION_STEPS + 2
    assert {op: {name} for op, name in record["fastgpt_backends"].items()} == {
        op: names for op, names in ran.items() if op in record["fastgpt_backends"]
    }
    assert (tmp_path / "out" / "checkpoint" / "training_state.safetensors").is_file()
