"""Reading weights into a GPT: transformers GPT-2 checkpoints (a model object or a local directory)
and fastgpt's own safetensors + JSON format. Nothing here downloads."""

import json
import os

import torch

from fastgpt.nn.config import GPTConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
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

# HF GPT-2 stores these projections as Conv1D, whose weight is (in_features, out_features).
CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Causal-mask buffers that old GPT-2 checkpoints carry; they hold no learned values.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
BODY_PREFIXES = ("h.", "wte.", "wpe.", "ln_f.")


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


def read_hf_directory(directory):
    """(config dict, state dict) from a local transformers checkpoint directory."""
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(f"GPT.from_hf: {directory!r} must hold {CONFIG_FILE}, but it was not found")
    with open(config_path) as f:
        hf_config = json.load(f)
    safetensors_path = os.path.join(directory, WEIGHTS_FILE)
    pickle_path = os.path.join(directory, HF_PICKLE_WEIGHTS_FILE)
    if os.path.isfile(safetensors_path):
        from safetensors.torch import load_file

        state = load_file(safetensors_path)
    elif os.path.isfile(pickle_path):
        state = torch.load(pickle_path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(
            f"GPT.from_hf: {directory!r} must hold {WEIGHTS_FILE} or {HF_PICKLE_WEIGHTS_FILE}, but neither was found"
        )
    return hf_config, state


def save(model, directory):
    """config.json + model.safetensors; a tied LM head is stored once, as the token embedding."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2)
    state = {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not (model.config.tie_weights and name == "lm_head.weight")
    }
    save_file(state, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})


def read_directory(directory, device, **overrides):
    """(GPTConfig, state dict) saved by `save`."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_FILE)) as f:
        config = GPTConfig(**{**json.load(f), **overrides})
    state = load_file(os.path.join(directory, WEIGHTS_FILE), device=str(device))
    if config.tie_weights:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return config, state
