"""`fastgpt train | generate | eval` end to end on CPU: the loss falls, generation streams from a saved
checkpoint or a local HF GPT-2 directory, eval matches training's evaluation, --resume continues a run,
torchrun with 2 gloo processes matches one process, and every user error is one line, no traceback."""

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_files import byte_level_bpe, write_nanogpt_meta, write_token_file
from deterministic import deterministic_algorithms
from safetensors.torch import load_file, save_file

from fastgpt.cli import main
from fastgpt.generate_cli import SAMPLE_SEPARATOR, sample_batch, stream
from fastgpt.nn import GPT, GPTConfig
from fastgpt.train import checkpoint, loop
from fastgpt.train.data import as_shards, data_splits, read_data
from fastgpt.train.loop import evaluate
from fastgpt.train.runtime import Runtime
from fastgpt.train.tokenizer import load_tokenizer

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


def test_eval_with_a_stride_scores_every_held_out_token_once(trained, capsys):
    """--stride 16: overlapping 32-token windows every 16 tokens, each held-out token but the first
    scored once (with 16 or more tokens of context after the first window): evaluate's loss on
    strided_windows, and it is lower than the non-overlapping windows' (more context per token)."""
    out, state = trained
    assert main(["eval", "--checkpoint", str(out), "--seq-len", "32", "--stride", "16"]) == 0
    printed = capsys.readouterr().out
    loss = float(re.search(r"held-out loss ([\d.]+)", printed).group(1))
    model, tokenizer = checkpoint.load_model(str(out), device="cpu", dtype=torch.float32)
    _, val_tokens, _ = data_splits(read_data(None), tokenizer, 32)
    starts, first_scored = as_shards(val_tokens).strided_windows(32, 16)
    expected = evaluate(
        model, val_tokens, starts, 32, 8, Runtime(torch.device("cpu"), torch.float32), first_scored
    )
    assert loss == pytest.approx(expected, abs=1e-4)
    assert (
        f"{len(val_tokens) - 1:,} of {len(val_tokens):,} held-out tokens" in printed and "every 16" in printed
    )
    assert loss < state["evals"][-1]["loss"]


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


def test_generate_num_samples_prints_each_sample_of_one_batch(trained, capsys):
    """--num-samples N prints N continuations of the prompt, each followed by the separator line: the
    samples of one batched GPT.generate under the seed, each cut after its first end-of-text token."""
    out, _ = trained
    prompt = "def "
    args = [
        "generate",
        prompt,
        "--checkpoint",
        str(out),
        "--max-new-tokens",
        "12",
        "--seed",
        "5",
        "--num-samples",
        "3",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    model, tokenizer = checkpoint.load_model(str(out), device="cpu", dtype=torch.float32)
    ids = tokenizer.encode(prompt)
    torch.manual_seed(5)
    batch = model.generate(
        torch.tensor([ids] * 3), 12, temperature=0.8, eos_token_id=tokenizer.eot_id
    )  # (3, T)
    expected = ""
    for row in batch[:, len(ids) :].tolist():
        new = row[: row.index(tokenizer.eot_id) + 1] if tokenizer.eot_id in row else row
        expected += f"{prompt}{tokenizer.decode(new)}\n{SAMPLE_SEPARATOR}\n"
    assert printed == expected
    assert len(set(printed.split(SAMPLE_SEPARATOR))) > 2  # the samples differ (and there are three)


def test_sample_batch_cuts_each_sample_after_its_first_end_of_text():
    """generate repeats end-of-text after a sequence ends; each sample keeps its first one and nothing after."""
    tokenizer = load_tokenizer("byte")
    eot = tokenizer.eot_id

    class FixedModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def generate(self, idx, max_new_tokens, **sampling):
            assert idx.tolist() == [[65, 66]] * 3 and max_new_tokens == 4
            return torch.tensor(
                [[65, 66, 67, eot, eot, eot], [65, 66, 67, 68, 69, 70], [65, 66, eot, eot, eot, eot]]
            )

    samples = sample_batch(FixedModel(), tokenizer, [[65, 66]], 3, max_new_tokens=4)
    assert samples == [[67, eot], [67, 68, 69, 70], [eot]]


def test_generate_prints_each_prompt_of_one_batch_of_different_lengths(trained, capsys, tmp_path):
    """Prompts of different lengths, as arguments and from --prompts-file (one per line), with
    --num-samples 2: each prompt's samples in order, each the continuation that GPT.generate gives the
    list of prompts under the seed, cut after its first end-of-text; greedy, each prompt's continuation
    alone."""
    out, _ = trained
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("import os\nclass \n", encoding="utf-8")
    args = ["generate", "def ", "return self.", "--prompts-file", str(prompts_file), "--checkpoint", str(out)]
    args += ["--max-new-tokens", "10", "--seed", "5", "--num-samples", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    model, tokenizer = checkpoint.load_model(str(out), device="cpu", dtype=torch.float32)
    prompts = ["def ", "return self.", "import os", "class "]
    rows = [torch.tensor(tokenizer.encode(prompt)) for prompt in prompts for _ in range(2)]
    torch.manual_seed(5)
    batch = model.generate(rows, 10, temperature=0.8, eos_token_id=tokenizer.eot_id)
    expected = ""
    for prompt, ids, row in zip([p for p in prompts for _ in range(2)], rows, batch):
        expected += f"{prompt}{tokenizer.decode(row[len(ids) :].tolist())}\n{SAMPLE_SEPARATOR}\n"
    assert printed == expected
    greedy = ["generate", "def ", "return self.", "--checkpoint", str(out), "--max-new-tokens", "10"]
    assert main([*greedy, "--temperature", "0"]) == 0
    together = capsys.readouterr().out.split(f"\n{SAMPLE_SEPARATOR}\n")[:2]
    for prompt, text in zip(["def ", "return self."], together):
        assert main(["generate", prompt, *greedy[3:], "--temperature", "0"]) == 0
        assert capsys.readouterr().out == text + "\n"


# A one-block GPT at test_train_step.py's shapes (its GPU tests have compiled these kernels already).
RESUME_MODEL = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2"]
RESUME_BATCHES = ["--seq-len", "16", "--batch-size", "4", "--eval-windows", "4", "--lr", "3e-3"]


def interrupt_after_checkpoint(monkeypatch, step):
    """Makes Trainer.save raise KeyboardInterrupt (a Ctrl-C) once it has written the checkpoint of `step`."""
    save = loop.Trainer.save

    def save_then_interrupt(trainer, directory):
        save(trainer, directory)
        if trainer.step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.Trainer, "save", save_then_interrupt)


def read_run(out):
    """(trainer_state.json, {name: tensor}) of a checkpoint: the weights (named model.*), and the AdamW
    moments and step counts, the data sampler's and the torch generators' states."""
    state = json.loads((out / checkpoint.TRAINER_FILE).read_text())
    tensors = {f"model.{name}": t for name, t in load_file(str(out / "model.safetensors")).items()}
    tensors.update(load_file(str(out / checkpoint.STATE_FILE)))
    return state, tensors


def assert_resume_matches_uninterrupted(tmp_path, run, new_model, steps, interrupt_at, tolerance=None):
    """`fastgpt train` (the arguments `run`, plus `new_model` for a new model) interrupted by a Ctrl-C
    right after its checkpoint of step interrupt_at, then continued with --resume to `steps`, ends
    with the checkpoint the uninterrupted run ends with: the same losses, learning rates and
    evaluations, weights, AdamW moments and step counts, data position and generator states.
    tolerance None: all bitwise. (rtol, atol): floating-point tensors within it and losses within
    rtol, while step counts, learning rates and generator states stay exact."""
    data = tmp_path / "data.txt"
    data.write_text(Path(loop.__file__).read_text() * 2)  # ~30k byte tokens: 10% held out is plenty
    args = ["train", "--data", str(data), *run, "--steps", str(steps), "--eval-every", str(interrupt_at)]
    whole, parts = tmp_path / "uninterrupted", tmp_path / "interrupted"
    assert main([*args, *new_model, "--out", str(whole)]) == 0
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after_checkpoint(patch, interrupt_at)
        assert main([*args, *new_model, "--out", str(parts)]) == 130  # train's exit status after a Ctrl-C
    assert read_run(parts)[0]["step"] == interrupt_at
    # resumed without new_model: the architecture and dropout come from the checkpoint
    assert main([*args, "--out", str(parts), "--resume"]) == 0

    expected, expected_tensors = read_run(whole)
    resumed, resumed_tensors = read_run(parts)
    assert [h["step"] for h in resumed["history"]] == list(range(1, steps + 1))
    assert [e["step"] for e in resumed["evals"]] == list(range(0, steps + 1, interrupt_at))
    assert resumed_tensors.keys() == expected_tensors.keys()
    if tolerance is None:
        assert resumed == expected
        for name, tensor in expected_tensors.items():
            assert torch.equal(resumed_tensors[name], tensor), name
        return
    rtol, atol = tolerance
    for key in ("history", "evals"):
        for got, want in zip(resumed.pop(key), expected.pop(key), strict=True):
            assert got.keys() == want.keys()
            for field, value in want.items():
                exact = field in ("step", "lr")
                assert got[field] == (value if exact else pytest.approx(value, rel=rtol)), (key, field)
    assert resumed == expected  # settings, tokens_seen, ...
    for name, tensor in expected_tensors.items():
        if tensor.is_floating_point() and not name.endswith(".step"):
            torch.testing.assert_close(resumed_tensors[name], tensor, rtol=rtol, atol=atol, msg=name)
        else:
            assert torch.equal(resumed_tensors[name], tensor), name


def test_resume_continues_a_run_exactly(tmp_path):
    """Interrupted and resumed on CPU: bitwise the uninterrupted run, dropout masks included."""
    run = ["--device", "cpu", "--dtype", "float32", "--step-mode", "eager", *RESUME_BATCHES]
    assert_resume_matches_uninterrupted(
        tmp_path, run, [*RESUME_MODEL, "--dropout", "0.1"], steps=6, interrupt_at=3
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "step_mode, dtype, dropout, steps, interrupt_at, tolerance",
    [
        # bfloat16: the float32 master weights, the bfloat16 compute copy rebuilt from them on resume,
        # fused AdamW's moments and device step counts, and dropout's CUDA generator. Deterministic
        # kernels, as test_determinism.py's GPU training step asserts, so bitwise (if that test fails
        # too, the difference is the kernels', not the resume's)
        pytest.param("eager", "bfloat16", "0.1", 6, 3, None, id="eager-bfloat16-dropout"),
        # the uninterrupted run captures at step 4 (after 3 warm-up steps) and saves at 4 and 8; the
        # resumed one warms up on steps 5-7 from the loaded state and captures at 8, so capturable
        # AdamW's loaded state and the tensor learning rate are what its graph reads. Eager warm-up
        # steps against replays, which test_train_step.py holds to rel 1e-5 in loss; here losses and
        # float tensors within rtol 1e-4, atol 1e-5 (a lost AdamW step count or moment moves weights
        # by ~lr = 3e-3, a wrong batch or generator the loss by far more). No dropout: a replay's
        # masks are not an eager step's.
        pytest.param("cuda-graph", "float32", "0", 8, 4, (1e-4, 1e-5), id="cuda-graph-float32"),
    ],
)
def test_resume_on_cuda_matches_the_uninterrupted_gpt_run(
    tmp_path, step_mode, dtype, dropout, steps, interrupt_at, tolerance
):
    """`fastgpt train --resume` on a GPU. --step-mode compile (auto's choice there) is left out: resuming
    touches nothing it compiles (the model is loaded before the Trainer compiles it), and its two
    compilations would cost more than this test's budget; eager and cuda-graph cover the state."""
    run = ["--device", "cuda", "--dtype", dtype, "--step-mode", step_mode, *RESUME_BATCHES]
    new_model = [*RESUME_MODEL, "--dropout", dropout]
    with deterministic_algorithms() if tolerance is None else contextlib.nullcontext():
        assert_resume_matches_uninterrupted(tmp_path, run, new_model, steps, interrupt_at, tolerance)


def test_bpe_tokenizer_trains_and_generates(tmp_path, capsys):
    text = (Path(__file__).read_text() + "\n") * 4
    tokenizer_dir = bpe_files(tmp_path, text)
    (tmp_path / "data.txt").write_text(text)
    out = tmp_path / "run"
    train(out, "--steps", "2", "--data", str(tmp_path / "data.txt"), "--tokenizer", str(tokenizer_dir))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 300
    assert (out / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["generate", "def test", "--checkpoint", str(out), "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def test")


def greedy_text(checkpoint_dir, capsys, prompt="def test"):
    capsys.readouterr()
    args = [
        "generate",
        prompt,
        "--checkpoint",
        str(checkpoint_dir),
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
    ]
    assert main(args) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("tokenizer_kind", ["byte", "bpe"])
def test_export_writes_a_transformers_gpt2_with_its_tokenizer(tokenizer_kind, trained, tmp_path, capsys):
    """fastgpt export: transformers loads the directory into a GPT2LMHeadModel with the checkpoint's logits,
    and a BPE run's tokenizer with AutoTokenizer, encoding as fastgpt's does; fastgpt generate reads the
    export to the same greedy text as the checkpoint; --out may not be the checkpoint itself."""
    transformers = pytest.importorskip("transformers")
    if tokenizer_kind == "byte":
        run = trained[0]
    else:
        run = tmp_path / "run"
        text = (Path(__file__).read_text() + "\n") * 2
        (tmp_path / "data.txt").write_text(text)
        train(
            run,
            "--steps",
            "2",
            "--data",
            str(tmp_path / "data.txt"),
            "--tokenizer",
            str(bpe_files(tmp_path, text)),
        )
    out = tmp_path / "hf"
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    assert f"wrote {out}: a transformers GPT-2" in capsys.readouterr().out
    model, tokenizer = checkpoint.load_model(str(run), device="cpu", dtype=torch.float32)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert tokenizer.eot_id is not None and hf.config.eos_token_id == tokenizer.eot_id
    ids = tokenizer.encode("def test(x):\n    return x")
    idx = torch.tensor([ids])
    torch.testing.assert_close(hf(idx).logits, model.eval()(idx).detach(), rtol=0, atol=1e-5)
    if tokenizer_kind == "bpe":
        assert (
            transformers.AutoTokenizer.from_pretrained(out)("def test(x):\n    return x")["input_ids"] == ids
        )
    assert greedy_text(out, capsys) == greedy_text(run, capsys)
    assert_one_line_error(
        capsys, ["export", "--checkpoint", str(run), "--out", str(run)], r"--out must be another directory"
    )
    if tokenizer_kind == "byte":  # --dtype bfloat16: the weights rounded once, the logits close
        half = tmp_path / "hf-bf16"
        assert main(["export", "--checkpoint", str(run), "--out", str(half), "--dtype", "bfloat16"]) == 0
        assert "bfloat16) and the byte tokenizer" in capsys.readouterr().out
        assert {t.dtype for t in load_file(str(half / "model.safetensors")).values()} == {torch.bfloat16}
        rounded = transformers.GPT2LMHeadModel.from_pretrained(half).float().eval()
        expected = model.eval()(idx).detach()
        assert 0 < (rounded(idx).logits - expected).abs().max() < 0.05 * expected.abs().max()


def bpe_files(tmp_path, text):
    """tmp_path/tok: vocab.json + merges.txt (a GPT-2 directory's layout) of a 300-token byte-level BPE
    trained on text, with GPT-2's end-of-text token."""
    directory = tmp_path / "tok"
    directory.mkdir()
    byte_level_bpe([text], 300).model.save(str(directory))
    return directory


# The file names and the ends (fractions of the ids) of each file, per layout of token files.
TOKEN_FILE_LAYOUTS = {
    "nanogpt": {"train.bin": (0.0, 0.9), "val.bin": (0.9, 1.0)},
    "llmc-shards": {
        "fineweb_train_000001.bin": (0.0, 0.4),
        "fineweb_train_000002.bin": (0.4, 0.9),
        "fineweb_val_000000.bin": (0.9, 1.0),
    },
}


@pytest.mark.parametrize("layout", TOKEN_FILE_LAYOUTS)
def test_train_and_eval_on_token_files(layout, tmp_path, capsys):
    """--data with token files (nanoGPT's train.bin and val.bin, or llm.c's header-prefixed shards) of the
    ids a BPE tokenizer made trains a model sized by --tokenizer, whose checkpoint keeps the tokenizer;
    eval scores the held-out files to the training's last loss. Token files need their tokenizer, and ids
    beyond the model's vocabulary are a one-line error."""
    text = (Path(__file__).read_text() + "\n") * 2
    tokenizer_dir = bpe_files(tmp_path, text)
    ids = load_tokenizer(str(tokenizer_dir)).encode(text)
    data = tmp_path / "tokens"
    data.mkdir()
    for name, (begin, end) in TOKEN_FILE_LAYOUTS[layout].items():
        part = ids[int(begin * len(ids)) : int(end * len(ids))]
        write_token_file(data / name, part, llmc_header=layout == "llmc-shards")
    out = tmp_path / "run"
    state = train(out, "--steps", "3", "--data", str(data), "--tokenizer", str(tokenizer_dir))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 300
    assert state["data"] == str(data) and (out / "tokenizer.json").is_file()
    capsys.readouterr()
    assert (
        main(
            ["eval", "--checkpoint", str(out), "--data", str(data), "--seq-len", "32", "--max-windows", "16"]
        )
        == 0
    )
    loss = float(re.search(r"held-out loss ([\d.]+)", capsys.readouterr().out).group(1))
    assert loss == pytest.approx(state["evals"][-1]["loss"], abs=1e-4)
    assert_one_line_error(
        capsys,
        ["train", "--out", str(tmp_path / "x"), "--data", str(data)],
        r"holds token ids: pass --tokenizer",
    )
    assert_one_line_error(
        capsys,
        ["train", "--out", str(tmp_path / "y"), *TINY, *BATCHES, "--data", str(data), "--tokenizer", "byte"],
        r"the data holds token id \d+, beyond the model's vocab_size 257",
    )


def test_nanogpt_shakespeare_char_workflow(tmp_path, capsys):
    """nanoGPT's character-level data directory, as data/shakespeare_char/prepare.py leaves it (meta.pkl
    and the ids in train.bin and val.bin), trains with --data DIR --tokenizer DIR; the checkpoint keeps
    the character vocabulary, so generate continues a prompt in it with no --tokenizer."""
    text = Path(__file__).read_text() * 2
    data = tmp_path / "shakespeare_char"
    data.mkdir()
    chars = write_nanogpt_meta(data / "meta.pkl", text)
    ids = [chars.index(c) for c in text]
    cut = len(ids) * 9 // 10
    write_token_file(data / "train.bin", ids[:cut])
    write_token_file(data / "val.bin", ids[cut:])
    out = tmp_path / "out-shakespeare-char"
    train(out, "--steps", "3", "--data", str(data), "--tokenizer", str(data))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(chars)
    assert json.loads((out / "tokenizer_info.json").read_text()) == {"type": "char", "chars": chars}
    capsys.readouterr()
    assert main(["generate", "def ", "--checkpoint", str(out), "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("def ") and set(printed) <= set(chars) | {"\n"} and len(printed) == 4 + 12 + 1


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
            ["generate", "x", "--checkpoint", "{run}", "--temperature", "-1"],
            r"temperature must be",
            id="temperature",
        ),
        pytest.param(
            ["eval", "--checkpoint", "{run}", "--stride", "33"],
            r"--stride must be in \[1, 32\] \(the window\), got 33",
            id="stride",
        ),
        pytest.param(
            ["generate", "--checkpoint", "{run}"],
            r"give a prompt to continue, or --prompts-file",
            id="no-prompt",
        ),
        pytest.param(
            ["generate", "--prompts-file", "{tmp}/missing.txt", "--checkpoint", "{run}"],
            r"cannot read --prompts-file .*missing\.txt: \[Errno 2\] No such file",
            id="prompts-file-missing",
        ),
        pytest.param(
            ["generate", "x", "y" * 30, "--checkpoint", "{run}", "--max-new-tokens", "5"],
            r"the longest prompt \(30 tokens\) plus --max-new-tokens 5 exceeds the model's context window of 32",
            id="longest-prompt",
        ),
        pytest.param(
            ["generate", "x", "--checkpoint", "{run}", "--num-samples", "0"],
            r"--num-samples must be at least 1, got 0",
            id="num-samples",
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


def test_generate_refuses_token_ids_beyond_the_model_vocabulary(tmp_path, capsys):
    """A tokenizer with ids the model has no rows for (here bytes, no end-of-text, against 100 ids) is
    refused before generating: on CUDA the prompt's ids are not read, and the embedding would trip a
    device-side assert."""
    GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=100, block_size=32)).save(tmp_path)
    (tmp_path / "tokenizer_info.json").write_text(json.dumps({"type": "byte", "eot": False}))
    argv = ["generate", "x", "--checkpoint", str(tmp_path), "--max-new-tokens", "2"]
    assert_one_line_error(
        capsys, argv, r"the tokenizer produces ids up to 120, beyond the model's vocab_size 100"
    )
    assert main([*argv[:1], "a", *argv[2:]]) == 0  # byte 97 has a row


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


def test_train_activation_checkpointing_flag_says_so_and_is_recorded(tmp_path, capsys):
    state = train(tmp_path, "--steps", "2", "--eval-every", "2", "--activation-checkpointing")
    assert ", activation checkpointing\n" in capsys.readouterr().out
    assert state["settings"]["activation_checkpointing"] is True


def test_generate_goes_on_past_the_context_window(trained, capsys):
    """40 new tokens after a 4-token prompt, with a context window of 32: the text of GPT.generate, which
    predicts each token past the window from the last 32 (as nanoGPT does)."""
    out, _ = trained
    args = ["generate", "def ", "--checkpoint", str(out), "--max-new-tokens", "40", "--temperature", "0"]
    assert main(args) == 0
    model, tokenizer = checkpoint.load_model(str(out), device="cpu", dtype=torch.float32)
    ids = tokenizer.encode("def ")
    expected = model.generate(torch.tensor([ids]), 40, temperature=0, eos_token_id=tokenizer.eot_id)[0]
    assert len(expected) > model.config.block_size or tokenizer.eot_id in expected.tolist()
    assert capsys.readouterr().out == "def " + tokenizer.decode(expected[len(ids) :].tolist()) + "\n"
