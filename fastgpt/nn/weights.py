"""Reading weights into a GPT: transformers GPT-2 checkpoints (a model object or a local directory),
nanoGPT's ckpt.pt, and fastgpt's own safetensors + JSON format; and writing a GPT as a transformers
GPT-2 directory (save_hf). Nothing here downloads, and nothing here imports transformers.

Loading is all or nothing: files are read and every tensor's name, shape and dtype is checked
against the configuration before any parameter is made or changed, and a problem raises
CheckpointError naming the file and the tensor. Saving is atomic: a crash mid-save leaves the
previous files in place (see write_files).

Vocabulary padding: a GPT allocates its token embedding and LM head with config.padded_vocab_size
rows, but checkpoints (fastgpt's, GPT-2's, nanoGPT's) hold vocab_size rows. Saving cuts the padded
rows off (checkpoint_tensors) and loading appends zero rows again (pad_vocab_rows), so files keep
GPT-2's shapes and those written before padding existed still load.
"""

import json
import os
import pickle
from collections import OrderedDict

import torch

from fastgpt.nn.config import GPT2_VOCAB_SIZE, GPTConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# transformers' sharded save (save_pretrained above max_shard_size, 5 GB before transformers 5: GPT-2 XL
# in float32): {"weight_map": {tensor name: shard file}} beside the shard files, safetensors or pickles.
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
HF_PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"
HF_PICKLE_WEIGHTS_FILE = "pytorch_model.bin"

# transformers' GPT-2 activation names -> fastgpt's fused activations (gelu_new is the tanh approximation).
HF_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}

# fastgpt's activations -> the transformers GPT-2 names save_hf writes (the inverse of HF_ACTIVATIONS).
ACTIVATIONS_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
GPT2_EOS_TOKEN_ID = 50256  # <|endoftext|>, the last of GPT-2's 50257 tokens

# HF GPT-2 stores these projections as Conv1D, whose weight is (in_features, out_features).
CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# nanoGPT's train.py saves {"model": state dict, "model_args": {...}, "optimizer": ..., ...} as ckpt.pt in
# its out_dir; the model's names are fastgpt's, behind torch.compile's wrapper prefix when it compiled.
NANOGPT_CHECKPOINT_FILE = "ckpt.pt"
NANOGPT_ARCHITECTURE = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
COMPILED_PREFIX = "_orig_mod."
# Causal-mask buffers that old GPT-2 checkpoints (and nanoGPT's under torch < 2) carry; they hold no
# learned values.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
BODY_PREFIXES = ("h.", "wte.", "wpe.", "ln_f.")
# The tensors with one row per token id: padded_vocab_size rows in a GPT, vocab_size in a checkpoint.
VOCAB_ROW_TENSORS = ("transformer.wte.weight", "lm_head.weight")
# A mismatch report lists at most this many tensor names of each kind.
MAX_NAMES_SHOWN = 5


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint file or state dict that cannot become a GPT's weights: missing, unreadable,
    corrupt, or not matching the configuration. A ValueError (bad input), and a RuntimeError too,
    which is what torch's load_state_dict raises for a state dict that does not fit."""


def _names(names):
    names = sorted(names)
    shown = ", ".join(names[:MAX_NAMES_SHOWN])
    return shown + (f" and {len(names) - MAX_NAMES_SHOWN} more" if len(names) > MAX_NAMES_SHOWN else "")


def check_state_dict(model, state, source, *, strict=True, configuration="the model's configuration"):
    """Raises CheckpointError unless `state` can be loaded into `model` whole: with strict, the same
    tensor names as model.state_dict(); always, for every name both have, the same shape and a
    floating-point dtype. `source` names where the tensors come from and `configuration` what the
    model was built from, for the message."""
    expected = model.state_dict()
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    if strict and (missing or unexpected):
        problems = []
        if missing:
            problems.append(f"missing tensors: {_names(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors: {_names(unexpected)}")
        raise CheckpointError(f"{source} does not match {configuration} ({'; '.join(problems)})")
    for name in sorted(expected.keys() & state.keys()):
        tensor, target = state[name], expected[name]
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{source}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{source}: tensor {name} must have shape {expected_shape(model.config, name, target)} "
                f"for {configuration}, got {tuple(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name} must be floating-point, got dtype {tensor.dtype}")


def expected_shape(config, name, target):
    """The shape a state dict's tensor `name` must have, for an error message: the target's, and for
    a padded vocabulary tensor both the checkpoint's (vocab_size rows) and the model's."""
    if name not in VOCAB_ROW_TENSORS or config.padded_vocab_size == config.vocab_size:
        return str(tuple(target.shape))
    return f"{(config.vocab_size, *target.shape[1:])} (or, padded, {tuple(target.shape)})"


def pad_vocab_rows(state, config):
    """state with every vocabulary tensor of config.vocab_size rows (a checkpoint's) grown to
    config.padded_vocab_size rows by appending zero rows; a tensor under both names (a tied LM head)
    is padded once and stays shared. Everything else passes unchanged, for check_state_dict to judge.
    Returns state itself when nothing needs padding."""
    vocab, padded_vocab = config.vocab_size, config.padded_vocab_size
    to_pad = [name for name in VOCAB_ROW_TENSORS if has_rows(state.get(name), vocab)]
    if padded_vocab == vocab or not to_pad:
        return state
    result = OrderedDict(state)
    if hasattr(state, "_metadata"):  # torch's per-module versions, which load_state_dict reads
        result._metadata = state._metadata
    padded_by_id = {}
    for name in to_pad:
        tensor = state[name]  # (vocab, C)
        if id(tensor) not in padded_by_id:
            padded_by_id[id(tensor)] = append_zero_rows(tensor, padded_vocab)  # (padded_vocab, C)
        result[name] = padded_by_id[id(tensor)]
    return result


def has_rows(tensor, rows):
    """Whether tensor is a matrix of `rows` rows."""
    return isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.shape[0] == rows


def append_zero_rows(tensor, rows):
    """tensor (n, C) followed by zero rows: (rows, C), a new tensor."""
    padding = tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])  # (rows - n, C)
    return torch.cat((tensor, padding))


def checkpoint_tensors(model):
    """model.state_dict() as a checkpoint holds it: every vocabulary tensor cut to its first
    config.vocab_size rows (a contiguous view of the padded one), and a tied LM head left out (it is
    stored once, as the token embedding)."""
    config = model.config
    return {
        name: tensor.detach()[: config.vocab_size] if name in VOCAB_ROW_TENSORS else tensor.detach()
        for name, tensor in model.state_dict().items()
        if not (config.tie_weights and name == "lm_head.weight")
    }


def read_safetensors(path, device="cpu"):
    """load_file, with a missing or damaged file raised as CheckpointError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({error})") from None


def read_json(path):
    """A JSON object from path, with a missing or damaged file raised as CheckpointError naming it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist")
    try:
        with open(path) as f:
            fields = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not a readable JSON file ({error})") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(fields).__name__}")
    return fields


def config_from_hf(hf_config, **overrides):
    """A GPTConfig from a transformers GPT2Config (as a dict). Raises ValueError for GPT-2 options
    this model does not implement, rather than loading weights it would compute differently."""
    model_type = hf_config.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(
            f"GPT.from_hf: expected a GPT-2 checkpoint (model_type 'gpt2'), got model_type {model_type!r}"
        )
    unsupported = {
        "scale_attn_weights": (hf_config.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (hf_config.get("scale_attn_by_inverse_layer_idx", False), False),
        "add_cross_attention": (hf_config.get("add_cross_attention", False), False),
    }
    for name, (given, supported) in unsupported.items():
        if given != supported:
            raise ValueError(
                f"GPT.from_hf: GPT-2 config {name}={given!r} is not supported (only {supported!r})"
            )
    activation = hf_config.get("activation_function", "gelu_new")
    if activation not in HF_ACTIVATIONS:
        raise ValueError(
            f"GPT.from_hf: activation_function must be one of {tuple(HF_ACTIVATIONS)}, got {activation!r}"
        )
    fields = {
        "block_size": hf_config["n_positions"],
        "vocab_size": hf_config["vocab_size"],
        "n_layer": hf_config["n_layer"],
        "n_head": hf_config["n_head"],
        "n_embd": hf_config["n_embd"],
        "n_inner": hf_config.get("n_inner"),
        "tie_weights": hf_config.get("tie_word_embeddings", True),
        "activation": HF_ACTIVATIONS[activation],
        "layer_norm_eps": hf_config.get("layer_norm_epsilon", 1e-5),
    }
    return GPTConfig(**{**fields, **overrides})


def state_dict_from_hf(hf_state, *, tie_weights, copy):
    """nanoGPT-named, Linear-layout tensors from a GPT-2 state dict (GPT2Model's or GPT2LMHeadModel's
    names). copy=True clones tensors that would otherwise share storage with the source model."""
    state = {}
    unexpected = []
    for name, tensor in hf_state.items():
        if name.endswith(MASK_BUFFERS):
            continue
        if name.startswith(BODY_PREFIXES):
            name = "transformer." + name
        if not name.startswith("transformer.") and name != "lm_head.weight":
            unexpected.append(name)
            continue
        tensor = tensor.detach()
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t().contiguous()  # (in, out) -> nn.Linear's (out, in)
        elif copy:
            tensor = tensor.clone()
        state[name] = tensor
    if unexpected:
        raise ValueError(
            f"GPT.from_hf: weights outside the GPT-2 body and LM head are not supported, got {unexpected}"
        )
    if tie_weights:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    elif "lm_head.weight" not in state:
        raise ValueError("GPT.from_hf: the checkpoint has no lm_head.weight and tie_word_embeddings is False")
    return state


def read_nanogpt_checkpoint(path):
    """(model_args, state dict) of nanoGPT's ckpt.pt, read with torch.load(weights_only=True): tensors and
    plain values only, so a checkpoint cannot run code. torch.compile's prefix and causal-mask buffers
    are dropped from the names."""
    checkpoint = read_pickled_tensors(path)
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)):
        raise CheckpointError(
            f"{path} is not a nanoGPT checkpoint: it must be a dict with the state dict under 'model'"
        )
    model_args = checkpoint.get("model_args")
    missing = [
        name for name in NANOGPT_ARCHITECTURE if not isinstance(model_args, dict) or name not in model_args
    ]
    if missing:
        raise CheckpointError(f"{path}: its 'model_args' lack {', '.join(missing)}")
    state = {
        name.removeprefix(COMPILED_PREFIX): tensor
        for name, tensor in checkpoint["model"].items()
        if not name.endswith(MASK_BUFFERS)
    }
    return model_args, state


def config_from_nanogpt(model_args, **overrides):
    """A GPTConfig from nanoGPT's model_args. Its MLP's nn.GELU() is the exact gelu, its LayerNorm eps
    1e-5, its LM head tied, its vocab_size what it trained with (50304 when it padded GPT-2's)."""
    fields = {name: model_args[name] for name in NANOGPT_ARCHITECTURE}
    try:
        return GPTConfig(**{**fields, "activation": "gelu", **overrides})
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"nanoGPT's model_args {fields} are not a valid GPTConfig ({error})") from None


def read_hf_directory(directory):
    """(config dict, state dict) from a local transformers checkpoint directory."""
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(f"GPT.from_hf: {directory!r} must hold {CONFIG_FILE}, but it was not found")
    hf_config = read_json(config_path)
    readers = {  # the first file found, in transformers' order of preference
        WEIGHTS_FILE: read_safetensors,
        WEIGHTS_INDEX_FILE: lambda path: read_shards(path, read_safetensors),
        HF_PICKLE_WEIGHTS_FILE: read_pickled_tensors,
        HF_PICKLE_INDEX_FILE: lambda path: read_shards(path, read_pickled_tensors),
    }
    for name, read in readers.items():
        if os.path.isfile(os.path.join(directory, name)):
            return hf_config, read(os.path.join(directory, name))
    raise ValueError(f"GPT.from_hf: {directory!r} must hold one of {', '.join(readers)}, but none was found")


def read_pickled_tensors(path):
    """torch.load(path, weights_only=True) (tensors and plain values, no code: a pytorch_model.bin or
    nanoGPT's ckpt.pt), with a missing or damaged file raised as CheckpointError naming it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({error})") from None


def read_shards(index_path, read):
    """The tensors of a sharded checkpoint: each shard file its index names, read once with `read`; a
    tensor the index maps to a shard that lacks it raises CheckpointError."""
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no weight_map of tensor names to shard files")
    directory = os.path.dirname(index_path)
    state = {}
    for shard in sorted(set(weight_map.values())):
        state.update(read(os.path.join(directory, shard)))
    missing = [name for name in weight_map if name not in state]
    if missing:
        raise CheckpointError(f"{index_path} maps tensors its shards lack: {_names(missing)}")
    return state


def write_files(directory, files):
    """Writes {file name: bytes, or a function writing the file at the path it is given} into
    directory so that an interruption keeps the old files: every file is first written in full to a
    temporary file next to its final name and synced; only then are they renamed over the old ones
    (os.replace is atomic), in the order given. Temporary files never outlive the call."""
    os.makedirs(directory, exist_ok=True)
    staged = []
    try:
        for name, data in files.items():
            final = os.path.join(directory, name)
            temporary = f"{final}.tmp-{os.getpid()}"
            staged.append((temporary, final))
            if callable(data):
                data(temporary)
            else:
                with open(temporary, "wb") as f:
                    f.write(data)
            with open(temporary, "ab") as f:
                os.fsync(f.fileno())
        for temporary, final in staged:
            os.replace(temporary, final)
    finally:
        for temporary, _ in staged:
            if os.path.exists(temporary):
                os.remove(temporary)


def save(model, directory):
    """config.json + model.safetensors, atomically (write_files), with checkpoint_tensors' names and
    shapes: vocab_size rows for the vocabulary tensors, a tied LM head stored once as the token
    embedding. The weights are renamed into place first and the config last."""
    from safetensors.torch import save_file

    state = {name: tensor.contiguous() for name, tensor in checkpoint_tensors(model).items()}
    write_files(
        directory,
        {
            WEIGHTS_FILE: lambda path: save_file(state, path, metadata={"format": "pt"}),
            CONFIG_FILE: json.dumps(model.config.to_dict(), indent=2).encode(),
        },
    )


def hf_config(config, dtype, eos_token_id=None):
    """The transformers GPT2Config, as its config.json holds it, of a GPT2LMHeadModel computing what a GPT
    of `config` computes: grouped-query attention becomes multi-head attention (hf_state_dict repeats the
    key/value heads), dropout is resid_pdrop and embd_pdrop with attn_pdrop 0 (fastgpt drops no attention
    probabilities). eos_token_id, also written as bos_token_id as GPT-2's config does: None means GPT-2's
    50256 for its 50257-token vocabulary, and none for any other vocabulary."""
    if eos_token_id is None and config.vocab_size == GPT2_VOCAB_SIZE:
        eos_token_id = GPT2_EOS_TOKEN_ID
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "activation_function": ACTIVATIONS_TO_HF[config.activation],
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": config.tie_weights,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def repeat_kv_heads(qkv, config):
    """c_attn's weight ((H + 2 Hkv) D, C) or bias ((H + 2 Hkv) D,) with each key and value head repeated for
    the H / Hkv query heads that read it (query head h reads key/value head h // (H / Hkv)): (3 H D, ...)."""
    group = config.n_head // config.n_kv_head
    if group == 1:
        return qkv
    width = config.n_head * config.head_dim
    kv_width = config.n_kv_head * config.head_dim
    q, k, v = qkv.split((width, kv_width, kv_width))  # (H D, ...), (Hkv D, ...), (Hkv D, ...)
    k, v = (
        t.unflatten(0, (config.n_kv_head, config.head_dim)).repeat_interleave(group, 0).flatten(0, 1)
        for t in (k, v)
    )
    return torch.cat((q, k, v))  # (3 H D, ...)


def hf_state_dict(model):
    """The tensors of a GPT2LMHeadModel (save_pretrained's names and layouts) holding model's weights:
    Conv1D's (in, out) layout, vocab_size rows, a tied LM head left out (transformers ties it on load),
    the key/value heads repeated (repeat_kv_heads), and zero biases where the model has none (GPT-2's
    layers always have them; a zero bias adds nothing)."""
    config = model.config
    state = dict(checkpoint_tensors(model))
    for name, module in model.named_modules():
        if name != "lm_head" and getattr(module, "bias", False) is None:
            state[f"{name}.bias"] = module.weight.new_zeros(module.weight.shape[0]).detach()
    result = {}
    for name, tensor in state.items():
        if name.endswith((".attn.c_attn.weight", ".attn.c_attn.bias")):
            tensor = repeat_kv_heads(tensor, config)
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()  # nn.Linear's (out, in) -> Conv1D's (in, out)
        result[name] = tensor.contiguous()
    return result


def save_hf(model, directory, eos_token_id=None):
    """config.json (hf_config) and model.safetensors (hf_state_dict) of a transformers GPT2LMHeadModel,
    written atomically (write_files), weights first."""
    from safetensors.torch import save_file

    state = hf_state_dict(model)
    fields = hf_config(model.config, model.transformer.wte.weight.dtype, eos_token_id)
    write_files(
        directory,
        {
            WEIGHTS_FILE: lambda path: save_file(state, path, metadata={"format": "pt"}),
            CONFIG_FILE: json.dumps(fields, indent=2).encode(),
        },
    )


def read_directory(directory, device, **overrides):
    """(GPTConfig, state dict) saved by `save`. Missing, unreadable or corrupt files, and a
    config.json that is not a valid GPTConfig, raise CheckpointError naming the file; a tied LM head
    stored separately is refused rather than silently dropped."""
    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    fields = read_json(config_path)
    try:
        config = GPTConfig(**{**fields, **overrides})
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path} is not a valid GPTConfig ({error})") from None
    state = read_safetensors(weights_path, device)
    if config.tie_weights:
        if "lm_head.weight" in state:
            raise CheckpointError(
                f"{weights_path} holds lm_head.weight, but {config_path} has tie_weights=true "
                "(a tied LM head is stored once, as transformer.wte.weight)"
            )
        if "transformer.wte.weight" in state:
            state["lm_head.weight"] = state["transformer.wte.weight"]
    return config, state
