"""fastgpt inside Hugging Face transformers: `patch` for GPT-2 models, and an attention
implementation named "fastgpt" for any model that dispatches through transformers' AttentionInterface.

Importing this module registers "fastgpt" in transformers' AttentionInterface, and in its
AttentionMaskInterface where the installed version has one, so

    model = AutoModelForCausalLM.from_config(config, attn_implementation="fastgpt")

runs attention on fastgpt.causal_attention. The "fastgpt" mask is SDPA's: None when the mask is the
plain causal one (no padding), a boolean 4D mask otherwise. The attention function runs
causal_attention only when it receives no mask, for a causal module, without attention dropout,
and reads None exactly as SDPA does: one query sees every key, and T queries against T keys, or
against a longer not-yet-filled static cache, are causal from the top left. Anything else (a
padding mask, dropout in training, cross-attention, position biases) goes to transformers' SDPA
function with its mask, so a mask is never dropped. A call that asks for the attention weights
(output_attentions, head_mask) goes to the eager function of the module's modeling file, with the
mask turned into the additive float mask eager attention adds to its scores.

`patch(model)` works in place on a GPT-2 model (GPT2Model, GPT2LMHeadModel and the other heads):
- attention: switches an "sdpa" model to "fastgpt". An "eager" model is left on eager, with a
  warning: eager is chosen for what SDPA-like kernels cannot give (attention weights with
  output_attentions, reorder_and_upcast_attn), so swapping it would change results.
- mlp: every GPT2MLP runs as one fastgpt.fused_ffn. HF's Conv1D keeps its weight as (in, out); the
  patched forward passes `weight.t()`, a strided (out, in) view of the same storage, which the
  fused_ffn backends read in place, so nothing is copied per call and gradients land in the
  Conv1D parameters. The MLP's dropout is applied to the fused output, exactly where HF applies it.
- layer_norm: every nn.LayerNorm over the last dimension runs fastgpt.layer_norm.
- projections: the attention's Conv1D projections (c_attn, c_proj; q_attn too) and the LM head run
  fastgpt.linear, which routes the few rows of a decode step (<= 16) to the cpu backend's kernel that
  streams each weight once (Conv1D's (in, out) weight read in place through its transposed view) and
  every other call to F.linear.
- loss: a GPT2LMHeadModel (not GPT2DoubleHeadsModel, whose forward adds a multiple-choice head, nor
  a subclass with a forward of its own) in training mode called with `labels` takes its loss from
  fastgpt.linear_cross_entropy on the last hidden states and the LM head's weight, so the (batch, seq,
  vocab) logits and their float32 upcast are never formed, and `logits` in the output is None (as
  Liger-Kernel's fused loss does). The loss is transformers' own: labels shifted inside the model (or
  `shift_labels` used as given), ignore_index -100, the mean over kept tokens or the sum divided by
  `num_items_in_batch` when the Trainer passes it. In eval mode, without labels, under autocast, with
  a `logits_to_keep` that drops positions, `return_dict=False` or more than one positional argument,
  transformers' forward runs unchanged.
Only `forward` attributes of the module instances change (each a functools.partial of a function
here, so torch.save of the whole model loads back patched; each reports its class forward's signature
and takes the same arguments by the same names); parameters stay the same objects, so
optimizers, state dicts and save_pretrained keep working. Under torch.autocast the patched MLP,
LayerNorm and projections call their original forward (the fused ops take one dtype; autocast mixes
them), and so does the fused loss's model.
"""

import functools
import inspect
import sys
import warnings

import torch
from torch import nn

from fastgpt.dispatch import BACKENDS
from fastgpt.functional import causal_attention, fused_ffn, layer_norm, linear, linear_cross_entropy
from fastgpt.nn.weights import HF_ACTIVATIONS

ATTENTION_NAME = "fastgpt"

# ----------------------------------------------------------------------------------------------
# The "fastgpt" attention implementation


def _sdpa_attention():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _eager_attention(module):
    """The eager attention function of the module's own modeling file (it applies head_mask and
    returns attention weights), or None."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _eager_mask(attention_mask, query, key, causal):
    """The "fastgpt" mask (SDPA's) as eager attention reads it: eager adds its mask to the scores, so a
    boolean mask (True: attend) becomes 0 / the dtype's minimum, and None on a causal module becomes
    SDPA's reading of None (top-left causal; one query sees every key). A float mask is already additive.
    query (B, H, Tq, D), key (B, Hkv, Tk, D). Returns None or a mask that broadcasts to (B, H, Tq, Tk)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None:
        if not causal or q_len == 1:
            return None
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()  # (Tq, Tk)
    if attention_mask.dtype != torch.bool:
        return attention_mask
    additive = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
    return additive.masked_fill_(~attention_mask, torch.finfo(query.dtype).min)


def fastgpt_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers' attention-function signature: query (B, H, Tq, D), key and value
    (B, Hkv, Tk, D), attention_mask None or 4D. Returns ((B, Tq, H, D), None), or the eager
    function's (output, weights) when the call asks for the weights."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    wants_weights = kwargs.get("output_attentions") or kwargs.get("head_mask") is not None
    eager = _eager_attention(module) if wants_weights else None
    if eager is not None:
        mask = _eager_mask(attention_mask, query, key, causal)
        return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    fast = (
        attention_mask is None
        and causal
        and dropout == 0.0
        and query.dtype == key.dtype == value.dtype
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
    )
    if not fast:
        return _sdpa_attention()(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    q_len, kv_len = query.shape[2], key.shape[2]
    if 1 < q_len < kv_len:
        # SDPA's reading of a None mask here is top-left causal: the keys past q_len are a static
        # cache's unfilled tail, which no query may see.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    backend = getattr(module, "fastgpt_backend", "auto")
    out = causal_attention(query, key, value, softmax_scale=scaling, backend=backend)  # (B, H, Tq, D)
    return out.transpose(1, 2), None  # (B, Tq, H, D)


def register():
    """Registers "fastgpt" in transformers' attention (and mask) interfaces. Idempotent."""
    try:
        from transformers import AttentionInterface
    except ImportError:  # older transformers keep a plain dict
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME] = fastgpt_attention_forward
    else:
        AttentionInterface.register(ATTENTION_NAME, fastgpt_attention_forward)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:  # older transformers build masks inside each model
        return
    AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


register()


# ----------------------------------------------------------------------------------------------
# Patched forwards of GPT-2's modules


def _mlp_forward(self, hidden_states):
    """GPT2MLP.forward as one fused_ffn: dropout(c_proj(act(c_fc(x)))). x: (B, T, C) -> (B, T, C)."""
    if torch.is_autocast_enabled(hidden_states.device.type):
        return type(self).forward(self, hidden_states)
    out = fused_ffn(
        hidden_states,
        self.c_fc.weight.t(),  # (hidden, C) view of Conv1D's (C, hidden) weight
        self.c_fc.bias,
        self.c_proj.weight.t(),  # (C, hidden) view of Conv1D's (hidden, C) weight
        self.c_proj.bias,
        activation=self.fastgpt_activation,
        backend=self.fastgpt_backend,
    )
    return self.dropout(out)


def _projection_forward(self, x):
    """Conv1D.forward / nn.Linear.forward on fastgpt.linear: the few rows of a decode step run on the cpu
    backend's kernel that streams the weight once, every other call as F.linear; under autocast, or with
    an input in another dtype than the weight, the original forward."""
    if torch.is_autocast_enabled(x.device.type) or x.dtype != self.weight.dtype:
        return type(self).forward(self, x)
    weight = self.weight.t() if self.fastgpt_weight_is_in_out else self.weight  # (out, in), a view
    return linear(x, weight, self.bias, backend=self.fastgpt_backend)


def _lm_head_forward(self, input):
    """nn.Linear.forward of the LM head, as _projection_forward (`input`: nn.Linear's name, for keyword
    calls)."""
    return _projection_forward(self, input)


def _layer_norm_forward(self, input):
    """nn.LayerNorm.forward over the last dimension on fastgpt.layer_norm (`input`: nn.LayerNorm's name,
    for keyword calls)."""
    if torch.is_autocast_enabled(input.device.type):
        return type(self).forward(self, input)
    return layer_norm(input, self.weight, self.bias, self.eps, backend=self.fastgpt_backend)


IGNORE_INDEX = -100


def _keeps_all_logits(logits_to_keep):
    """logits_to_keep asks for every position: absent, None or 0 (transformers also takes an int count
    of last positions, or a tensor of positions, whose truth value is not defined)."""
    return logits_to_keep is None or (isinstance(logits_to_keep, int) and logits_to_keep == 0)


def _fused_loss_applies(model, args, labels, kwargs):
    """Whether the fused loss serves this call. Autocast is read for the device the model computes on
    (its LM head's), not the labels': CPU labels for a CUDA model would read the CPU's autocast state."""
    return (
        model.training
        and labels is not None
        and len(args) <= 1
        and _keeps_all_logits(kwargs.get("logits_to_keep"))
        and kwargs.get("return_dict") is not False
        and not torch.is_autocast_enabled(model.lm_head.weight.device.type)
    )


def _causal_lm_forward(self, *args, labels=None, **kwargs):
    """GPT2LMHeadModel.forward with the loss on fastgpt.linear_cross_entropy (see the module docstring)."""
    if not _fused_loss_applies(self, args, labels, kwargs):
        return type(self).forward(self, *args, labels=labels, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
    kwargs.pop("logits_to_keep", None)
    outputs = self.transformer(*args, **kwargs)
    hidden = outputs.last_hidden_state  # (B, T, C)
    if shift_labels is None:  # position t predicts label t + 1; the last position predicts nothing
        hidden, shift_labels = hidden[..., :-1, :], labels[..., 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(
        hidden,
        self.lm_head.weight,
        shift_labels.to(hidden.device),
        bias=self.lm_head.bias,
        ignore_index=ignore_index,
        reduction=reduction,
        backend=self.fastgpt_backend,
    )
    if num_items_in_batch is not None:  # a tensor moves to the loss's device, as transformers' loss does
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    fields = {name: value for name, value in outputs.items() if name != "last_hidden_state"}
    return CausalLMOutputWithCrossAttentions(loss=loss, logits=None, **fields)


def _gpt2_classes():
    from transformers.models.gpt2 import modeling_gpt2

    return (
        modeling_gpt2.GPT2PreTrainedModel,
        modeling_gpt2.GPT2Attention,
        modeling_gpt2.GPT2MLP,
        modeling_gpt2.GPT2LMHeadModel,
    )


def _conv1d_class():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


class _ForwardWithClassSignature(functools.partial):
    """A patched forward that reports the signature of its module's class forward, the one it stands in
    for, and takes the same arguments by the same names: transformers reads forward's signature, and
    generate() passes logits_to_keep only to a forward that names it. Without it a patched
    GPT2LMHeadModel, whose function takes (*args, **kwargs), formed the prompt's logits at every
    position in prefill (B x prompt x vocab, where one row per sequence is read)."""

    @property
    def __signature__(self):
        module = self.args[0]
        return inspect.signature(functools.partial(type(module).forward, module))


def _bind_forward(module, function):
    """Makes `function` (a module-level function taking the module first, then the class forward's
    arguments by the same names) the module's forward, as a functools.partial rather than a bound
    method: pickle saves a bound method as getattr(module, function.__name__), a name the loaded module
    lacks, so torch.save(model) wrote a file that torch.load could not read; a partial pickles the
    function by reference and the module with it."""
    module.forward = _ForwardWithClassSignature(function, module)


def _set_attention_implementation(model, name):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers
        model.config._attn_implementation = name


def _patch_attention(model, attention_class, backend):
    current = model.config._attn_implementation
    if current not in ("sdpa", ATTENTION_NAME):
        warnings.warn(
            f"fastgpt.patch: attention left on {current!r}. The fastgpt attention keeps SDPA's semantics; "
            "call model.set_attn_implementation('sdpa') first to use it",
            stacklevel=3,
        )
        return
    _set_attention_implementation(model, ATTENTION_NAME)
    for module in model.modules():
        if isinstance(module, attention_class):
            module.fastgpt_backend = backend


def _patch_mlp(model, mlp_class, backend):
    activation_name = getattr(model.config, "activation_function", None)
    activation = HF_ACTIVATIONS.get(activation_name)
    if activation is None:
        warnings.warn(
            f"fastgpt.patch: MLP left unpatched, its activation_function {activation_name!r} is not one of "
            f"{tuple(HF_ACTIVATIONS)}",
            stacklevel=3,
        )
        return
    for module in model.modules():
        if isinstance(module, mlp_class):
            module.fastgpt_activation = activation
            module.fastgpt_backend = backend
            _bind_forward(module, _mlp_forward)


def _patch_projections(model, attention_class, backend):
    """The attention modules' Conv1D projections and an LM head (nn.Linear named lm_head)."""
    conv1d = _conv1d_class()
    projections = [
        projection
        for module in model.modules()
        if isinstance(module, attention_class)
        for projection in module.children()
        if isinstance(projection, conv1d)
    ]
    lm_head = getattr(model, "lm_head", None)
    if isinstance(lm_head, nn.Linear):
        projections.append(lm_head)
    for projection in projections:
        projection.fastgpt_backend = backend
        projection.fastgpt_weight_is_in_out = isinstance(projection, conv1d)
        _bind_forward(
            projection, _projection_forward if projection.fastgpt_weight_is_in_out else _lm_head_forward
        )


def _patch_loss(model, lm_class, backend):
    """Only a model whose forward is GPT2LMHeadModel.forward, which _causal_lm_forward stands in for: the
    other heads with an LM head (GPT2DoubleHeadsModel's multiple-choice loss and logits) or a subclass
    with a forward of its own would lose what their forward adds."""
    if isinstance(model, lm_class) and type(model).forward is lm_class.forward:
        model.fastgpt_backend = backend
        _bind_forward(model, _causal_lm_forward)


def _patch_layer_norms(model, backend):
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
            module.fastgpt_backend = backend
            _bind_forward(module, _layer_norm_forward)


def patch(model, *, attention=True, mlp=True, layer_norm=True, projections=True, loss=True, backend="auto"):
    """Runs a transformers GPT-2 model on fastgpt's fused ops, in place, and returns it.

    model: GPT2Model, GPT2LMHeadModel or another GPT-2 head (any GPT2PreTrainedModel).
    attention / mlp / layer_norm / projections / loss: which parts to patch (loss: a GPT2LMHeadModel).
    backend: the fastgpt backend for all of them.
    Calling patch again changes the backend. See the module docstring for what each part does.
    """
    pretrained_class, attention_class, mlp_class, lm_class = _gpt2_classes()
    if not isinstance(model, pretrained_class):
        raise TypeError(
            f"fastgpt.patch: model must be a transformers GPT-2 model (GPT2PreTrainedModel), got {type(model).__name__}"
        )
    if not isinstance(backend, str) or backend not in ("auto",) + BACKENDS:
        raise ValueError(f"fastgpt.patch: backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    flags = (
        ("attention", attention),
        ("mlp", mlp),
        ("layer_norm", layer_norm),
        ("projections", projections),
        ("loss", loss),
    )
    for name, flag in flags:
        if not isinstance(flag, bool):
            raise TypeError(f"fastgpt.patch: {name} must be a bool (True or False), got {flag!r}")
    if attention:
        _patch_attention(model, attention_class, backend)
    if mlp:
        _patch_mlp(model, mlp_class, backend)
    if layer_norm:
        _patch_layer_norms(model, backend)
    if projections:
        _patch_projections(model, attention_class, backend)
    if loss:
        _patch_loss(model, lm_class, backend)
    return model
