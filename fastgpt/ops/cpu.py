"""The `cpu` backend: fused C++ kernels (csrc/cpu) behind the torch operators of fastgpt._C.

fastgpt._C defines torch.ops.fastgpt.* in csrc/api.cpp: the forward and backward of each op, each
with a CPU implementation (C++ kernels, OpenMP, run-time choice of AVX-512/AVX2/baseline code) and a
Meta implementation (shapes, for FakeTensor and torch.compile). This module registers their autograd
and exposes the four ops with the signatures dispatch.py calls:

- causal_attention: tiled FlashAttention-2-style forward and backward, O(seq_len) memory, the
  logsumexp saved; the backward is deterministic;
- fused_ffn: BLAS GEMMs with the bias + activation epilogue (and, in the backward, the activation's
  derivative) fused into one pass over each GEMM output; saves x and h only;
- layer_norm: one pass per row forward and backward, residual add fused, deterministic dweight/dbias;
- linear_cross_entropy: chunked over tokens (no full logits), with the gradients formed in the same
  pass for 'mean' and 'sum'.

It also exposes `linear`, which fastgpt.nn.Linear uses for the projections of a decode step: up to
16 rows go through a kernel that streams the weight once (benchmarks/cpu_linear.py), more rows
through BLAS; and `decode_blocks`, GPT.generate's decode step: every block of a fastgpt.nn.GPT over a
few new tokens in one C++ call, the same kernels in the same order as the modules (bitwise equal),
without the ~15 Python op calls per block (2.6 -> 0.5 ms per token of overhead for 12 blocks).

Supported dtypes are float32 and bfloat16 (float32 accumulation). Importing this module raises
ImportError, with the reason, when fastgpt._C was not built.
"""

import os

import torch

_BUILD_ERROR_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_C_build_error.txt")


def _missing_extension_message(error):
    if os.path.exists(_BUILD_ERROR_FILE):
        with open(_BUILD_ERROR_FILE) as file:
            return f"fastgpt._C was not built: {file.read().strip()}"
    return (
        f"fastgpt._C is not built ({error}); compile it with `pip install --no-build-isolation -e .` "
        "or, in a source checkout, `python setup.py build_ext --inplace`"
    )


try:
    from fastgpt import _C  # importing it registers torch.ops.fastgpt.*
except ImportError as _error:
    raise ImportError(_missing_extension_message(_error)) from _error

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)

_ops = torch.ops.fastgpt


# ----------------------------------------------------------------------------------------------
# Linear (the few-row projections of a decode step)


# The most rows `linear` runs on the kernel (more go to BLAS inside the op): 1.25-3.9x BLAS at 1-16
# rows of GPT-2 projections, no faster beyond (benchmarks/cpu_linear.py; csrc/cpu/kernels.h).
LINEAR_KERNEL_MAX_ROWS = _C.LINEAR_KERNEL_MAX_ROWS


def linear(x, weight, bias):
    """x: (..., K) @ weight (N, K)^T + bias (N). Returns (..., N)."""
    rows = x.reshape(-1, x.shape[-1])  # (M, K)
    return _ops.linear(rows, weight, bias).reshape(*x.shape[:-1], weight.shape[0])


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, dout):
    x, weight = ctx.saved_tensors  # (M, K), (N, K)
    dbias = dout.sum(0) if ctx.has_bias else None  # (N,)
    return dout @ weight, dout.t() @ x, dbias


torch.library.register_autograd("fastgpt::linear", _linear_backward, setup_context=_linear_setup_context)


# ----------------------------------------------------------------------------------------------
# GPT decode step (inference only: no autograd)


def decode_blocks(x, block_params, keys, values, start, heads, eps, softmax_scale, activation):
    """The pre-LN GPT-2 blocks of fastgpt.nn over x (B, T, C), the new tokens at positions start ..
    start+T-1, in one call: block_params holds 12 tensors (or None for absent biases) per block (ln_1,
    attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj; weight then bias), keys and values one
    (B, Hkv, max_len, D) cache per block, written at those positions. Returns the residual stream
    after the last block (B, T, C), equal to running the blocks one op at a time on this backend."""
    return _ops.decode_blocks(x, block_params, keys, values, start, heads, eps, softmax_scale, activation)


# ----------------------------------------------------------------------------------------------
# Causal attention


def causal_attention(q, k, v, softmax_scale):
    """q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D), any strides. Returns (B, H, Tq, D) in q's dtype."""
    out, _ = _ops.attention_forward(q, k, v, softmax_scale)
    return out


def _attention_setup_context(ctx, inputs, output):
    q, k, v, softmax_scale = inputs
    out, lse = output
    ctx.set_materialize_grads(False)  # lse gets no gradient: no zero tensor for it
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale = softmax_scale


def _attention_backward(ctx, dout, _dlse):
    if dout is None:
        return None, None, None, None
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _ops.attention_backward(dout, q, k, v, out, lse, ctx.softmax_scale)
    return dq, dk, dv, None


torch.library.register_autograd(
    "fastgpt::attention_forward", _attention_backward, setup_context=_attention_setup_context
)


# ----------------------------------------------------------------------------------------------
# FFN


def fused_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual):
    """proj(act(fc(x))) (+ residual); x: (..., C). Returns (..., C_out)."""
    out_features = proj_weight.shape[0]
    rows = x.reshape(-1, x.shape[-1])  # (M, C)
    residual_rows = residual.reshape(-1, out_features) if residual is not None else None  # (M, C_out)
    out, _ = _ops.ffn_forward(rows, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual_rows)
    return out.reshape(*x.shape[:-1], out_features)


def _ffn_setup_context(ctx, inputs, output):
    x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual = inputs
    _, h = output
    ctx.save_for_backward(x, h, fc_weight, proj_weight)  # activations: x and h only
    ctx.set_materialize_grads(False)  # h gets no gradient: no (tokens, hidden) zero tensor for it
    ctx.activation = activation
    ctx.has_fc_bias = fc_bias is not None
    ctx.has_proj_bias = proj_bias is not None
    ctx.has_residual = residual is not None


def _ffn_backward(ctx, dout, _dh):
    if dout is None:
        return (None,) * 7
    x, h, fc_weight, proj_weight = ctx.saved_tensors
    dx, dfc_weight, dfc_bias, dproj_weight, dproj_bias = _ops.ffn_backward(
        dout, x, h, fc_weight, proj_weight, ctx.activation
    )
    return (
        dx,
        dfc_weight,
        dfc_bias if ctx.has_fc_bias else None,
        dproj_weight,
        dproj_bias if ctx.has_proj_bias else None,
        None,
        dout if ctx.has_residual else None,
    )


torch.library.register_autograd("fastgpt::ffn_forward", _ffn_backward, setup_context=_ffn_setup_context)


# ----------------------------------------------------------------------------------------------
# LayerNorm (+ fused residual)


def layer_norm(x, weight, bias, eps, residual):
    """LayerNorm over the last dim; with a residual, returns (out, x + residual)."""
    rows = x.reshape(-1, x.shape[-1])  # (R, C)
    residual_rows = residual.reshape(-1, x.shape[-1]) if residual is not None else None  # (R, C)
    out, residual_out, _, _ = _ops.layer_norm_forward(rows, weight, bias, residual_rows, eps)
    if residual is None:
        return out.reshape(x.shape)
    return out.reshape(x.shape), residual_out.reshape(x.shape)


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, residual, _ = inputs
    _, residual_out, mean, rstd = output
    normalized_input = residual_out if residual is not None else x  # (R, C): what was normalised
    ctx.save_for_backward(normalized_input, weight, mean, rstd)
    ctx.set_materialize_grads(False)  # mean, rstd (and an unused x + residual) get no zero tensors
    ctx.has_weight = weight is not None
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None


def _layer_norm_backward(ctx, dout, dresidual_out, _dmean, _drstd):
    if not ctx.has_residual:
        dresidual_out = None  # the placeholder (0,) output
    if dout is None and dresidual_out is None:
        return (None,) * 5
    normalized_input, weight, mean, rstd = ctx.saved_tensors
    if dout is None:  # only x + residual was used
        dout = torch.zeros_like(normalized_input)
    dx, dweight, dbias = _ops.layer_norm_backward(dout, dresidual_out, normalized_input, weight, mean, rstd)
    return (
        dx,
        dweight if ctx.has_weight else None,
        dbias if ctx.has_bias else None,
        dx if ctx.has_residual else None,
        None,
    )


torch.library.register_autograd(
    "fastgpt::layer_norm_forward", _layer_norm_backward, setup_context=_layer_norm_setup_context
)


# ----------------------------------------------------------------------------------------------
# Linear cross-entropy


def linear_cross_entropy(x, weight, targets, bias, ignore_index, reduction):
    """cross_entropy(x @ weight.T + bias, targets) in chunks; the loss is float32."""
    rows = x.reshape(-1, x.shape[-1])  # (N, C)
    flat_targets = targets.reshape(-1)  # (N,)
    # With 'mean'/'sum' the gradients cost little extra in the forward pass, which computes them when
    # autograd will need them; 'none' needs the per-row upstream gradient, so its backward runs a pass.
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    loss, _, _, _ = _ops.linear_cross_entropy_forward(
        rows, weight, flat_targets, bias, ignore_index, reduction, wants_grad and reduction != "none"
    )
    return loss.reshape(targets.shape) if reduction == "none" else loss


def _cross_entropy_setup_context(ctx, inputs, output):
    x, weight, targets, bias, ignore_index, reduction, compute_grad = inputs
    _, dx, dweight, dbias = output
    ctx.ignore_index = ignore_index
    ctx.reduction = reduction
    ctx.compute_grad = compute_grad
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)  # dx, dweight, dbias outputs get no (vocab, channels) zero tensors
    if compute_grad:
        ctx.save_for_backward(targets, dx, dweight, dbias)
    else:
        ctx.save_for_backward(targets, x, weight, bias)


def _cross_entropy_backward(ctx, dloss, _ddx, _ddweight, _ddbias):
    if dloss is None:
        return (None,) * 7
    targets = ctx.saved_tensors[0]
    scale = dloss  # () for 'mean'/'sum', (N,) for 'none'
    if ctx.reduction == "mean":
        # With no kept row the gradients of sum(loss) are zeros; max(kept, 1) keeps them zeros (as
        # the reference's) instead of 0 * inf = NaN.
        scale = dloss / (targets != ctx.ignore_index).sum().clamp_min(1)
    if ctx.compute_grad:
        # The forward formed the gradients of sum(loss); scale them by the upstream gradient.
        _, dx, dweight, dbias = ctx.saved_tensors
        dx, dweight = dx * scale, dweight * scale
        dbias = dbias * scale if ctx.has_bias else None
    else:
        _, x, weight, bias = ctx.saved_tensors
        row_grad = scale.expand(targets.shape).to(torch.float32).contiguous()  # (N,)
        dx, dweight, dbias = _ops.linear_cross_entropy_backward(
            x, weight, targets, bias, row_grad, ctx.ignore_index
        )
        dbias = dbias if ctx.has_bias else None
    return dx, dweight, None, dbias, None, None, None


torch.library.register_autograd(
    "fastgpt::linear_cross_entropy_forward",
    _cross_entropy_backward,
    setup_context=_cross_entropy_setup_context,
)
