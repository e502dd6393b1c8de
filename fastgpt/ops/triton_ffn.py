"""Fused feed-forward block in Triton: y = proj(act(fc(x))) (+ residual), forward and backward.

Six GEMMs of the shared persistent kernel (`triton_gemm.matmul_kernel`), each with its elementwise
work fused into an epilogue, so no activation-sized tensor makes an extra trip through memory:

forward   h, a = x @ Wfc^T + b_fc, act(h)      one epilogue writes both; h is kept for the backward
          y = a @ Wproj^T + b_proj (+ residual) a is dropped once y exists
backward  dH, a = (dY @ Wproj) * act'(h), act(h) dA lives only in registers; the epilogue that reads
                                                 h for act'(h) also writes a = act(h) and per-tile
                                                 column sums of dH (db_fc partials)
          dWproj^T = a^T @ dY                   a read as a plain operand (through TMA on Hopper); a
                                                 virtual row of ones under a^T yields db_proj = sum_tokens dY
          dWfc = dH^T @ x,  dx = dH @ Wfc

Bias gradients therefore cost no pass over memory of their own: db_proj comes out of a tensor-core
GEMM (one extra output row, which usually fits in the last wave of tiles), and db_fc is one
(tokens / 64, hidden) fp32 partial buffer added up by `sum_rows`. Transposed operands are strided
views; nothing is copied. Saved for the backward: x and h (plus the weights), i.e. (C + H) values a
token, against (C + 2H) for eager F.linear -> gelu -> F.linear.

Memory of the backward's act(h): rather than recompute act(h) from h in every K step of the dWproj
GEMM (which would also keep a^T's tiles out of TMA's reach: they would have to pass through
registers), the dH GEMM writes it once, into a (tokens, H) buffer in the input dtype that lives from
the dH GEMM until dWproj has read it. That raises the backward's peak by tokens x H x element bytes
(as much as dH itself: 48 MiB for 8192 tokens at GPT-2 small's H = 3072 in bf16, per layer, freed
before the next layer's backward), and costs one extra write and read of it; nothing more is saved
between forward and backward.
"""

import torch

from fastgpt import dispatch
from fastgpt.ops.device import on_device_of
from fastgpt.ops.memory import new_output
from fastgpt.ops.triton_gemm import (
    GEMM_DTYPES,
    column_sums_rows,
    matmul,
    matmul_arguments,
    matmul_compile_cases,
    sum_rows,
)

# ----------------------------------------------------------------------------------------------
# Constants

SUPPORTED_DTYPES = GEMM_DTYPES


# ----------------------------------------------------------------------------------------------
# Host launchers (the kernels live in triton_gemm.py)


def ffn_forward(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual, keep_preactivation):
    """Returns y (..., C_out) and the pre-activation h (..., H) kept for the backward (an empty
    tensor, and one output less to write, when no backward will follow)."""
    channels, hidden, out_features = x.shape[-1], fc_weight.shape[0], proj_weight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, channels)  # (M, C), a view whenever the leading dims can be merged
    tokens = x2.shape[0]
    a = new_output((tokens, hidden), x.dtype, x.device)  # act(h): lives until GEMM2 has read it
    y = new_output((*lead, out_features), x.dtype, x.device)
    if keep_preactivation:
        h = new_output((*lead, hidden), x.dtype, x.device)
        h2 = h.view(tokens, hidden)  # (M, H)
        matmul(x2, fc_weight.t(), a, bias=fc_bias, aux=h2, activation=activation, epilogue="store_preact")
    else:
        h = x.new_empty(0)
        matmul(x2, fc_weight.t(), a, bias=fc_bias, activation=activation, epilogue="activate")
    residual2 = residual.reshape(tokens, out_features) if residual is not None else None  # (M, C_out)
    matmul(a, proj_weight.t(), y.view(tokens, out_features), bias=proj_bias, residual=residual2)
    return y, h


def ffn_backward(dy, x, h, fc_weight, proj_weight, activation, fc_bias_grad, proj_bias_grad):
    """Gradients (dx, dWfc, dbfc, dWproj, dbproj); a bias gradient not asked for is an empty tensor."""
    channels, hidden, out_features = x.shape[-1], fc_weight.shape[0], proj_weight.shape[0]
    dtype, device = x.dtype, x.device
    x2 = x.reshape(-1, channels)  # (M, C)
    tokens = x2.shape[0]
    h2 = h.reshape(tokens, hidden)  # (M, H)
    dy2 = dy.reshape(tokens, out_features)  # (M, C_out)

    # dH = (dY @ Wproj) * act'(h), with per-tile column sums of dH for db_fc, and act(h) for dWproj.
    dh = new_output((tokens, hidden), dtype, device)
    activated = new_output((tokens, hidden), dtype, device)  # act(h): freed once dWproj has read it
    partial_fc_bias = (
        torch.zeros(column_sums_rows(tokens), hidden, dtype=torch.float32, device=device)
        if fc_bias_grad
        else None
    )
    matmul(
        dy2,
        proj_weight,
        dh,
        aux=h2,
        act_out=activated,
        activation=activation,
        epilogue="grad_and_activate",
        column_sums=partial_fc_bias,
    )

    # dWproj^T (H, C_out) = act(h)^T @ dY, written through dWproj's transposed view; the ones row gives db_proj.
    proj_weight_grad = new_output((out_features, hidden), dtype, device)
    proj_bias_grad_out = new_output((out_features,), dtype, device) if proj_bias_grad else None
    matmul(activated.t(), dy2, proj_weight_grad.t(), bias_grad=proj_bias_grad_out)
    del activated

    fc_weight_grad = new_output((hidden, channels), dtype, device)
    matmul(dh.t(), x2, fc_weight_grad)  # dWfc (H, C) = dH^T @ x
    dx = new_output(x.shape, dtype, device)
    matmul(dh, fc_weight, dx.view(tokens, channels))  # dx (M, C) = dH @ Wfc

    fc_bias_grad_out = (
        sum_rows(partial_fc_bias, new_output((hidden,), dtype, device)) if fc_bias_grad else None
    )
    return (
        dx,
        fc_weight_grad,
        fc_bias_grad_out if fc_bias_grad else x.new_empty(0),
        proj_weight_grad,
        proj_bias_grad_out if proj_bias_grad else x.new_empty(0),
    )


# ----------------------------------------------------------------------------------------------
# Custom ops and autograd


@torch.library.custom_op("fastgpt::triton_fused_ffn", mutates_args=())
def _fused_ffn_op(
    x: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    activation: str,
    residual: torch.Tensor | None,
    keep_preactivation: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks its arguments as fused_ffn does (a user may call torch.ops.fastgpt.triton_fused_ffn)."""
    op = "fastgpt::triton_fused_ffn"
    dispatch.validate_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual, op)
    dispatch.check_kernel_dtype(op, "x", x, SUPPORTED_DTYPES)
    with on_device_of(x):
        return ffn_forward(
            x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual, keep_preactivation
        )


@_fused_ffn_op.register_fake
def _(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual, keep_preactivation):
    lead = x.shape[:-1]
    h = x.new_empty((*lead, fc_weight.shape[0]) if keep_preactivation else (0,))
    return x.new_empty((*lead, proj_weight.shape[0])), h


@torch.library.custom_op("fastgpt::triton_fused_ffn_backward", mutates_args=())
def _fused_ffn_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    fc_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    activation: str,
    fc_bias_grad: bool,
    proj_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks x, the weights and the activation as fused_ffn does, and dy and h against them (the GEMMs
    read them as x's rows at proj_weight's and fc_weight's widths)."""
    op = "fastgpt::triton_fused_ffn_backward"
    dispatch.validate_ffn(x, fc_weight, None, proj_weight, None, activation, None, op)
    dispatch.check_kernel_dtype(op, "x", x, SUPPORTED_DTYPES)
    lead = x.shape[:-1]
    dispatch.check_saved(op, "dy", dy, (*lead, proj_weight.shape[0]), "x", x)
    dispatch.check_saved(op, "h", h, (*lead, fc_weight.shape[0]), "x", x)
    with on_device_of(x):
        return ffn_backward(dy, x, h, fc_weight, proj_weight, activation, fc_bias_grad, proj_bias_grad)


@_fused_ffn_backward_op.register_fake
def _(dy, x, h, fc_weight, proj_weight, activation, fc_bias_grad, proj_bias_grad):
    hidden, out_features = fc_weight.shape[0], proj_weight.shape[0]
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        fc_weight.new_empty(fc_weight.shape),
        x.new_empty((hidden,) if fc_bias_grad else (0,)),
        proj_weight.new_empty(proj_weight.shape),
        x.new_empty((out_features,) if proj_bias_grad else (0,)),
    )


def _setup_context(ctx, inputs, output):
    x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual, keep_preactivation = inputs
    _, h = output
    ctx.mark_non_differentiable(h)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs nobody uses
    ctx.save_for_backward(x, h, fc_weight, proj_weight)
    ctx.activation = activation
    ctx.has_fc_bias = fc_bias is not None
    ctx.has_proj_bias = proj_bias is not None
    ctx.has_residual = residual is not None
    ctx.kept_preactivation = keep_preactivation


def _backward(ctx, dy, _dh):
    if not ctx.kept_preactivation:
        raise RuntimeError("fused_ffn: the forward ran with keep_preactivation=False, so it kept no h")
    x, h, fc_weight, proj_weight = ctx.saved_tensors
    dx, dfc_weight, dfc_bias, dproj_weight, dproj_bias = _fused_ffn_backward_op(
        dy, x, h, fc_weight, proj_weight, ctx.activation, ctx.has_fc_bias, ctx.has_proj_bias
    )
    return (
        dx,
        dfc_weight,
        dfc_bias if ctx.has_fc_bias else None,
        dproj_weight,
        dproj_bias if ctx.has_proj_bias else None,
        None,
        dy if ctx.has_residual else None,
        None,
    )


_fused_ffn_op.register_autograd(_backward, setup_context=_setup_context)


def fused_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, activation="gelu_tanh", residual=None):
    """The triton backend of fastgpt.fused_ffn (arguments already validated by dispatch). The
    pre-activation h is written and kept only when autograd will need it."""
    inputs = (x, fc_weight, fc_bias, proj_weight, proj_bias, residual)
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    y, _ = _fused_ffn_op(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual, keep)
    return y


# ----------------------------------------------------------------------------------------------
# No-GPU compile check


def gpu_compile_cases(capability):
    """Each GEMM variant the FFN launches, in bf16 with the largest configuration (triton_gemm compiles
    every configuration of the kernel), at GPT-2 small shapes: 8192 tokens, C 768, H 3072; gelu, relu
    and silu with the smallest."""
    tokens, channels, hidden = 8192, 768, 3072

    def meta(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    def forward_fc(activation):
        def make(dtype):
            x, w, b = (
                meta(tokens, channels, dtype=dtype),
                meta(hidden, channels, dtype=dtype),
                meta(hidden, dtype=dtype),
            )
            out, h = meta(tokens, hidden, dtype=dtype), meta(tokens, hidden, dtype=dtype)
            return matmul_arguments(
                x, w.t(), out, bias=b, aux=h, activation=activation, epilogue="store_preact"
            )

        return make

    def forward_proj(dtype):
        a, w, b = (
            meta(tokens, hidden, dtype=dtype),
            meta(channels, hidden, dtype=dtype),
            meta(channels, dtype=dtype),
        )
        y, residual = meta(tokens, channels, dtype=dtype), meta(tokens, channels, dtype=dtype)
        return matmul_arguments(a, w.t(), y, bias=b, residual=residual)

    def backward_dh(dtype):
        dy, w, h = (
            meta(tokens, channels, dtype=dtype),
            meta(channels, hidden, dtype=dtype),
            meta(tokens, hidden, dtype=dtype),
        )
        sums = meta(column_sums_rows(tokens), hidden, dtype=torch.float32)
        return matmul_arguments(
            dy,
            w,
            meta(tokens, hidden, dtype=dtype),
            aux=h,
            act_out=meta(tokens, hidden, dtype=dtype),
            activation="gelu_tanh",
            epilogue="grad_and_activate",
            column_sums=sums,
        )

    def backward_proj_weight(dtype):
        activated, dy = meta(tokens, hidden, dtype=dtype), meta(tokens, channels, dtype=dtype)
        grad = meta(channels, hidden, dtype=dtype)
        return matmul_arguments(activated.t(), dy, grad.t(), bias_grad=meta(channels, dtype=dtype))

    def backward_fc_weight(dtype):
        dh, x = meta(tokens, hidden, dtype=dtype), meta(tokens, channels, dtype=dtype)
        return matmul_arguments(dh.t(), x, meta(hidden, channels, dtype=dtype))

    variants = {
        "ffn fc+gelu_tanh": forward_fc("gelu_tanh"),
        "ffn proj+residual": forward_proj,
        "ffn dH=dA*act'(h), act(h)": backward_dh,
        "ffn dWproj^T=act(h)^T dY, db": backward_proj_weight,
        "ffn dWfc=dH^T x": backward_fc_weight,
    }
    cases = [case for name, make in variants.items() for case in matmul_compile_cases(capability, name, make)]

    def inference_fc(dtype):
        x, w, b = (
            meta(tokens, channels, dtype=dtype),
            meta(hidden, channels, dtype=dtype),
            meta(hidden, dtype=dtype),
        )
        out = meta(tokens, hidden, dtype=dtype)
        return matmul_arguments(x, w.t(), out, bias=b, activation="gelu_tanh", epilogue="activate")

    cases += matmul_compile_cases(capability, "ffn fc+gelu_tanh, no h kept", inference_fc, configs="smallest")
    # The other activations' code, with the quickest configuration.
    for activation in ("gelu", "relu", "silu"):
        name = f"ffn fc+{activation}"
        cases += matmul_compile_cases(capability, name, forward_fc(activation), configs="smallest")
    return cases
