"""LayerNorm with a fused residual add in Triton, forward and backward.

forward   s = x + residual (stored: the block's next residual stream), then per row, in fp32,
          mean (corrected two-pass), rstd = 1 / sqrt(var + eps) and out = (s - mean) * rstd * weight
          + bias. mean and rstd (fp32, one per row) are kept for the backward with s (or x without a
          residual).
backward  one pass over the rows: with xhat = (s - mean) * rstd (for fp32 rows re-centred to mean 0,
          which the float32 mean's rounding shifts it from) and g = dout * weight,
          ds = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ the gradient arriving at the s output);
          x and residual both receive ds. dweight = sum_rows dout * xhat and dbias = sum_rows dout are
          accumulated by each program over its own contiguous group of rows into one fp32 partial
          row, and `sum_rows` adds the partial rows in a fixed order: no atomics, deterministic.
"""

import torch
import triton
import triton.language as tl

from fastgpt import dispatch
from fastgpt.dispatch import triton_interpreter_enabled
from fastgpt.ops.device import on_device_of
from fastgpt.ops.memory import new_output
from fastgpt.ops.triton_gemm import compile_case, multiprocessor_count, sum_rows

# ----------------------------------------------------------------------------------------------
# Constants

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A row is held whole in registers: 16384 fp32 values over 16 warps is 32 registers per thread per
# live row-sized value. About six are live in the backward, which at 16384 spills 0.6-0.7 KiB
# (tests/test_triton_compile.py's ledger): the price of reading each row once.
MAX_HIDDEN = 16384
# Elements of one program's (BLOCK_M, BLOCK_N) tile. Forward: 8192 (16 KiB of bf16 in flight per
# program, and three programs per SM cover H100/H200 memory latency). Backward: 4096, because it keeps
# two fp32 accumulators next to four row-sized values. The interpreter uses small tiles so a few dozen
# rows already span several row blocks and several backward programs.
FORWARD_TILE = 8192
BACKWARD_TILE = 4096
INTERPRETER_TILE = 256
# Backward programs per SM: each walks a contiguous group of rows; 4 per SM keeps enough loads in
# flight while the partial buffers stay at 4 x SMs rows.
BACKWARD_PROGRAMS_PER_SM = 4


def unsupported_reason(op, hidden=None, **facts):
    if hidden is not None and hidden > MAX_HIDDEN:
        return f"the Triton layer_norm holds a row in registers and supports hidden sizes up to {MAX_HIDDEN}, got {hidden}"
    return None


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def layer_norm_forward_kernel(
    x_ptr,  # (M, N) input
    stride_xm,  # x's row stride, in elements
    stride_xn,  # x's column stride
    residual_ptr,  # (M, N) added to x first (RESIDUAL)
    stride_rm,  # residual's row stride
    stride_rn,  # residual's column stride
    sum_ptr,  # (M, N) contiguous: x + residual, an output (RESIDUAL)
    out_ptr,  # (M, N) contiguous: the normalised rows
    weight_ptr,  # (N,) (HAS_WEIGHT)
    bias_ptr,  # (N,) (HAS_BIAS)
    mean_ptr,  # (M,) fp32
    rstd_ptr,  # (M,) fp32
    M,  # rows
    N,  # hidden size
    eps,  # added to the variance
    RESIDUAL: tl.constexpr,  # add residual_ptr and store the sum
    HAS_WEIGHT: tl.constexpr,  # scale by weight_ptr
    HAS_BIAS: tl.constexpr,  # shift by bias_ptr
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # >= N: a whole row
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(
        tl.float32
    )
    if RESIDUAL:
        x += tl.load(
            residual_ptr + rows64[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0
        ).to(tl.float32)
        s = x.to(sum_ptr.dtype.element_ty)  # the statistics are those of the stored (rounded) sum
        tl.store(sum_ptr + rows64[:, None] * N + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    # Corrected two-pass mean: the sum of values far from 0 (rows near 1e4 with unit spread) is rounded
    # at their magnitude; the deviations from that rough mean are exact and small, and their mean
    # corrects it to float32's resolution.
    rough_mean = tl.sum(x, axis=1) / N  # (BLOCK_M,)
    mean = rough_mean + tl.sum(tl.where(mask, x - rough_mean[:, None], 0.0), axis=1) / N
    centered = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)  # (BLOCK_M,)
    out = centered * rstd[:, None]
    if HAS_WEIGHT:
        out *= tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows64[:, None] * N + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def layer_norm_backward_kernel(
    dout_ptr,  # (M, N) gradient of out
    stride_dm,  # dout's row stride, in elements
    stride_dn,  # dout's column stride
    x_ptr,  # (M, N) the normalised input: x, or the saved sum x + residual
    stride_xm,  # its row stride
    stride_xn,  # its column stride
    dsum_ptr,  # (M, N) gradient arriving at the sum output (HAS_DSUM)
    stride_sm,  # dsum's row stride
    stride_sn,  # dsum's column stride
    weight_ptr,  # (N,) (HAS_WEIGHT)
    mean_ptr,  # (M,) fp32
    rstd_ptr,  # (M,) fp32
    dx_ptr,  # (M, N) contiguous: gradient of the normalised input
    partial_weight_ptr,  # fp32 (programs, N): this program's sum of dout * xhat (WEIGHT_GRAD)
    partial_bias_ptr,  # fp32 (programs, N): this program's sum of dout (BIAS_GRAD)
    M,  # rows
    N,  # hidden size
    rows_per_program,  # a multiple of BLOCK_M
    HAS_DSUM: tl.constexpr,  # add dsum_ptr to dx
    HAS_WEIGHT: tl.constexpr,  # the forward scaled by weight_ptr
    WEIGHT_GRAD: tl.constexpr,  # write partial_weight_ptr
    BIAS_GRAD: tl.constexpr,  # write partial_bias_ptr
    BLOCK_M: tl.constexpr,  # rows per step
    BLOCK_N: tl.constexpr,  # >= N: a whole row
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_mask = cols < N
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_N,)
    weight_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = min(row_start + rows_per_program, M)
    for first_row in range(row_start, row_end, BLOCK_M):
        rows = first_row + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(
            tl.float32
        )
        dout = tl.load(
            dout_ptr + rows64[:, None] * stride_dm + cols[None, :] * stride_dn, mask=mask, other=0.0
        ).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            g = dout * weight[None, :]
        else:
            g = dout
        if x_ptr.dtype.element_ty == tl.float32:
            # The saved mean is float32, off by up to half an ulp of the row's level (5e-4 at 1e4): a
            # common shift of xhat, which the formula's mean(xhat) = 0 would carry into dx and dweight.
            # Re-centred (past the row's end too, where g and dout are 0). 16-bit gradients round far
            # more coarsely than the shift, and their kernels keep their registers for the row.
            xhat -= (tl.sum(xhat, axis=1) / N)[:, None]
        mean_g_xhat = tl.sum(g * xhat, axis=1) / N  # (BLOCK_M,)
        mean_g = tl.sum(g, axis=1) / N
        dx = (g - xhat * mean_g_xhat[:, None] - mean_g[:, None]) * rstd[:, None]
        if HAS_DSUM:
            dx += tl.load(
                dsum_ptr + rows64[:, None] * stride_sm + cols[None, :] * stride_sn, mask=mask, other=0.0
            ).to(tl.float32)
        tl.store(dx_ptr + rows64[:, None] * N + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if WEIGHT_GRAD:
            weight_acc += dout * xhat
        if BIAS_GRAD:
            bias_acc += dout
    if WEIGHT_GRAD:
        tl.store(partial_weight_ptr + pid * N + cols, tl.sum(weight_acc, axis=0), mask=col_mask)
    if BIAS_GRAD:
        tl.store(partial_bias_ptr + pid * N + cols, tl.sum(bias_acc, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------------------------
# Host launchers


def _tile(hidden, elements):
    """(BLOCK_M, BLOCK_N, num_warps): whole rows, as many as fit in `elements`, ~1024 per warp."""
    block_n = triton.next_power_of_2(hidden)
    tile = INTERPRETER_TILE if triton_interpreter_enabled() else elements
    block_m = max(1, tile // block_n)
    num_warps = min(16, max(1, block_m * block_n // 1024))
    return block_m, block_n, num_warps


def _unit_stride(vector):
    """The kernels read weight and bias (N,) with unit stride: a strided view is copied (N values)."""
    return vector.contiguous() if vector is not None else None


def _forward_arguments(x2, residual2, weight, bias, eps, out, summed, mean, rstd):
    placeholder = out
    return {
        "x_ptr": x2,
        "stride_xm": x2.stride(0),
        "stride_xn": x2.stride(1),
        "residual_ptr": residual2 if residual2 is not None else placeholder,
        "stride_rm": residual2.stride(0) if residual2 is not None else 0,
        "stride_rn": residual2.stride(1) if residual2 is not None else 0,
        "sum_ptr": summed if residual2 is not None else placeholder,
        "out_ptr": out,
        "weight_ptr": weight if weight is not None else placeholder,
        "bias_ptr": bias if bias is not None else placeholder,
        "mean_ptr": mean,
        "rstd_ptr": rstd,
        "M": x2.shape[0],
        "N": x2.shape[1],
        "eps": eps,
        "RESIDUAL": residual2 is not None,
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
    }


def layer_norm_forward(x, weight, bias, eps, residual):
    """Returns (out, sum, mean, rstd); `sum` = x + residual, or an empty tensor without a residual."""
    weight, bias = _unit_stride(weight), _unit_stride(bias)
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)  # (M, N), a view whenever the leading dims can be merged
    rows = x2.shape[0]
    residual2 = residual.reshape(rows, hidden) if residual is not None else None
    out = new_output(x.shape, x.dtype, x.device)
    summed = new_output(x.shape, x.dtype, x.device) if residual is not None else x.new_empty(0)
    mean = new_output((rows,), torch.float32, x.device)
    rstd = new_output((rows,), torch.float32, x.device)
    if rows == 0 or hidden == 0:
        return out, summed, mean.fill_(float("nan")), rstd.fill_(float("nan"))
    block_m, block_n, num_warps = _tile(hidden, FORWARD_TILE)
    args = _forward_arguments(x2, residual2, weight, bias, eps, out, summed, mean, rstd)
    layer_norm_forward_kernel[(triton.cdiv(rows, block_m),)](
        **args, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps
    )
    return out, summed, mean, rstd


def _backward_programs(rows, block_m, device):
    """(programs, rows_per_program): contiguous groups of whole row blocks, about 4 per SM."""
    row_blocks = triton.cdiv(rows, block_m)
    programs = min(row_blocks, BACKWARD_PROGRAMS_PER_SM * multiprocessor_count(device))
    rows_per_program = triton.cdiv(row_blocks, programs) * block_m
    return triton.cdiv(rows, rows_per_program), rows_per_program


def layer_norm_backward(dout, normed_input, weight, mean, rstd, dsum, weight_grad, bias_grad):
    """Returns (dx, dweight, dbias); dx already includes dsum; an unrequested gradient is empty."""
    weight = _unit_stride(weight)
    hidden = normed_input.shape[-1]
    x2 = normed_input.reshape(-1, hidden)  # (M, N)
    rows = x2.shape[0]
    dout2 = dout.reshape(rows, hidden)
    dsum2 = dsum.reshape(rows, hidden) if dsum is not None else None
    dtype, device = normed_input.dtype, normed_input.device
    dx = new_output(normed_input.shape, dtype, device)
    weight_grad_out = new_output((hidden,), dtype, device) if weight_grad else normed_input.new_empty(0)
    bias_grad_out = new_output((hidden,), dtype, device) if bias_grad else normed_input.new_empty(0)
    if hidden == 0:
        return dx, weight_grad_out, bias_grad_out
    block_m, block_n, num_warps = _tile(hidden, BACKWARD_TILE)
    programs, rows_per_program = _backward_programs(rows, block_m, device) if rows else (0, block_m)
    partial_weight = new_output((programs, hidden), torch.float32, device) if weight_grad else None
    partial_bias = new_output((programs, hidden), torch.float32, device) if bias_grad else None
    if programs:
        args = _backward_arguments(
            dout2, x2, dsum2, weight, mean, rstd, dx, partial_weight, partial_bias, rows_per_program
        )
        layer_norm_backward_kernel[(programs,)](**args, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    if weight_grad:
        sum_rows(partial_weight, weight_grad_out)
    if bias_grad:
        sum_rows(partial_bias, bias_grad_out)
    return dx, weight_grad_out, bias_grad_out


def _backward_arguments(
    dout2, x2, dsum2, weight, mean, rstd, dx, partial_weight, partial_bias, rows_per_program
):
    placeholder = dx
    return {
        "dout_ptr": dout2,
        "stride_dm": dout2.stride(0),
        "stride_dn": dout2.stride(1),
        "x_ptr": x2,
        "stride_xm": x2.stride(0),
        "stride_xn": x2.stride(1),
        "dsum_ptr": dsum2 if dsum2 is not None else placeholder,
        "stride_sm": dsum2.stride(0) if dsum2 is not None else 0,
        "stride_sn": dsum2.stride(1) if dsum2 is not None else 0,
        "weight_ptr": weight if weight is not None else placeholder,
        "mean_ptr": mean,
        "rstd_ptr": rstd,
        "dx_ptr": dx,
        "partial_weight_ptr": partial_weight if partial_weight is not None else placeholder,
        "partial_bias_ptr": partial_bias if partial_bias is not None else placeholder,
        "M": x2.shape[0],
        "N": x2.shape[1],
        "rows_per_program": rows_per_program,
        "HAS_DSUM": dsum2 is not None,
        "HAS_WEIGHT": weight is not None,
        "WEIGHT_GRAD": partial_weight is not None,
        "BIAS_GRAD": partial_bias is not None,
    }


# ----------------------------------------------------------------------------------------------
# Custom ops and autograd


@torch.library.custom_op("fastgpt::triton_layer_norm", mutates_args=())
def _layer_norm_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks its arguments as layer_norm does (a user may call torch.ops.fastgpt.triton_layer_norm)."""
    op = "fastgpt::triton_layer_norm"
    dispatch.validate_layer_norm(x, weight, bias, eps, residual, op)
    dispatch.check_kernel_dtype(op, "x", x, SUPPORTED_DTYPES)
    with on_device_of(x):
        return layer_norm_forward(x, weight, bias, eps, residual)


@_layer_norm_op.register_fake
def _(x, weight, bias, eps, residual):
    rows = x.shape[:-1].numel()
    summed = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    stats = x.new_empty((rows,), dtype=torch.float32)
    return x.new_empty(x.shape), summed, stats, torch.empty_like(stats)


@torch.library.custom_op("fastgpt::triton_layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(
    dout: torch.Tensor,
    normed_input: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dsum: torch.Tensor | None,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks normed_input and weight as layer_norm checks x and weight, and dout, dsum, mean and rstd
    against them (the kernel reads them by row)."""
    op = "fastgpt::triton_layer_norm_backward"
    dispatch.validate_layer_norm(normed_input, weight, None, 0.0, None, op)
    dispatch.check_kernel_dtype(op, "normed_input", normed_input, SUPPORTED_DTYPES)
    dispatch.check_saved(op, "dout", dout, normed_input.shape, "normed_input", normed_input)
    if dsum is not None:
        dispatch.check_saved(op, "dsum", dsum, normed_input.shape, "normed_input", normed_input)
    rows = normed_input.shape[:-1].numel()
    dispatch.check_saved(op, "mean", mean, (rows,), "normed_input", normed_input, torch.float32)
    dispatch.check_saved(op, "rstd", rstd, (rows,), "normed_input", normed_input, torch.float32)
    with on_device_of(normed_input):
        return layer_norm_backward(dout, normed_input, weight, mean, rstd, dsum, weight_grad, bias_grad)


@_layer_norm_backward_op.register_fake
def _(dout, normed_input, weight, mean, rstd, dsum, weight_grad, bias_grad):
    hidden = normed_input.shape[-1]
    return (
        normed_input.new_empty(normed_input.shape),
        normed_input.new_empty((hidden,) if weight_grad else (0,)),
        normed_input.new_empty((hidden,) if bias_grad else (0,)),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, residual = inputs
    _, summed, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs nobody uses
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    ctx.has_weight = weight is not None
    ctx.save_for_backward(summed if residual is not None else x, weight, mean, rstd)


def _backward(ctx, dout, dsum, _dmean, _drstd):
    normed_input, weight, mean, rstd = ctx.saved_tensors
    if dout is None:  # only the sum x + residual was used
        dout = torch.zeros_like(normed_input)
    dsum = dsum if ctx.has_residual else None  # without a residual the sum output is an empty placeholder
    dx, dweight, dbias = _layer_norm_backward_op(
        dout, normed_input, weight, mean, rstd, dsum, ctx.has_weight, ctx.has_bias
    )
    return (
        dx,
        dweight if ctx.has_weight else None,
        dbias if ctx.has_bias else None,
        None,
        dx if ctx.has_residual else None,
    )


_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """The triton backend of fastgpt.layer_norm: out, or (out, x + residual) with a residual."""
    out, summed, _, _ = _layer_norm_op(x, weight, bias, eps, residual)
    return (out, summed) if residual is not None else out


# ----------------------------------------------------------------------------------------------
# No-GPU compile check


def gpu_compile_cases(capability):
    """Forward (with residual, weight and bias) and backward, bf16, at GPT-2's 768 and the largest 16384."""
    cases = []
    rows = 8192
    for hidden in (768, MAX_HIDDEN):

        def meta(*shape, dtype=torch.bfloat16):
            return torch.empty(*shape, dtype=dtype, device="meta")

        x, vector, stats = meta(rows, hidden), meta(hidden), meta(rows, dtype=torch.float32)
        block_m, block_n, num_warps = _tile(hidden, FORWARD_TILE)
        args = _forward_arguments(
            x, meta(rows, hidden), vector, vector, 1e-5, meta(rows, hidden), meta(rows, hidden), stats, stats
        )
        cases.append(
            compile_case(
                f"layer_norm_forward bf16 N={hidden}",
                layer_norm_forward_kernel,
                args,
                {"BLOCK_M": block_m, "BLOCK_N": block_n},
                num_warps,
                3,
                tensor_cores=False,
            )
        )
        block_m, block_n, num_warps = _tile(hidden, BACKWARD_TILE)
        partial = meta(4 * 132, hidden, dtype=torch.float32)
        args = _backward_arguments(x, x, x, vector, stats, stats, meta(rows, hidden), partial, partial, 64)
        cases.append(
            compile_case(
                f"layer_norm_backward bf16 N={hidden}",
                layer_norm_backward_kernel,
                args,
                {"BLOCK_M": block_m, "BLOCK_N": block_n},
                num_warps,
                3,
                tensor_cores=False,
            )
        )
    return cases
