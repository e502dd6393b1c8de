"""Checkpoints: damaged or mismatched files give a clear error and no half-loaded model; saving is
atomic.

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
