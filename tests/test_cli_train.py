"""`fastgpt train | generate | eval` end to end on CPU: the loss falls, generation streams from a saved
checkpoint or a local HF GPT-2 directory, eval matches training's evaluation, --resume continues a run,
torchrun with 2 gloo processes matches one process, and every user error is one line, no traceback."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastgpt.cli import main
from fastgpt.generate_cli import stream
from fastgpt.nn import GPT
from fastgpt.train import checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "2", "--n-embd", "64", "--n-head", "4"]  # a new model's architecture
BATCHES = ["--seq-len", "32", "--batch-size", "8", "--eval-windows", "16"]
TIMEOUT_S = 240


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are too small to gain from two, and pytest-xdist runs a
    worker per core, where two threads each only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(out, *extra):
    """Trains into out; a new tiny model unless extra has --init or --resume."""
    architecture = [] if {"--init", "--resume"} & set(extra) else TINY
    assert main(["train", "--out", str(out), *architecture, *BATCHES, *extra]) == 0
    return json.loads((Path(out) / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """60 steps on the default corpus (the standard library's sources)."""
    out = tmp_path_factory.mktemp("run")
    state = train(out, "--steps", "60", "--eval-every", "30", "--lr", "3e-3")
    return out, state


def test_sixty_steps_reduce_the_held_out_loss(trained):
    out, state = trained
    evals = [e["loss"] for e in state["evals"]]
    assert [e["step"] for e in state["evals"]] == [0, 30, 60]
    assert evals[0] == pytest.approx(
        torch.log(torch.tensor(257.0)).item(), abs=0.3
    )  # uniform over 257 tokens
    assert evals[-1] < 0.8 * evals[0], evals
    assert len(state["history"]) == 60 and state["step"] == 60 and state["tokens_seen"] == 60 * 8 * 32
    assert sorted(os.listdir(out)) == [
        "config.json",
        "model.safetensors",
        "tokenizer_info.json",
        "trainer_state.json",
        "training_state.safetensors",
    ]


def test_eval_scores_the_same_held_out_windows_as_training(trained, capsys):
    out, state = trained
    assert main(["eval", "--checkpoint", str(out), "--seq-len", "32", "--max-windows", "16"]) == 0
    printed = capsys.readouterr().out
    loss, perplexity = map(float, re.search(r"held-out loss ([\d.]+), perplexity ([\d.]+)", printed).groups())
    assert loss == pytest.approx(state["evals"][-1]["loss"], abs=1e-4)
    assert perplexity == pytest.approx(torch.exp(torch.tensor(loss)).item(), rel=1e-3)


def test_generate_prints_the_prompt_and_a_reproducible_continuation(trained, capsys):
    out, _ = trained
    args = ["generate", "import os\n", "--checkpoint", str(out), "--max-new-tokens", "20", "--seed", "7"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("import os\n") and len(first) > len("import os\n")


def test_greedy_generation_streams_what_generate_returns(trained):
    """The text written token by token equals the decoding of GPT.generate's full result."""
    out, _ = trained
    model, tokenizer = checkpoint.load_model(str(out), device="cpu", dtype=torch.float32)
    prompt = tokenizer.encode("def ")

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            pass

    recorder = Recorder()
    ids = stream(model, tokenizer, prompt, max_new_tokens=24, temperature=0.0, out=recorder)
    expected = model.generate(torch.tensor([prompt]), 24, temperature=0.0, eos_token_id=tokenizer.eot_id)[
        0
    ].tolist()
    assert ids == expected
    assert "".join(recorder.writes) == tokenizer.decode(expected[len(prompt) :]) + "\n"
    assert sum(1 for w in recorder.writes if w) > 1  # written as it went, not at the end


def test_resume_continues_a_run(tmp_path):
    first = train(tmp_path, "--steps", "3", "--eval-every", "100")
    resumed = train(tmp_path, "--steps", "5", "--eval-every", "100", "--resume")
    assert resumed["step"] == 5 and [h["step"] for h in resumed["history"]] == [1, 2, 3, 4, 5]
    assert resumed["history"][:3] == first["history"]
    assert [e["step"] for e in resumed["evals"]] == [0, 3, 5]


def test_bpe_tokenizer_trains_and_generates(tmp_path, capsys):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    text = (Path(__file__).read_text() + "\n") * 4
    backend.train_from_iterator(
        [text], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    (tmp_path / "tok").mkdir()
    backend.model.save(str(tmp_path / "tok"))  # vocab.json + merges.txt, as in a GPT-2 directory
    (tmp_path / "data.txt").write_text(text)
    out = tmp_path / "run"
    train(out, "--steps", "2", "--data", str(tmp_path / "data.txt"), "--tokenizer", str(tmp_path / "tok"))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 300
    assert (out / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["generate", "def test", "--checkpoint", str(out), "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def test")


def write_hf_gpt2_directory(directory, model):
    """What transformers' GPT2LMHeadModel.save_pretrained writes: GPT-2's config.json names and its
    Conv1D (in, out) weight layout."""
    config = model.config
    directory.mkdir()
    hf_config = dict(
        model_type="gpt2", n_positions=config.block_size, vocab_size=config.vocab_size, n_layer=config.n_layer,
        n_head=config.n_head, n_embd=config.n_embd, activation_function="gelu_new", layer_norm_epsilon=1e-5,
    )  # fmt: skip
    (directory / "config.json").write_text(json.dumps(hf_config))
    conv1d = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
    state = {
        name.removeprefix("transformer."): tensor.t().contiguous()
        if name.endswith(conv1d)
        else tensor.contiguous()
        for name, tensor in model.state_dict().items()
        if name != "lm_head.weight"
    }
    save_file(state, str(directory / "model.safetensors"))


def test_generate_and_fine_tune_from_a_local_hf_gpt2_directory(trained, tmp_path, capsys):
    out, _ = trained
    hf_dir = tmp_path / "hf"
    write_hf_gpt2_directory(hf_dir, GPT.load(str(out)))
    (hf_dir / "tokenizer_info.json").write_bytes((out / "tokenizer_info.json").read_bytes())
    greedy = ["--max-new-tokens", "16", "--temperature", "0"]
    assert main(["generate", "class ", "--checkpoint", str(hf_dir), *greedy]) == 0
    from_hf = capsys.readouterr().out
    assert main(["generate", "class ", "--checkpoint", str(out), *greedy]) == 0
    assert from_hf.startswith("class ") and from_hf == capsys.readouterr().out

    state = train(tmp_path / "tuned", "--init", str(hf_dir), "--steps", "2", "--lr", "1e-4")
    assert state["step"] == 2 and state["evals"][0]["loss"] < 0.8 * 5.55  # starts from the trained weights


def test_torchrun_two_gloo_processes_match_one_process(tmp_path):
    """The global batch is split over 2 processes by torchrun/DDP; the loss history and the weights
    after 3 steps equal one process's on the whole batch (up to float summation order)."""
    args = ["train", *TINY, *BATCHES, "--steps", "3", "--eval-every", "100"]
    distributed = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "fastgpt",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [*command, *args, "--out", str(distributed)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    single = tmp_path / "single"
    assert main([*args, "--out", str(single)]) == 0
    states = [json.loads((d / "trainer_state.json").read_text()) for d in (distributed, single)]
    assert states[0]["world_size"] == 2 and states[1]["world_size"] == 1
    for a, b in zip(states[0]["history"], states[1]["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    ddp_weights, single_weights = (load_file(str(d / "model.safetensors")) for d in (distributed, single))
    for name, tensor in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], tensor, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# User errors: one line naming the problem, a non-zero exit, no traceback


def assert_one_line_error(capsys, argv, expected):
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fastgpt {argv[0]}: error: "), err
    assert re.search(expected, err), err
    assert "Traceback" not in err


@pytest.fixture
def broken_checkpoints(trained, tmp_path):
    out, _ = trained
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "config.json").write_bytes((out / "config.json").read_bytes())
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in os.listdir(out):
        (corrupt / name).write_bytes((out / name).read_bytes())
    weights = (out / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # a truncated copy
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty.txt").write_text("")
    return tmp_path


@pytest.mark.parametrize(
    "argv, expected",
    [
        pytest.param(
            ["train", "--data", "{tmp}/missing.txt"],
            r"--data .*missing\.txt does not exist",
            id="data-missing",
        ),
        pytest.param(
            ["train", "--data", "{tmp}/empty.txt"], r"--data .*empty\.txt is empty", id="data-empty-file"
        ),
        pytest.param(
            ["train", "--data", "{tmp}/empty_dir"], r"--data .*empty_dir is empty", id="data-empty-dir"
        ),
        pytest.param(
            ["generate", "x", "--checkpoint", "{tmp}/missing"],
            r"checkpoint directory .*missing does not exist",
            id="checkpoint-missing",
        ),
        pytest.param(
            ["generate", "x", "--checkpoint", "{tmp}/empty_dir"],
            r"empty_dir lacks config\.json",
            id="checkpoint-empty",
        ),
        pytest.param(
            ["eval", "--checkpoint", "{tmp}/only_config"],
            r"only_config lacks model\.safetensors",
            id="checkpoint-no-weights",
        ),
        pytest.param(
            ["generate", "x", "--checkpoint", "{tmp}/corrupt"],
            r"model\.safetensors is corrupt",
            id="corrupt-generate",
        ),
        pytest.param(
            ["train", "--init", "{tmp}/corrupt", "--steps", "1"],
            r"model\.safetensors is corrupt",
            id="corrupt-init",
        ),
        pytest.param(
            ["train", "--out", "{tmp}/empty_dir", "--resume"],
            r"empty_dir lacks config\.json",
            id="resume-empty",
        ),
        pytest.param(
            ["generate", "y" * 40, "--checkpoint", "{run}"],
            r"prompt is 40 tokens, too long for .* context window of 32",
            id="prompt-too-long",
        ),
        pytest.param(
            ["generate", "x", "--checkpoint", "{run}", "--max-new-tokens", "40"],
            r"exceeds the model's context window",
            id="too-many-new-tokens",
        ),
        pytest.param(
            ["generate", "x", "--checkpoint", "{run}", "--temperature", "-1"],
            r"temperature must be",
            id="temperature",
        ),
        pytest.param(
            ["train", "--out", "{run}", "--resume", "--n-layer", "3"],
            r"--n-layer shape a new model",
            id="resume-arch",
        ),
        pytest.param(
            ["train", "--init", "{run}", "--config", "gpt2"], r"drop --config", id="init-and-config"
        ),
    ],
)
def test_user_errors_are_one_line(broken_checkpoints, trained, capsys, argv, expected):
    argv = [a.format(tmp=broken_checkpoints, run=trained[0]) for a in argv]
    assert_one_line_error(capsys, argv, expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize(
    "command", [["train"], ["generate", "x", "--checkpoint", "unused"], ["eval", "--checkpoint", "unused"]]
)
def test_device_cuda_without_a_gpu_is_one_line(capsys, command):
    assert_one_line_error(
        capsys, [*command, "--device", "cuda"], r"--device cuda was given, but torch sees no CUDA GPU"
    )


def test_console_entry_exits_non_zero_without_traceback(tmp_path):
    """The real entry point, in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-m", "fastgpt", "train", "--data", str(tmp_path / "nope")], cwd=REPO,
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == f"fastgpt train: error: --data {tmp_path / 'nope'} does not exist\n"
    assert result.stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize(
    "step_mode, expected",
    [
        ("auto", "step mode: eager (auto on cpu: fastgpt's CPU kernels do the work"),
        ("cuda-graph", "step mode: eager (cuda-graph needs a CUDA device; running eager on cpu)"),
    ],
)
def test_train_says_which_step_mode_it_runs(tmp_path, capsys, step_mode, expected):
    train(tmp_path, "--steps", "2", "--eval-every", "2", "--step-mode", step_mode)
    assert expected in capsys.readouterr().out
