"""The training library (fastgpt.train): tokenizers, data, schedule, optimizer groups, mixed precision,
gradient accumulation, and checkpoints that resume exactly and survive an interrupted save."""

import io
import itertools
import json
import os
import pickle
import types

import pytest
import rich.console
import torch
from data_files import byte_level_bpe, write_nanogpt_meta, write_token_file

from fastgpt.nn import GPT, GPTConfig
from fastgpt.train import checkpoint, loop
from fastgpt.train.data import (
    BatchSampler,
    ShardedTokens,
    eval_starts,
    read_corpus,
    read_token_data,
    read_token_file,
    split_tokens,
    stdlib_corpus,
    token_splits,
    windows,
)
from fastgpt.train.errors import UserError
from fastgpt.train.loop import Settings, Trainer, learning_rate, parameter_groups
from fastgpt.train.runtime import Runtime
from fastgpt.train.tokenizer import BPETokenizer, ByteTokenizer, StreamDecoder, from_directory, load_tokenizer

SEQ_LEN = 32
MODEL = dict(n_layer=2, n_head=4, n_embd=64, block_size=SEQ_LEN, vocab_size=257)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are too small to gain from two, and pytest-xdist runs a
    worker per core, where two threads each only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def token_split():
    tokens = ByteTokenizer().encode_documents(stdlib_corpus(max_bytes=300_000).documents)
    return split_tokens(tokens, SEQ_LEN)


def make_trainer(token_split, *, dtype=torch.float32, dropout=0.0, model=None, **settings):
    torch.manual_seed(0)
    model = model if model is not None else GPT(GPTConfig(**MODEL, dropout=dropout))
    settings = Settings(
        **{"steps": 10, "batch_size": 8, "seq_len": SEQ_LEN, "lr": 3e-3, "eval_windows": 8, **settings}
    )
    return Trainer(model, ByteTokenizer(), *token_split, settings, Runtime(torch.device("cpu"), dtype))


# ----------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer_separates_documents_with_eot():
    tokenizer = ByteTokenizer()
    tokens = tokenizer.encode_documents(["héllo", "", "ab"])
    assert tokens.dtype == torch.int32
    assert tokens.tolist() == [104, 195, 169, 108, 108, 111, 256, 256, 97, 98, 256]
    assert tokenizer.decode(tokens.tolist()) == "hélloab"
    assert ByteTokenizer(eot=False).encode_documents(["ab", "c"]).tolist() == [97, 98, 99]
    assert ByteTokenizer(eot=False).vocab_size == 256 and tokenizer.vocab_size == 257


def test_stream_decoder_holds_back_split_characters():
    """Bytes of one character arrive in separate tokens; nothing undecodable is ever printed."""
    tokenizer = ByteTokenizer()
    text = "naïve → 東京 ok"
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push([byte]) for byte in tokenizer.encode(text)] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert pieces[tokenizer.encode(text).index(0xE6)] == ""  # the first byte of 東 waits for the rest


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A tiny byte-level BPE trained here with the tokenizers package, saved both ways:
    tokenizer.json in one directory, GPT-2's vocab.json + merges.txt in another."""
    backend = byte_level_bpe(stdlib_corpus(max_bytes=100_000).documents, 400)
    root = tmp_path_factory.mktemp("bpe")
    (root / "json").mkdir()
    (root / "files").mkdir()
    backend.save(str(root / "json" / "tokenizer.json"))
    backend.model.save(str(root / "files"))
    return root


@pytest.mark.parametrize("layout", ["json", "files"])
def test_bpe_tokenizer_from_local_files(bpe_dir, layout):
    tokenizer = load_tokenizer(str(bpe_dir / layout))
    assert isinstance(tokenizer, BPETokenizer)
    text = "def add(a, b):\n    return a + b  # ünïcode\n"
    ids = tokenizer.encode(text)
    assert len(ids) < len(text.encode())  # merges apply
    assert tokenizer.decode(ids) == text
    assert tokenizer.eot_id is not None
    tokens = tokenizer.encode_documents([text, text])
    assert tokens.tolist() == ids + [tokenizer.eot_id] + ids + [tokenizer.eot_id]
    assert tokenizer.vocab_size == 400


def test_bpe_tokenizer_round_trips_through_a_checkpoint_directory(bpe_dir, tmp_path):
    tokenizer = load_tokenizer(str(bpe_dir / "files"))
    for name, data in tokenizer.files().items():
        (tmp_path / name).write_bytes(data)
    again = load_tokenizer(str(tmp_path))
    text = "import os\nprint(os.sep)\n"
    assert again.encode(text) == tokenizer.encode(text) and again.eot_id == tokenizer.eot_id


def test_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="neither 'byte' nor an existing"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="holds no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read tokenizer file"):
        load_tokenizer(str(tmp_path))


def test_eval_and_generate_need_a_tokenizer(tmp_path):
    """A checkpoint saved by GPT.save holds no tokenizer: eval/generate name the fix, and --tokenizer
    supplies one."""
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=257, block_size=8)).save(str(tmp_path))
    with pytest.raises(UserError, match="holds no tokenizer files; pass --tokenizer byte"):
        checkpoint.load_model_and_tokenizer(str(tmp_path), None, device="cpu", dtype=torch.float32)
    _, tokenizer = checkpoint.load_model_and_tokenizer(
        str(tmp_path), "byte", device="cpu", dtype=torch.float32
    )
    assert isinstance(tokenizer, ByteTokenizer)


# ----------------------------------------------------------------------------------------------
# Data


def test_directory_corpus_is_sorted_and_skips_hidden_and_binary_files(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "z.md").write_text("first")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("hidden")
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\0\0\x01")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert read_corpus(str(tmp_path)).documents == ["first", "second"]


def test_default_corpus_is_deterministic_and_capped():
    first, again = stdlib_corpus(max_bytes=200_000), stdlib_corpus(max_bytes=200_000)
    assert first.documents == again.documents
    assert 200_000 <= sum(map(len, first.documents)) < 200_000 + max(map(len, first.documents))
    assert "standard library" in first.name


def test_split_windows_and_eval_starts():
    tokens = torch.arange(1000, dtype=torch.int32)
    train, val = split_tokens(tokens, 16)
    assert len(val) == 100 and torch.equal(torch.cat([train, val]), tokens)
    inputs, targets = windows(train, torch.tensor([0, 500]), 16, vocab_size=1000)
    assert inputs.dtype == torch.int64 and inputs.shape == (2, 16)
    assert torch.equal(targets, inputs + 1) and inputs[1, 0] == 500
    with pytest.raises(UserError, match="token id 516, beyond the model's vocab_size 516"):
        windows(train, torch.tensor([0, 500]), 16, vocab_size=516)
    starts = eval_starts(val, 16, max_windows=100)
    assert len(starts) == 6 and bool((starts.diff() >= 16).all()) and starts[-1] + 16 < len(val)
    assert len(eval_starts(val, 16, max_windows=2)) == 2
    with pytest.raises(UserError, match="too small"):
        split_tokens(tokens[:100], 16)


@pytest.mark.parametrize("llmc_header", [False, True], ids=["nanogpt", "llmc"])
def test_token_files_are_read_as_the_ids_they_hold(tmp_path, llmc_header):
    """A directory with train.bin and val.bin gives those two splits; one .bin file is split as text
    is; an llm.c header is skipped; windows of uint16 tokens come out int64."""
    ids = list(range(50000, 50257)) * 4  # the top of GPT-2's vocabulary: past int16's range
    (tmp_path / "split").mkdir()
    write_token_file(tmp_path / "split" / "train.bin", ids, llmc_header)
    write_token_file(tmp_path / "split" / "val.bin", ids[:300], llmc_header)
    data = read_token_data(str(tmp_path / "split"))
    assert data.train[0].dtype == torch.uint16 and data.train[0].long().tolist() == ids
    train, val = token_splits(data, 16)
    assert val.long().tolist() == ids[:300]
    inputs, targets = windows(train, torch.tensor([3]), 16, vocab_size=50257)
    assert (
        inputs.dtype == torch.int64 and inputs[0].tolist() == ids[3:19] and targets[0].tolist() == ids[4:20]
    )
    write_token_file(tmp_path / "one.bin", ids, llmc_header)
    train, val = token_splits(read_token_data(str(tmp_path / "one.bin")), 16)
    assert len(val) == len(ids) // 10 and torch.cat([train, val]).long().tolist() == ids
    assert read_token_data(str(tmp_path / "one.txt")) is None and read_token_data(None) is None


def test_bad_token_files_are_one_line_errors(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(UserError, match="not a whole number of uint16 token ids"):
        read_token_file(str(tmp_path / "odd.bin"))
    write_token_file(tmp_path / "cut.bin", [1, 2, 3], llmc_header=True)
    with open(tmp_path / "cut.bin", "r+b") as f:
        f.truncate(256 * 4 + 2)
    with pytest.raises(UserError, match="header counts 3 tokens, but the file holds 1"):
        read_token_file(str(tmp_path / "cut.bin"))
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(UserError, match="holds no tokens"):
        read_token_file(str(tmp_path / "empty.bin"))
    (tmp_path / "short").mkdir()
    write_token_file(tmp_path / "short" / "train.bin", list(range(100)))
    write_token_file(tmp_path / "short" / "val.bin", list(range(10)))
    with pytest.raises(
        UserError, match=r"held-out files in .*short hold no window of --seq-len 16 \+ 1 tokens"
    ):
        token_splits(read_token_data(str(tmp_path / "short")), 16)
    write_token_file(tmp_path / "short" / "train_interval.bin", list(range(100)))
    with pytest.raises(UserError, match=r"train_interval\.bin matches both \*train\*\.bin and \*val\*\.bin"):
        read_token_data(str(tmp_path / "short"))


def test_shards_are_one_sequence_whose_windows_stay_inside_a_shard(tmp_path):
    """A directory of llm.c-style shards (and a shard too short for a window): every training window the
    sampler draws is a contiguous run of one shard, every shard long enough is drawn from, the held-out
    windows do not overlap and stay inside a shard, and a one-shard sequence draws what a plain tensor
    does (so runs on one file, text or token, keep their batches)."""
    lengths = {
        "fineweb_train_000001.bin": 300,
        "fineweb_train_000002.bin": 10,
        "fineweb_train_000003.bin": 120,
    }
    shards = {}
    for index, (name, length) in enumerate(lengths.items()):
        shards[name] = [1000 * (index + 1) + i for i in range(length)]  # each id names its shard and position
        write_token_file(tmp_path / name, shards[name], llmc_header=True)
    for name in ("fineweb_val_000000.bin", "fineweb_val_000001.bin"):
        write_token_file(tmp_path / name, list(range(5000, 5040)), llmc_header=True)
    train, val = token_splits(read_token_data(str(tmp_path)), 16)
    assert len(train) == 430 and train.window_count(16) == (300 - 16) + (120 - 16)
    sampler = BatchSampler(train, 16, seed=0, vocab_size=2**16)
    inputs, targets = sampler.global_batch(4000)
    rows = torch.cat([inputs, targets[:, -1:]], dim=1)  # (4000, 17): each window's ids
    assert bool((rows.diff(dim=1) == 1).all())  # contiguous, so inside one shard (ids jump between shards)
    assert set((rows[:, 0] // 1000).tolist()) == {1, 3}  # the 10-token shard holds no window
    starts = eval_starts(val, 16, max_windows=100)
    ends = starts + 16
    assert len(starts) == 3 and bool((starts[1:] >= ends[:-1]).all())  # (2 x 24 - 1) // 16 + 1 windows
    assert all(int(s) // 40 == int(e) // 40 for s, e in zip(starts, ends))  # inside one 40-token shard
    plain = torch.arange(5000, dtype=torch.int32)
    one_shard = ShardedTokens([plain])
    a, b = (
        BatchSampler(plain, 8, seed=3, vocab_size=5000),
        BatchSampler(one_shard, 8, seed=3, vocab_size=5000),
    )
    assert torch.equal(a.global_batch(64)[0], b.global_batch(64)[0])
    assert torch.equal(eval_starts(plain, 8, 50), eval_starts(one_shard, 8, 50))
    assert torch.equal(
        eval_starts(plain, 8, 50), torch.arange(50) * ((5000 - 1 - 8) // 49)
    )  # the one-file formula


class RunsACommand:
    """A pickle that would call os.system when unpickled by a plain pickle.load."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_nanogpt_character_vocabulary(tmp_path):
    """meta.pkl reads into the character tokenizer (ids are sorted characters, as prepare.py numbers them),
    which encodes, decodes and records itself in a checkpoint directory; a character outside it, a pickle
    that names a callable (never called) and a pickle of the wrong shape are one-line errors."""
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    chars = write_nanogpt_meta(tmp_path / "meta.pkl", text)
    tokenizer = load_tokenizer(str(tmp_path / "meta.pkl"))
    assert tokenizer.kind == "char" and tokenizer.vocab_size == len(chars) and tokenizer.eot_id is None
    ids = tokenizer.encode(text)
    assert ids == [chars.index(c) for c in text] and tokenizer.decode(ids) == text
    assert tokenizer.encode_documents([text, text]).tolist() == ids + ids
    assert load_tokenizer(str(tmp_path)).chars == chars  # nanoGPT's data directory, meta.pkl inside
    (tmp_path / "checkpoint").mkdir()
    for name, contents in tokenizer.files().items():
        (tmp_path / "checkpoint" / name).write_bytes(contents)
    assert from_directory(str(tmp_path / "checkpoint")).chars == chars
    with pytest.raises(UserError, match="the text holds 'Z', which this 27-character vocabulary lacks"):
        tokenizer.encode("Zounds")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(RunsACommand()))
    with pytest.raises(UserError, match=r"names posix\.system, and only plain data is read"):
        load_tokenizer(str(tmp_path / "evil.pkl"))
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")
    (tmp_path / "list.pkl").write_bytes(pickle.dumps({"itos": ["a", "b"]}))
    with pytest.raises(UserError, match="not nanoGPT's meta.pkl"):
        load_tokenizer(str(tmp_path / "list.pkl"))


def test_batch_sampler_is_reproducible_from_its_state():
    sampler = BatchSampler(torch.arange(5000, dtype=torch.int32), 8, seed=3, vocab_size=5000)
    sampler.global_batch(4)
    state = sampler.state()
    expected = sampler.global_batch(4)
    sampler.load_state(state)
    assert all(torch.equal(a, b) for a, b in zip(sampler.global_batch(4), expected))


# ----------------------------------------------------------------------------------------------
# Optimisation


def test_learning_rate_warms_up_then_decays_to_min_lr():
    settings = Settings(steps=100, lr=1.0, warmup=10)
    rates = [learning_rate(step, settings) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))  # non-increasing after warmup
    assert learning_rate(100, settings) == pytest.approx(0.1)  # min_lr = lr / 10
    assert rates[55] == pytest.approx(0.55)  # the cosine's midpoint


def test_weight_decay_applies_to_matrices_and_embeddings_only():
    model = GPT(GPTConfig(**MODEL))
    decayed, kept = parameter_groups(model, 0.1)
    assert set(decayed["names"]) == {n for n, p in model.named_parameters() if p.dim() == 2}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight"} <= set(
        decayed["names"]
    )
    assert all(n.endswith("bias") or ".ln_" in n for n in kept["names"])
    assert "lm_head.weight" not in decayed["names"]  # tied to wte: one parameter, decayed once
    assert sum(p.numel() for g in (decayed, kept) for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )  # every parameter once (num_params would leave out the padded vocabulary rows)
    assert decayed["weight_decay"] == 0.1 and kept["weight_decay"] == 0.0


def gradients_at_step(trainer):
    """Runs one train step; returns (loss, the clipped gradients the optimizer stepped with)."""
    captured, optimizer_step = [], trainer.optimizer.step

    def capturing_step():
        captured.extend(p.grad.clone() for p in trainer.model.parameters())
        optimizer_step()

    trainer.optimizer.step = capturing_step
    return trainer.train_step(), captured


def test_gradient_accumulation_matches_one_big_batch(token_split):
    """The same global batch in 1 or 4 micro-batches gives the same loss and gradients (up to float
    summation order). Compared before AdamW, which would magnify rounding in near-zero gradients."""
    whole_loss, whole = gradients_at_step(make_trainer(token_split))
    accumulated_loss, accumulated = gradients_at_step(make_trainer(token_split, grad_accum=4))
    assert accumulated_loss == pytest.approx(whole_loss, rel=1e-6)
    for a, b in zip(accumulated, whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_bfloat16_compute_keeps_float32_master_weights(token_split):
    trainer = make_trainer(token_split, dtype=torch.bfloat16)
    assert trainer.compute_model is not trainer.model
    before = [p.detach().clone() for p in trainer.model.parameters()]
    losses = [trainer.train_step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    for master, compute, old in zip(trainer.model.parameters(), trainer.compute_model.parameters(), before):
        assert master.dtype == torch.float32 and compute.dtype == torch.bfloat16
        assert torch.equal(compute, master.to(torch.bfloat16))  # the compute copy follows every step
        assert not torch.equal(master, old)
    assert trainer.evaluate() < losses[0]


# ----------------------------------------------------------------------------------------------
# Checkpoints


def test_resume_reproduces_the_next_step_exactly(token_split, tmp_path):
    """Weights, AdamW moments, the data order and the dropout RNG all come back: the step after a
    resume is bitwise the step the uninterrupted run takes."""
    trainer = make_trainer(token_split, dropout=0.1)
    for _ in range(3):
        trainer.train_step()
    trainer.save(str(tmp_path))
    expected_loss = trainer.train_step()
    expected_params = [p.detach().clone() for p in trainer.model.parameters()]

    model, tokenizer = checkpoint.load_model(str(tmp_path), device="cpu", dtype=torch.float32)
    assert tokenizer.info() == ByteTokenizer().info()
    resumed = make_trainer(token_split, dropout=0.1, model=model)
    resumed.resume(str(tmp_path))
    assert resumed.step == 3 and len(resumed.history) == 3
    assert resumed.train_step() == expected_loss
    for actual, expected in zip(resumed.model.parameters(), expected_params):
        assert torch.equal(actual, expected)


def test_checkpoint_is_loadable_by_gpt_load(token_split, tmp_path):
    trainer = make_trainer(token_split)
    trainer.train_step()
    trainer.save(str(tmp_path))
    loaded = GPT.load(str(tmp_path))
    for (name, a), b in zip(trainer.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["settings"]["lr"] == 3e-3 and len(state["history"]) == 1


def test_interrupted_save_keeps_the_previous_checkpoint(token_split, tmp_path, monkeypatch):
    trainer = make_trainer(token_split)
    trainer.train_step()
    trainer.save(str(tmp_path))
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    trainer.train_step()

    def interrupted(fd):
        raise KeyboardInterrupt  # Ctrl-C while the new files are being written

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.save(str(tmp_path))
    monkeypatch.undo()
    assert {
        name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)
    } == before  # no temp files left
    assert checkpoint.load_training_state(str(tmp_path))[0]["step"] == 1


def test_checkpoint_mixing_two_saves_is_refused(token_split, tmp_path):
    trainer = make_trainer(token_split)
    trainer.train_step()
    trainer.save(str(tmp_path / "one"))
    trainer.train_step()
    trainer.save(str(tmp_path / "two"))
    os.replace(tmp_path / "one" / "model.safetensors", tmp_path / "two" / "model.safetensors")
    with pytest.raises(UserError, match="mixes files of different steps"):
        checkpoint.load_training_state(str(tmp_path / "two"))


class _WarmingTrainer:
    """fit's view of a Trainer whose first `untimed_steps` steps take 10 s each (compilation, capture)
    and the rest 1 s, on a fake clock."""

    tokens_per_step = 100

    def __init__(self, steps, untimed_steps, clock):
        self.settings = types.SimpleNamespace(steps=steps, eval_every=1000)
        self.step, self.untimed_steps, self.clock = 0, untimed_steps, clock

    def evaluate(self):
        return 1.0

    def save(self, out_dir):
        pass

    def train_step(self):
        self.step += 1
        self.clock.now += 10.0 if self.step <= self.untimed_steps else 1.0
        return 1.0


@pytest.mark.parametrize(
    ("steps", "untimed_steps", "tokens_per_s"), [(6, 3, 100.0), (6, 1, 100.0), (2, 3, 100 / 10)]
)
def test_fit_leaves_warm_up_steps_out_of_tokens_per_second(
    monkeypatch, tmp_path, steps, untimed_steps, tokens_per_s
):
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock.now)
    trainer = _WarmingTrainer(steps, untimed_steps, clock)
    console = rich.console.Console(file=io.StringIO())
    assert loop.fit(trainer, tmp_path, console) == pytest.approx(tokens_per_s)


# ----------------------------------------------------------------------------------------------
# Activation checkpointing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_activation_checkpointing_trains_to_the_same_losses(token_split, dtype):
    """Settings(activation_checkpointing=True) reaches the model that computes (the bfloat16 copy under
    mixed precision) and changes no loss of a run with dropout: the same steps, bit for bit."""
    plain = make_trainer(token_split, dtype=dtype, dropout=0.1)
    plain_losses = [plain.train_step() for _ in range(3)]  # before the next Trainer seeds torch again
    checkpointed = make_trainer(token_split, dtype=dtype, dropout=0.1, activation_checkpointing=True)
    assert checkpointed.compute_model.activation_checkpointing
    assert not plain.compute_model.activation_checkpointing
    assert [checkpointed.train_step() for _ in range(3)] == plain_losses
    assert checkpointed.trainer_state()["settings"]["activation_checkpointing"] is True


def test_activation_checkpointing_with_dropout_is_refused_in_a_captured_step(token_split):
    """torch cannot read the CUDA random state inside a graph capture, which recomputed dropout needs:
    refused before anything is built (a CUDA runtime is named; nothing touches the device first)."""
    model = GPT(GPTConfig(**MODEL, dropout=0.1))
    settings = Settings(steps=2, batch_size=8, seq_len=SEQ_LEN, activation_checkpointing=True)
    with pytest.raises(
        UserError, match=r"--activation-checkpointing with dropout cannot run in --step-mode cuda-graph"
    ):
        Trainer(
            model, ByteTokenizer(), *token_split, settings, Runtime(torch.device("cuda"), torch.float32),
            step_mode="cuda-graph",
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Sliding-window evaluation


def test_strided_windows_score_every_token_once_per_shard():
    """Windows of seq_len + 1 tokens every stride tokens, the last ending at its shard's end; the
    targets from first_scored on cover every token of a shard but its first, once; a shard too short
    for a window gives none."""
    tokens = ShardedTokens([torch.arange(20), torch.arange(7), torch.arange(3)])
    starts, first_scored = tokens.strided_windows(4, 2)
    assert starts.tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 15, 20, 22]
    assert first_scored.tolist() == [0, 2, 2, 2, 2, 2, 2, 2, 3, 0, 2]
    for seq_len, stride in ((4, 2), (4, 4), (4, 1), (6, 5)):
        starts, first_scored = tokens.strided_windows(seq_len, stride)
        scored = [int(s) + 1 + j for s, f in zip(starts, first_scored) for j in range(int(f), seq_len)]
        assert sorted(scored) == scored and len(set(scored)) == len(scored)  # in order, once each
        assert scored == [p for p in range(1, 20)] + [p for p in range(21, 27)], (seq_len, stride)
        assert (first_scored[1:] >= 0).all() and (seq_len - first_scored >= 1).all()


def sliding_window_loss(model, tokens, seq_len, stride):
    """transformers' sliding-window perplexity loop written out on one sequence: windows every stride
    tokens (the last ending at the end), each adding the negative log-likelihood of the targets no
    earlier window scored; returns (sum, count)."""
    total, count, scored_until, begin = 0.0, 0, 0, 0
    with torch.no_grad():
        while True:
            begin = min(begin, len(tokens) - seq_len - 1)
            window = tokens[begin : begin + seq_len + 1].long()
            logits = model(window[None, :-1])[0].double()  # (seq_len, V)
            nll = torch.nn.functional.cross_entropy(logits, window[1:], reduction="none")
            new = begin + seq_len - scored_until
            total, count, scored_until = total + float(nll[-new:].sum()), count + new, begin + seq_len
            if begin + seq_len + 1 >= len(tokens):
                return total, count
            begin += stride


@pytest.mark.parametrize("stride", [SEQ_LEN, SEQ_LEN // 4, 1])
def test_strided_evaluation_matches_the_sliding_window_loop(stride):
    """evaluate with strided windows (batched, the targets before first_scored ignored) gives the loss of
    the plain sliding-window loop, over two shards, in batches that mix windows of both."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL)).eval()
    shards = [
        torch.randint(0, 257, (150,), dtype=torch.int32),
        torch.randint(0, 257, (61,), dtype=torch.int32),
    ]
    tokens = ShardedTokens(shards)
    starts, first_scored = tokens.strided_windows(SEQ_LEN, stride)
    loss = loop.evaluate(
        model, tokens, starts, SEQ_LEN, 5, Runtime(torch.device("cpu"), torch.float32), first_scored
    )
    parts = [sliding_window_loss(model, shard, SEQ_LEN, stride) for shard in shards]
    assert sum(count for _, count in parts) == 150 + 61 - 2
    assert loss == pytest.approx(sum(total for total, _ in parts) / (150 + 61 - 2), rel=1e-5)
