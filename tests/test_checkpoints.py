"""Checkpoints: damaged or mismatched files give a clear error and no half-loaded model; saving is
atomic; nanoGPT's ckpt.pt loads to the logits of nanoGPT's forward.

- GPT.load (and GPT.from_hf on a directory) raise weights.CheckpointError, a ValueError, naming the
  file and the tensor, for a truncated, corrupt or empty model.safetensors, a missing or unreadable
  config.json, a config.json that disagrees with the tensors (shapes, missing and extra tensors), and
  non-float tensors. They build the model only after every check passed, so no model exists on error.
- GPT.load_state_dict checks names and shapes first, so a state dict that does not fit leaves every
  parameter as it was (torch's own load_state_dict copies the tensors that fit, then raises).
- GPT.save writes temporary files and renames them into place: a crash mid-save keeps the previous
  checkpoint intact and leaves no temporary file.
- The CLI turns each of these into its one-line error.
"""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastgpt import cli
from fastgpt.nn import GPT, GPTConfig, weights
from fastgpt.nn.weights import CheckpointError

SMALL = {"block_size": 32, "vocab_size": 97, "n_layer": 2, "n_head": 4, "n_embd": 32}


def small_model(**overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**SMALL, **overrides}))


@pytest.fixture
def saved(tmp_path):
    """A directory holding a saved small GPT, and that GPT."""
    model = small_model()
    directory = tmp_path / "model"
    model.save(directory)
    return directory, model


def edit_config(directory, **fields):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def edit_tensors(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def truncate(directory):
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# Each case damages the saved directory; the error must be a ValueError naming what the regexes say.
DAMAGE = [
    pytest.param(truncate, [r"model\.safetensors", r"is corrupt or not a safetensors file"], id="truncated"),
    pytest.param(
        lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096)),
        [r"model\.safetensors", r"is corrupt"],
        id="random-bytes",
    ),
    pytest.param(lambda d: (d / "model.safetensors").write_bytes(b""), [r"model\.safetensors", r"is corrupt"], id="empty-file"),
    pytest.param(lambda d: (d / "model.safetensors").unlink(), [r"model\.safetensors", r"does not exist"], id="weights-missing"),
    pytest.param(lambda d: (d / "config.json").unlink(), [r"config\.json", r"does not exist"], id="config-missing"),
    pytest.param(
        lambda d: (d / "config.json").write_text('{"n_embd": 32,'), [r"config\.json", r"not a readable JSON file"], id="config-not-json"
    ),
    pytest.param(lambda d: (d / "config.json").write_text("[1, 2]"), [r"config\.json", r"must hold a JSON object, got list"], id="config-not-object"),
    pytest.param(
        lambda d: edit_config(d, n_embd=48, n_head=4),
        [r"model\.safetensors", r"tensor [\w.]+ must have shape \(\d+(, \d+)?\)", r"got \(\d+(, \d+)?\)"],
        id="n_embd-differs-from-tensors",
    ),
    pytest.param(
        lambda d: edit_config(d, n_layer=3),
        [r"model\.safetensors", r"missing tensors: transformer\.h\.2\.", r"and \d+ more"],
        id="more-layers-than-tensors",
    ),
    pytest.param(
        lambda d: edit_tensors(d, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias")),
        [r"model\.safetensors", r"does not match .*config\.json", r"missing tensors: transformer\.h\.1\.mlp\.c_fc\.bias\)"],
        id="missing-tensor",
    ),
    pytest.param(
        lambda d: edit_tensors(d, lambda t: t.update({"transformer.h.0.extra": torch.zeros(3)})),
        [r"model\.safetensors", r"unexpected tensors: transformer\.h\.0\.extra"],
        id="extra-tensor",
    ),
    pytest.param(
        lambda d: edit_tensors(d, lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"].clone()})),
        [r"model\.safetensors holds lm_head\.weight", r"tie_weights=true"],
        id="tied-head-stored-twice",
    ),
    pytest.param(
        lambda d: edit_tensors(d, lambda t: t.update({"transformer.ln_f.weight": t["transformer.ln_f.weight"].long()})),
        [r"model\.safetensors", r"transformer\.ln_f\.weight must be floating-point", r"got dtype torch\.int64"],
        id="integer-tensor",
    ),
    pytest.param(
        lambda d: edit_config(d, n_head=5),
        [r"config\.json is not a valid GPTConfig", r"n_embd must be divisible by n_head"],
        id="config-invalid",
    ),
    pytest.param(
        lambda d: edit_config(d, n_experts=8),
        [r"config\.json is not a valid GPTConfig", r"n_experts"],
        id="config-unknown-field",
    ),
]  # fmt: skip


@pytest.mark.parametrize("damage, patterns", DAMAGE)
def test_gpt_load_refuses_a_damaged_checkpoint(saved, damage, patterns):
    directory, _ = saved
    damage(directory)
    with pytest.raises(ValueError) as caught:
        GPT.load(directory)
    assert isinstance(caught.value, CheckpointError)
    message = str(caught.value)
    assert str(directory) in message, message
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"


@pytest.mark.parametrize(
    "damage, pattern",
    [
        pytest.param(truncate, r"model\.safetensors is corrupt", id="truncated"),
        pytest.param(lambda d: edit_config(d, n_embd=48), r"tensor \S+ must have shape", id="mismatched-config"),
        pytest.param(lambda d: edit_tensors(d, lambda t: t.pop("transformer.wpe.weight")), r"missing tensors: transformer\.wpe\.weight", id="missing-tensor"),
        pytest.param(lambda d: edit_tensors(d, lambda t: t.update({"head.extra": torch.ones(2)})), r"unexpected tensors: head\.extra", id="extra-tensor"),
    ],
)  # fmt: skip
def test_cli_reports_a_damaged_checkpoint_in_one_line(saved, capsys, damage, pattern):
    directory, _ = saved
    damage(directory)
    assert cli.main(["eval", "--checkpoint", str(directory)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastgpt eval: error: "), err
    assert re.search(pattern, err) and str(directory) in err, err
    assert "Traceback" not in err


def test_from_hf_directory_with_a_mismatched_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=1, n_head=4)
    )
    hf.save_pretrained(tmp_path)  # model.safetensors
    edit_config(tmp_path, n_embd=64)
    with pytest.raises(CheckpointError, match=r"GPT\.from_hf: .*tensor \S+ must have shape \(\d+, 64\)"):
        GPT.from_hf(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# load_state_dict into an existing model


def parameters_of(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "strict, break_state",
    [
        pytest.param(True, lambda s: s.pop("transformer.h.1.attn.c_proj.weight"), id="missing-tensor"),
        pytest.param(True, lambda s: s.update({"transformer.extra": torch.zeros(1)}), id="extra-tensor"),
        pytest.param(
            True, lambda s: s.update({"transformer.h.1.ln_2.bias": torch.zeros(31)}), id="wrong-shape"
        ),
        pytest.param(
            False,
            lambda s: s.update({"transformer.h.1.ln_2.bias": torch.zeros(31)}),
            id="wrong-shape-not-strict",
        ),
    ],
)
def test_load_state_dict_is_all_or_nothing(strict, break_state):
    model, other = small_model(), GPT(GPTConfig(**SMALL))
    state = other.state_dict()
    break_state(state)
    before = parameters_of(model)
    with pytest.raises(RuntimeError) as caught:  # torch's type for this; CheckpointError is a ValueError too
        model.load_state_dict(state, strict=strict)
    assert isinstance(caught.value, CheckpointError)
    assert "load_state_dict" in str(caught.value)
    for name, tensor in parameters_of(model).items():
        assert torch.equal(tensor, before[name]), f"{name} changed by a failed load_state_dict"
    # What the check prevents: torch's own load_state_dict copies every tensor that fits first.
    with pytest.raises(RuntimeError):
        torch.nn.Module.load_state_dict(model, state, strict=strict)
    assert not torch.equal(model.transformer.wte.weight, before["transformer.wte.weight"])


def test_load_state_dict_still_loads_what_fits():
    model, other = small_model(), GPT(GPTConfig(**SMALL))
    model.load_state_dict(other.state_dict())
    for name, tensor in other.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    subset = {"transformer.ln_f.bias": torch.full((32,), 3.0)}
    result = model.load_state_dict(subset, strict=False)
    assert torch.equal(model.transformer.ln_f.bias, subset["transformer.ln_f.bias"])
    assert "transformer.wte.weight" in result.missing_keys


# ----------------------------------------------------------------------------------------------
# Atomic saving


def snapshot(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def crash_writing_weights(monkeypatch):
    """safetensors' writer dies after writing half its file, as a killed process would."""

    def half_written(tensors, path, metadata=None):
        save_file(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", half_written)


def crash_at_first_rename(monkeypatch):
    def no_rename(source, destination):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", no_rename)


def crash_syncing(monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)


@pytest.mark.parametrize(
    "crash, error",
    [
        pytest.param(crash_writing_weights, KeyboardInterrupt, id="mid-write"),
        pytest.param(crash_syncing, KeyboardInterrupt, id="before-sync"),
        pytest.param(crash_at_first_rename, OSError, id="at-rename"),
    ],
)
def test_interrupted_save_keeps_the_previous_checkpoint(saved, monkeypatch, crash, error):
    directory, model = saved
    before = snapshot(directory)
    newer = small_model(n_embd=48)  # a different model, so a half-applied save could not go unnoticed
    crash(monkeypatch)
    with pytest.raises(error):
        newer.save(directory)
    monkeypatch.undo()
    assert snapshot(directory) == before  # the same files, byte for byte, and no temporary ones
    loaded = GPT.load(directory)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_save_replaces_a_previous_checkpoint(saved):
    directory, _ = saved
    newer = small_model(n_embd=48)
    newer.save(directory)
    assert sorted(os.listdir(directory)) == [weights.CONFIG_FILE, weights.WEIGHTS_FILE]
    loaded = GPT.load(directory)
    assert loaded.config == newer.config
    for name, tensor in newer.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


# ----------------------------------------------------------------------------------------------
# nanoGPT's ckpt.pt


def nanogpt_state(model_args, compiled, generator):
    """A state dict as nanoGPT's model.py holds one, random (std 0.1), built here from its layer shapes:
    tied wte / lm_head, biases only with bias=True, torch.compile's prefix when compiled, and the causal
    mask buffer its attention registers under torch < 2."""
    C, V, L = model_args["n_embd"], model_args["vocab_size"], model_args["block_size"]
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (L, C)}
    for i in range(model_args["n_layer"]):
        block = f"transformer.h.{i}"
        for name, rows, cols in (
            ("attn.c_attn", 3 * C, C),
            ("attn.c_proj", C, C),
            ("mlp.c_fc", 4 * C, C),
            ("mlp.c_proj", C, 4 * C),
        ):
            shapes[f"{block}.{name}.weight"] = (rows, cols)
            if model_args["bias"]:
                shapes[f"{block}.{name}.bias"] = (rows,)
        for name in ("ln_1", "ln_2"):
            shapes[f"{block}.{name}.weight"] = (C,)
            if model_args["bias"]:
                shapes[f"{block}.{name}.bias"] = (C,)
    shapes["transformer.ln_f.weight"] = (C,)
    if model_args["bias"]:
        shapes["transformer.ln_f.bias"] = (C,)
    state = {name: 0.1 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    for name in shapes:
        if ".ln_" in name and name.endswith(".weight"):
            state[name] += 1.0
    state["lm_head.weight"] = state["transformer.wte.weight"]  # one tensor, as nanoGPT ties them
    state["transformer.h.0.attn.bias"] = torch.ones(L, L).tril().view(1, 1, L, L)
    prefix = "_orig_mod." if compiled else ""
    return {prefix + name: tensor for name, tensor in state.items()}


def nanogpt_logits(state, model_args, idx):
    """nanoGPT's GPT.forward written out on its state dict: pre-LN blocks, causal attention, exact GELU
    (its nn.GELU()), LayerNorm eps 1e-5, the tied head, logits at every position."""
    C, heads = model_args["n_embd"], model_args["n_head"]
    state = {name.removeprefix("_orig_mod."): tensor for name, tensor in state.items()}

    def layer_norm(x, name):
        return torch.nn.functional.layer_norm(
            x, (C,), state[f"{name}.weight"], state.get(f"{name}.bias"), 1e-5
        )

    def linear(x, name):
        return torch.nn.functional.linear(x, state[f"{name}.weight"], state.get(f"{name}.bias"))

    batch, seq = idx.shape
    x = state["transformer.wte.weight"][idx] + state["transformer.wpe.weight"][:seq]  # (B, T, C)
    for i in range(model_args["n_layer"]):
        block = f"transformer.h.{i}"
        q, k, v = linear(layer_norm(x, f"{block}.ln_1"), f"{block}.attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(batch, seq, heads, C // heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + linear(y.transpose(1, 2).reshape(batch, seq, C), f"{block}.attn.c_proj")
        hidden = torch.nn.functional.gelu(linear(layer_norm(x, f"{block}.ln_2"), f"{block}.mlp.c_fc"))
        x = x + linear(hidden, f"{block}.mlp.c_proj")
    return torch.nn.functional.linear(layer_norm(x, "transformer.ln_f"), state["lm_head.weight"])


def save_nanogpt_checkpoint(directory, *, bias=True, compiled=False, vocab_size=65):
    """nanoGPT's train.py checkpoint in directory/ckpt.pt; returns (state, model_args)."""
    model_args = dict(
        n_layer=2, n_head=4, n_embd=32, block_size=32, bias=bias, vocab_size=vocab_size, dropout=0.2
    )
    state = nanogpt_state(model_args, compiled, torch.Generator().manual_seed(0))
    checkpoint = {
        "model": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 6e-4, "params": [0, 1]}]},
        "model_args": model_args,
        "iter_num": 250,
        "best_val_loss": torch.tensor(1.4697),
        "config": {"batch_size": 64, "compile": compiled, "dataset": "shakespeare_char"},
    }
    directory.mkdir(exist_ok=True)
    torch.save(checkpoint, directory / "ckpt.pt")
    return state, model_args


@pytest.mark.parametrize("bias, compiled", [(True, False), (False, True)], ids=["bias", "no-bias-compiled"])
def test_from_nanogpt_computes_nanogpts_logits(tmp_path, bias, compiled):
    """GPT.from_nanogpt reads train.py's ckpt.pt (with or without biases, from a compiled model or not,
    with the old mask buffer) into a GPT whose logits are nanoGPT's forward's on the same tensors."""
    state, model_args = save_nanogpt_checkpoint(tmp_path, bias=bias, compiled=compiled)
    gpt = GPT.from_nanogpt(tmp_path / "ckpt.pt", backend="reference")
    assert gpt.config.activation == "gelu" and gpt.config.bias == bias and gpt.config.dropout == 0.0
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    idx = torch.randint(0, 65, (2, 20))
    torch.testing.assert_close(gpt(idx), nanogpt_logits(state, model_args, idx), rtol=0, atol=1e-5)


def test_nanogpt_out_dir_serves_the_cli(tmp_path, capsys):
    """fastgpt generate and export take nanoGPT's out_dir (the export then loads to the same logits); a
    ckpt.pt that is not nanoGPT's, or not a checkpoint at all, is a one-line error."""
    out = tmp_path / "out-nano"
    save_nanogpt_checkpoint(out, vocab_size=257)
    assert (
        cli.main(["generate", "ab", "--checkpoint", str(out), "--tokenizer", "byte", "--max-new-tokens", "4"])
        == 0
    )
    assert capsys.readouterr().out.startswith("ab")
    assert (
        cli.main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "hf"), "--tokenizer", "byte"])
        == 0
    )
    idx = torch.randint(0, 257, (1, 9))
    expected = GPT.from_nanogpt(out / "ckpt.pt")(idx)
    torch.testing.assert_close(GPT.from_hf(tmp_path / "hf")(idx), expected, rtol=0, atol=1e-6)
    torch.save({"model": {}}, out / "ckpt.pt")
    capsys.readouterr()
    assert cli.main(["generate", "ab", "--checkpoint", str(out), "--tokenizer", "byte"]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and re.search(r"ckpt\.pt: its 'model_args' lack n_layer", error), error
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert cli.main(["generate", "ab", "--checkpoint", str(out), "--tokenizer", "byte"]) == 1
    assert "is not a readable torch checkpoint" in capsys.readouterr().err
