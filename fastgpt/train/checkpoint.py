"""Checkpoint directories: reading models (fastgpt's own, a local transformers GPT-2, or nanoGPT's out_dir
with its ckpt.pt) and writing
training checkpoints that an interruption cannot leave half-written.

A training checkpoint is `fastgpt.nn.GPT.save`'s format plus the tokenizer and the training state:

    config.json                 GPTConfig                                  (GPT.load reads these two)
    model.safetensors           float32 weights; a tied LM head is stored once
    tokenizer_info.json         the tokenizer (and tokenizer.json for BPE)
    training_state.safetensors  AdamW moments and RNG states (tensors)
    trainer_state.json          step, schedule, settings and loss history (scalars)

No pickle anywhere. Every file of a save is first written in full to a temporary file next to its
final name and synced; only then are they renamed over the old ones (os.replace is atomic; see
fastgpt.nn.weights.write_files), so an interrupted run keeps the previous checkpoint. Both
safetensors files and trainer_state.json carry the step, and resuming refuses a directory whose
files disagree.
"""

import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from fastgpt.nn import GPT
from fastgpt.nn.weights import (
    CONFIG_FILE,
    HF_PICKLE_INDEX_FILE,
    HF_PICKLE_WEIGHTS_FILE,
    NANOGPT_CHECKPOINT_FILE,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    CheckpointError,
    checkpoint_tensors,
    write_files,
)
from fastgpt.train import tokenizer as tokenizers
from fastgpt.train.errors import UserError

STATE_FILE = "training_state.safetensors"
TRAINER_FILE = "trainer_state.json"


# ----------------------------------------------------------------------------------------------
# Writing


def model_files(model, step):
    """config.json and model.safetensors in GPT.save's format (weights.checkpoint_tensors), as bytes."""
    state = {
        name: tensor.to("cpu", torch.float32).contiguous()
        for name, tensor in checkpoint_tensors(model).items()
    }
    return {
        CONFIG_FILE: json.dumps(model.config.to_dict(), indent=2).encode(),
        WEIGHTS_FILE: safetensors_bytes(state, metadata={"format": "pt", "step": str(step)}),
    }


def save_training_checkpoint(directory, model, tokenizer, state_tensors, trainer_state):
    """One consistent training checkpoint; the files are ordered so trainer_state.json is renamed last."""
    step = trainer_state["step"]
    files = {STATE_FILE: safetensors_bytes(state_tensors, metadata={"step": str(step)})}
    files.update(model_files(model, step))
    files.update(tokenizer.files())
    files[TRAINER_FILE] = json.dumps(trainer_state, indent=2).encode()
    write_files(directory, files)


# ----------------------------------------------------------------------------------------------
# Reading


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not a readable JSON file ({error})") from None


def _require_file(directory, name, what):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {directory} lacks {name} ({what})")
    return path


def _require_directory(directory):
    if not os.path.isdir(directory):
        raise UserError(f"checkpoint directory {directory} does not exist")


def add_source_arguments(parser):
    """--checkpoint and --tokenizer, shared by generate, eval and export (load_model_and_tokenizer's)."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="a fastgpt checkpoint, a local HF GPT-2 directory or nanoGPT's out_dir (ckpt.pt)",
    )
    parser.add_argument("--tokenizer", help="override the checkpoint's tokenizer: 'byte' or a tokenizer path")


def is_nanogpt_directory(directory):
    """nanoGPT's out_dir: its ckpt.pt, and no config.json (which fastgpt's and transformers' have)."""
    return os.path.isfile(os.path.join(directory, NANOGPT_CHECKPOINT_FILE)) and not os.path.isfile(
        os.path.join(directory, CONFIG_FILE)
    )


def is_transformers_directory(directory):
    """A transformers checkpoint's config.json names its model_type; fastgpt's GPTConfig has none."""
    return "model_type" in _read_json(_require_file(directory, CONFIG_FILE, "the model's configuration"))


def load_model(directory, *, device, dtype, backend="auto", **overrides):
    """(GPT, tokenizer or None) from a fastgpt checkpoint, a local transformers GPT-2 directory or
    nanoGPT's out_dir, on device in dtype; overrides set GPTConfig fields (dropout). Missing, corrupt or
    mismatched files raise UserError."""
    _require_directory(directory)
    overrides["backend"] = backend
    if is_nanogpt_directory(directory):
        model = _load_nanogpt(directory, overrides)
    elif is_transformers_directory(directory):
        model = _load_transformers(directory, overrides)
    else:
        model = _load_fastgpt(directory, overrides)
    model = model.to(device=device, dtype=dtype)
    return model, tokenizers.from_directory(directory)


def load_model_and_tokenizer(directory, tokenizer_path, *, device, dtype, backend="auto"):
    """load_model for eval and generate, which need a tokenizer: the one at tokenizer_path ('byte' or a
    tokenizer path) when given, else the checkpoint's; UserError when there is neither."""
    model, tokenizer = load_model(directory, device=device, dtype=dtype, backend=backend)
    if tokenizer_path:
        tokenizer = tokenizers.load_tokenizer(tokenizer_path)
    if tokenizer is None:
        raise UserError(f"{directory} holds no tokenizer files; pass --tokenizer byte or a tokenizer path")
    return model, tokenizer


def _load_fastgpt(directory, overrides):
    _require_file(directory, WEIGHTS_FILE, "the model's weights")
    try:
        return GPT.load(directory, **overrides)
    except CheckpointError as error:  # corrupt files, an invalid config.json, tensors that do not fit it
        raise UserError(str(error)) from None


def _load_nanogpt(directory, overrides):
    try:
        return GPT.from_nanogpt(os.path.join(directory, NANOGPT_CHECKPOINT_FILE), **overrides)
    except CheckpointError as error:  # unreadable, not nanoGPT's layout, or tensors that do not fit
        raise UserError(str(error)) from None


def _load_transformers(directory, overrides):
    has_weights = any(
        os.path.isfile(os.path.join(directory, n))
        for n in (WEIGHTS_FILE, WEIGHTS_INDEX_FILE, HF_PICKLE_WEIGHTS_FILE, HF_PICKLE_INDEX_FILE)
    )
    if not has_weights:
        raise UserError(
            f"checkpoint {directory} lacks {WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE} with its shards, "
            f"{HF_PICKLE_WEIGHTS_FILE} or {HF_PICKLE_INDEX_FILE}), the model's weights"
        )
    try:
        return GPT.from_hf(directory, **overrides)
    except CheckpointError as error:  # a corrupt weights file, tensors that do not fit config.json
        raise UserError(str(error)) from None
    except ValueError as error:  # a GPT-2 variant this model does not implement
        raise UserError(str(error)) from None


def load_training_state(directory):
    """(trainer_state dict, state tensors) of a training checkpoint, checked to come from one save."""
    _require_directory(directory)
    trainer_path = _require_file(
        directory, TRAINER_FILE, "the training progress; was it written by `fastgpt train`?"
    )
    state_path = _require_file(directory, STATE_FILE, "the optimizer and RNG state")
    trainer_state = _read_json(trainer_path)
    steps = {TRAINER_FILE: trainer_state.get("step")}
    try:
        for name in (STATE_FILE, WEIGHTS_FILE):
            with safe_open(_require_file(directory, name, "part of the checkpoint"), "pt") as f:
                steps[name] = int((f.metadata() or {}).get("step", -1))
        tensors = load_file(state_path)
    except SafetensorError as error:
        raise UserError(f"a safetensors file in {directory} is corrupt ({error})") from None
    if len(set(steps.values())) != 1:
        raise UserError(
            f"checkpoint {directory} mixes files of different steps {steps}: a save was interrupted"
        )
    return trainer_state, tensors
