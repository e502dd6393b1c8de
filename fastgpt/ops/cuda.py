"""The 'cuda' backend: the CUDA C++ kernels of csrc/cuda, reached through the torch ops that fastgpt._C
registers when it is built with CUDA (csrc/cuda/api_cuda.inc; their schemas are listed in
csrc/cuda/launch.h). The C++ side checks tensors, allocates outputs (NaN-poisoned under
FASTGPT_POISON_OUTPUTS=1) and launches on the current stream; this module registers the ops' fake
implementations and autograd, and exposes what dispatch.py calls.

Kernels: bfloat16 and float16 only (float32 runs on Triton). Attention takes head_dim up to 128 in
multiples of 8, LayerNorm up to 16384 columns; `unsupported_reason` says why a shape is declined.
The backward passes are deterministic (no atomics).
"""

import math

import torch

import fastgpt._C  # noqa: F401  (registers torch.ops.fastgpt.*)
from fastgpt.activations import ACTIVATIONS

_CUDA_OPS = (
    "cuda_attention_forward",
    "cuda_attention_backward",
    "cuda_ffn_forward",
    "cuda_ffn_backward",
    "cuda_layer_norm_forward",
    "cuda_layer_norm_backward",
    "cuda_unsupported_reason",
)
if not all(hasattr(torch.ops.fastgpt, name) for name in _CUDA_OPS):
    raise ImportError(
        "fastgpt._C was built without CUDA (it has no torch.ops.fastgpt.cuda_* ops); rebuild it with "
        "FASTGPT_CUDA=1 on a machine with nvcc and a CUDA-enabled torch"
    )

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# The kernels use cp.async, ldmatrix and bfloat16 mma.sync.
MIN_CAPABILITY = (8, 0)


# ----------------------------------------------------------------------------------------------
# Fake (meta) implementations: output shapes, dtypes and (contiguous) layouts of the C++ ops.


@torch.library.register_fake("fastgpt::cuda_attention_forward")
def _attention_forward_fake(q, k, v, softmax_scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)  # out, lse


@torch.library.register_fake("fastgpt::cuda_attention_backward")
def _attention_backward_fake(dout, q, k, v, out, lse, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("fastgpt::cuda_ffn_forward")
def _ffn_forward_fake(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual):
    leading = tuple(x.shape[:-1])
    return x.new_empty((*leading, proj_weight.shape[0])), x.new_empty((*leading, fc_weight.shape[0]))  # y, h


@torch.library.register_fake("fastgpt::cuda_ffn_backward")
def _ffn_backward_fake(dy, x, h, fc_weight, proj_weight, activation):
    hidden, out_features = fc_weight.shape[0], proj_weight.shape[0]
    return (
        x.new_empty(x.shape),
        fc_weight.new_empty(fc_weight.shape),
        fc_weight.new_empty((hidden,)),
        proj_weight.new_empty(proj_weight.shape),
        proj_weight.new_empty((out_features,)),
    )


@torch.library.register_fake("fastgpt::cuda_layer_norm_forward")
def _layer_norm_forward_fake(x, weight, bias, eps, residual):
    rows = math.prod(x.shape[:-1])
    residual_out = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
    mean, rstd = x.new_empty((rows,), dtype=torch.float32), x.new_empty((rows,), dtype=torch.float32)
    return x.new_empty(x.shape), residual_out, mean, rstd


@torch.library.register_fake("fastgpt::cuda_layer_norm_backward")
def _layer_norm_backward_fake(dout, dresidual_out, input, weight, mean, rstd):
    cols = input.shape[-1]
    return input.new_empty(input.shape), input.new_empty((cols,)), input.new_empty((cols,))


# ----------------------------------------------------------------------------------------------
# Autograd


# Outputs that autograd gets no gradient for (lse, h, mean, rstd, an unused x + residual) arrive as None
# rather than as zero-filled tensors: ctx.set_materialize_grads(False).


def _attention_setup_context(ctx, inputs, output):
    q, k, v, softmax_scale = inputs
    out, lse = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale = softmax_scale


def _attention_backward(ctx, dout, dlse):
    if dout is None:
        return None, None, None, None
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastgpt.cuda_attention_backward(dout, q, k, v, out, lse, ctx.softmax_scale)
    return dq, dk, dv, None


torch.library.register_autograd(
    "fastgpt::cuda_attention_forward", _attention_backward, setup_context=_attention_setup_context
)


def _ffn_setup_context(ctx, inputs, output):
    x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual = inputs
    _, h = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, fc_weight, proj_weight, h)  # activations saved: x and h only
    ctx.activation = activation
    ctx.has_fc_bias = fc_bias is not None
    ctx.has_proj_bias = proj_bias is not None
    ctx.has_residual = residual is not None


def _ffn_backward(ctx, dy, dh):
    if dy is None:
        return (None,) * 7
    x, fc_weight, proj_weight, h = ctx.saved_tensors
    dx, dfc_weight, dfc_bias, dproj_weight, dproj_bias = torch.ops.fastgpt.cuda_ffn_backward(
        dy, x, h, fc_weight, proj_weight, ctx.activation
    )
    return (
        dx,
        dfc_weight,
        dfc_bias if ctx.has_fc_bias else None,
        dproj_weight,
        dproj_bias if ctx.has_proj_bias else None,
        None,
        dy if ctx.has_residual else None,
    )


torch.library.register_autograd("fastgpt::cuda_ffn_forward", _ffn_backward, setup_context=_ffn_setup_context)


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, _eps, residual = inputs
    _, residual_out, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_weight = weight is not None
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(residual_out if ctx.has_residual else x, weight, mean, rstd)


def _layer_norm_backward(ctx, dout, dresidual_out, dmean, drstd):
    normalised, weight, mean, rstd = ctx.saved_tensors
    if dout is None:  # only x + residual was used downstream
        dout = torch.zeros_like(normalised)
    dx, dweight, dbias = torch.ops.fastgpt.cuda_layer_norm_backward(
        dout, dresidual_out if ctx.has_residual else None, normalised, weight, mean, rstd
    )
    return (
        dx,
        dweight if ctx.has_weight else None,
        dbias if ctx.has_bias else None,
        None,
        dx if ctx.has_residual else None,
    )


torch.library.register_autograd(
    "fastgpt::cuda_layer_norm_forward", _layer_norm_backward, setup_context=_layer_norm_setup_context
)


# ----------------------------------------------------------------------------------------------
# What dispatch.py calls (arguments already validated)


def causal_attention(q, k, v, softmax_scale):
    out, _ = torch.ops.fastgpt.cuda_attention_forward(q, k, v, softmax_scale)
    return out


def fused_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual):
    # The C++ op takes the Activation enum of csrc/params.h, ordered as ACTIVATIONS.
    y, _ = torch.ops.fastgpt.cuda_ffn_forward(
        x, fc_weight, fc_bias, proj_weight, proj_bias, ACTIVATIONS.index(activation), residual
    )
    return y


def layer_norm(x, weight, bias, eps, residual):
    out, residual_out, _, _ = torch.ops.fastgpt.cuda_layer_norm_forward(x, weight, bias, eps, residual)
    return out if residual is None else (out, residual_out)


def unsupported_reason(op, **facts):
    """Why the CUDA kernels cannot run `op` here, or None. facts: head_dim= (causal_attention) or hidden=
    (fused_ffn, layer_norm). dispatch.py has already checked the dtype against SUPPORTED_DTYPES, and the
    C++ answers are the same for float16 and bfloat16, so bfloat16 stands for both."""
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        major, minor = capability
        return f"the CUDA kernels need compute capability 8.0 or newer, this GPU has {major}.{minor}"
    size = facts.get("head_dim" if op == "causal_attention" else "hidden", 0)
    return torch.ops.fastgpt.cuda_unsupported_reason(op, int(size), torch.bfloat16) or None
