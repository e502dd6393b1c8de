"""Shared Triton building blocks: a persistent tiled GEMM with fused epilogues, and a deterministic row-sum.

`matmul` computes C = A @ B for A (M, K) and B (K, N) of any strides, so transposed operands (x^T,
W^T, dH^T) are read in place and never copied. The FFN and the linear cross-entropy choose what
happens around the product with compile-time flags:

- ONES_ROW: A gets a virtual row M of ones; its output row, sum_k B[k, :], is a bias gradient;
- epilogues: + bias; store h and act(h) (STORE_PREACT) or act(h) only (ACTIVATE); multiply by
  act'(h) (GRAD_ACTIVATION), also storing act(h) (GRAD_AND_ACTIVATE);
  + residual; + an fp32 accumulator (ACCUMULATE); per-tile column sums (COLUMN_SUMS);
- split-K: C is SPLIT_K fp32 partials, each over one range of K, summed by `sum_rows`.

The kernel is persistent: one program per SM walks the output tiles (and splits) in a grouped order,
so the programs running together share A row panels and B column panels in L2. On Hopper (sm_90)
each operand that TMA can describe (unit stride in one dimension, the other stride, the base
address and so every row 16-byte aligned) is loaded through a host-side tensor descriptor, whose
tiles land in shared memory asynchronously and feed wgmma directly; one TMA cannot describe (GPT-2's
50257-wide logits rows, a broadcast operand) and every operand on sm_80 use pointer loads (cp.async).
A column-major operand is described through its transpose and its tiles are transposed in shared
memory (wgmma reads either major order of 16-bit operands).

Wide tiles run their epilogue on column slices in turn (EPILOGUE_SUBTILES): the fp32 accumulator
already takes 128 registers a thread at 128 x 256 over 8 warps, and the epilogue's loads and
temporaries (h and act(h) with act'(h), a residual, an fp32 accumulator) for the whole tile at once
would spill.

`sum_rows` adds the rows of an fp32 (R, N) buffer into one row of N in a fixed order: the second
stage of every deterministic, atomic-free reduction in the Triton backend (bias gradients, LayerNorm
weight gradients, split-K partials).
"""

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fastgpt.dispatch import triton_interpreter_enabled

# ----------------------------------------------------------------------------------------------
# Constants

# The interpreter runs tl.dot on bfloat16's raw bits (numpy has no bfloat16): bf16 GEMMs need a GPU.
GEMM_DTYPES = (
    (torch.float16, torch.float32)
    if triton_interpreter_enabled()
    else (torch.float16, torch.bfloat16, torch.float32)
)

# Activation codes (the kernels' ACTIVATION); 0 means none.
GELU_TANH: tl.constexpr = tl.constexpr(1)
GELU_ERF: tl.constexpr = tl.constexpr(2)
RELU: tl.constexpr = tl.constexpr(3)
SILU: tl.constexpr = tl.constexpr(4)
ACTIVATION_IDS = {
    "gelu_tanh": GELU_TANH.value,
    "gelu": GELU_ERF.value,
    "relu": RELU.value,
    "silu": SILU.value,
}

# Epilogue modes of the GEMM.
PLAIN: tl.constexpr = tl.constexpr(0)
STORE_PREACT: tl.constexpr = tl.constexpr(1)  # C = act(acc + bias), aux = acc + bias
GRAD_ACTIVATION: tl.constexpr = tl.constexpr(2)  # C = acc * act'(aux)
ACTIVATE: tl.constexpr = tl.constexpr(3)  # C = act(acc + bias): STORE_PREACT when no backward will follow
GRAD_AND_ACTIVATE: tl.constexpr = tl.constexpr(4)  # C = acc * act'(aux), act_out = act(aux)
EPILOGUE_IDS = {
    "plain": PLAIN.value,
    "store_preact": STORE_PREACT.value,
    "grad_activation": GRAD_ACTIVATION.value,
    "activate": ACTIVATE.value,
    "grad_and_activate": GRAD_AND_ACTIVATE.value,
}

# How an operand's tiles are loaded (the kernels' A_LOAD and B_LOAD).
POINTER: tl.constexpr = tl.constexpr(0)  # pointer arithmetic with masks: any strides
DESCRIPTOR: tl.constexpr = tl.constexpr(1)  # a TMA descriptor of the operand itself: rows contiguous
DESCRIPTOR_T: tl.constexpr = tl.constexpr(2)  # a TMA descriptor of its transpose: columns contiguous
# TMA (the Tensor Memory Accelerator) arrived with Hopper.
TMA_MIN_CAPABILITY = 90
# TMA's requirements on a described matrix: the base and every stride but the last (which is 1) a
# multiple of 16 bytes.
TMA_ALIGNMENT = 16

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)
GELU_TANH_CUBIC: tl.constexpr = tl.constexpr(0.044715)
INV_SQRT_2: tl.constexpr = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)

# Tiles are grouped GROUP_M rows of tiles at a time, so the programs running together share B
# column panels and A row panels in L2 (the Triton matmul tutorial's "grouped ordering").
GROUP_M = 8

# GPU configurations: (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps, EPILOGUE_SUBTILES). All
# BLOCK_M are >= 64, which bounds the rows of the COLUMN_SUMS partial buffer (see MIN_BLOCK_M).
# Tiles holding 128 fp32 accumulators a thread (128 x 256 or 256 x 128 over 8 warps, 128 x 128 over
# 4) run their epilogue on column slices: quarters of 128 x 256, where the backward's dH epilogue
# loads h and stores both dH and act(h) (halves spilled 128 bytes at sm_90, 308 at sm_80), and
# halves otherwise.
GPU_CONFIGS = {
    80: (
        # A100: 164 KiB shared memory, 108 SMs.
        (128, 256, 64, 3, 8, 4),  # big GEMMs: (128x64 + 64x256) bf16 = 48 KiB/stage, 3 stages = 144 KiB
        (256, 128, 64, 3, 8, 2),  # the same area for tall outputs (tokens x C of GEMM2 and dx)
        (128, 128, 64, 4, 4, 2),  # 32 KiB/stage x 4: more tiles when M x N is too small for 256-wide tiles
        (128, 128, 32, 4, 4, 2),  # 16 KiB/stage: fp32 (4-byte) operands and short K
        (64, 128, 32, 4, 4, 1),  # small outputs (C x C weight grads at small C): twice the programs
    ),
    90: (
        # H100/H200: 228 KiB shared memory, 132 SMs; Triton emits wgmma for 4- and 8-warp tiles.
        (128, 256, 64, 4, 8, 4),  # 48 KiB/stage x 4 = 192 KiB: the workhorse of large bf16 GEMMs
        (256, 128, 64, 3, 8, 2),  # tall outputs, 3 stages keep 144 KiB
        (128, 128, 64, 4, 8, 1),  # 32 KiB/stage: when 128 x 256 tiles leave SMs idle
        (128, 128, 32, 4, 4, 2),  # fp32 (4-byte) operands and short K
        (64, 128, 64, 4, 4, 1),  # small outputs: twice the programs of 128 x 128
    ),
}
MIN_BLOCK_M = 64
# Shared memory a configuration's operand pipeline may take, below the opt-in limits (A100 163 KiB,
# H100/H200 227 KiB) to leave room for the epilogue's layout conversions.
SHARED_MEMORY_BUDGET = {80: 160 * 1024, 90: 224 * 1024}
# The interpreter runs one program at a time: 32 x 32 x 32 tiles keep tests quick while ragged sizes
# (33, 70, 131) still leave partial tiles in every dimension, GROUP_M 2 exercises grouping, and the
# halved epilogue is the one the largest GPU tiles run.
INTERPRETER_CONFIG = (32, 32, 32, 1, 4, 2)
INTERPRETER_GROUP_M = 2

# sum_rows: a (BLOCK_R, BLOCK_N) fp32 tile per step. 32 x 256 = 8192 elements: 32 registers per thread
# over 8 warps, enough bytes in flight per program to stream the partial buffer.
SUM_ROWS_BLOCK_R = 32
SUM_ROWS_BLOCK_N = 256


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp2(-z * LOG2E))


@triton.jit
def activation(h, ACTIVATION: tl.constexpr):
    """act(h) in fp32 for ACTIVATION in (GELU_TANH, GELU_ERF, RELU, SILU).
    gelu_tanh = h * sigmoid(2u), since 0.5 * (1 + tanh(u)) = sigmoid(2u): no tanh needed."""
    if ACTIVATION == GELU_TANH:
        inner = SQRT_2_OVER_PI * (h + GELU_TANH_CUBIC * h * h * h)
        out = h * _sigmoid(2.0 * inner)
    elif ACTIVATION == GELU_ERF:
        out = 0.5 * h * (1.0 + tl.math.erf(h * INV_SQRT_2))
    elif ACTIVATION == RELU:
        out = tl.where(h < 0.0, 0.0, h)  # keeps NaN, as torch.relu does
    else:
        out = h * _sigmoid(h)  # SILU
    return out


@triton.jit
def activation_grad(h, ACTIVATION: tl.constexpr):
    """d act(h) / dh in fp32, exact. With s = sigmoid(2u): 1 - tanh(u)^2 = 4 s (1 - s)."""
    if ACTIVATION == GELU_TANH:
        inner = SQRT_2_OVER_PI * (h + GELU_TANH_CUBIC * h * h * h)
        d_inner = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_CUBIC * h * h)
        s = _sigmoid(2.0 * inner)
        grad = s + 2.0 * h * s * (1.0 - s) * d_inner
    elif ACTIVATION == GELU_ERF:
        grad = 0.5 * (1.0 + tl.math.erf(h * INV_SQRT_2)) + h * INV_SQRT_2PI * tl.exp2(-0.5 * h * h * LOG2E)
    elif ACTIVATION == RELU:
        grad = tl.where(h > 0.0, 1.0, 0.0)
    else:  # SILU
        s = _sigmoid(h)
        grad = s * (1.0 + h * (1.0 - s))
    return grad


@triton.jit
def activation_and_grad(h, ACTIVATION: tl.constexpr):
    """(act(h), act'(h)) in fp32, sharing the sigmoid or erf that both need."""
    if ACTIVATION == GELU_TANH:
        inner = SQRT_2_OVER_PI * (h + GELU_TANH_CUBIC * h * h * h)
        d_inner = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_CUBIC * h * h)
        s = _sigmoid(2.0 * inner)
        out = h * s
        grad = s + 2.0 * out * (1.0 - s) * d_inner
    elif ACTIVATION == GELU_ERF:
        cdf = 0.5 * (1.0 + tl.math.erf(h * INV_SQRT_2))
        out = h * cdf
        grad = cdf + h * INV_SQRT_2PI * tl.exp2(-0.5 * h * h * LOG2E)
    elif ACTIVATION == RELU:
        out = tl.where(h < 0.0, 0.0, h)  # keeps NaN, as torch.relu does
        grad = tl.where(h > 0.0, 1.0, 0.0)
    else:  # SILU
        s = _sigmoid(h)
        out = h * s
        grad = s + out * (1.0 - s)
    return out, grad


@triton.jit
def _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of the tile-th output tile: GROUP_M tile rows down one tile column before moving right."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _tile_product(
    a,  # A: a pointer (A_LOAD == POINTER) or a tensor descriptor of A or of A^T
    b,  # B: a pointer (B_LOAD == POINTER) or a tensor descriptor of B or of B^T
    off_m,  # first row of the tile
    off_n,  # first column of the tile
    k_start,  # first K of this split, a multiple of BLOCK_K
    k_end,  # end of this split's K range
    M,  # rows of A
    N,  # columns of B
    stride_am,  # pointer path: A's strides
    stride_ak,
    stride_bk,  # pointer path: B's strides
    stride_bn,
    WITH_ONES_ROW: tl.constexpr,  # replace A's row M by ones (the tile holding it)
    A_LOAD: tl.constexpr,  # POINTER, DESCRIPTOR or DESCRIPTOR_T
    B_LOAD: tl.constexpr,  # POINTER, DESCRIPTOR or DESCRIPTOR_T
    INPUT_PRECISION: tl.constexpr,  # tl.dot's input_precision
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The fp32 (BLOCK_M, BLOCK_N) tile of A @ B at (off_m, off_n) over K in [k_start, k_end).
    Descriptor loads zero-fill outside the matrix; pointer loads are masked to the same effect."""
    offs_m = off_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_n = off_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    if A_LOAD == POINTER:
        # Edge rows are masked rather than wrapped (as the Triton tutorial does): a mask keeps the
        # contiguity of a transposed (M-contiguous) A, so its loads still vectorise and pipeline.
        # 64-bit row offsets: M x stride can pass 2^31.
        a_ptrs = (
            a + offs_m.to(tl.int64)[:, None] * stride_am + (k_start + offs_k)[None, :] * stride_ak
        )  # (BLOCK_M, BLOCK_K)
    if B_LOAD == POINTER:
        b_ptrs = (
            b + (k_start + offs_k)[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn
        )  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        k_mask = (k + offs_k) < k_end  # (BLOCK_K,)
        if A_LOAD == DESCRIPTOR:
            a_tile = a.load([off_m, k])  # (BLOCK_M, BLOCK_K)
        elif A_LOAD == DESCRIPTOR_T:
            a_tile = a.load([k, off_m]).T  # (BLOCK_K, BLOCK_M) tile of A^T, transposed
        else:
            a_tile = tl.load(a_ptrs, mask=(offs_m < M)[:, None] & k_mask[None, :], other=0.0)
            a_ptrs += BLOCK_K * stride_ak
        if B_LOAD == DESCRIPTOR:
            b_tile = b.load([k, off_n])  # (BLOCK_K, BLOCK_N)
        elif B_LOAD == DESCRIPTOR_T:
            b_tile = b.load([off_n, k]).T  # (BLOCK_N, BLOCK_K) tile of B^T, transposed
        else:
            b_tile = tl.load(b_ptrs, mask=k_mask[:, None] & (offs_n < N)[None, :], other=0.0)
            b_ptrs += BLOCK_K * stride_bk
        if WITH_ONES_ROW:
            a_tile = tl.where((offs_m[:, None] == M) & k_mask[None, :], 1.0, a_tile).to(b_tile.dtype)
        acc = tl.dot(a_tile, b_tile, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _epilogue(
    acc,  # fp32 (BLOCK_M, width): the product for rows offs_m and columns off_n ... off_n + width - 1
    pid_m,  # tile row, for the COLUMN_SUMS row and the ONES_ROW test
    offs_m,  # (BLOCK_M,) rows
    off_n,  # first column
    split,  # split-K index: which partial of C
    M,
    N,
    c_ptr,
    stride_cm,
    stride_cn,
    stride_c_split,
    bias_ptr,
    aux_ptr,
    stride_xm,
    stride_xn,
    act_out_ptr,
    stride_om,
    stride_on,
    residual_ptr,
    stride_rm,
    stride_rn,
    accumulate_ptr,
    stride_um,
    stride_un,
    column_sums_ptr,
    bias_grad_ptr,
    ACTIVATION: tl.constexpr,
    ONES_ROW: tl.constexpr,
    EPILOGUE: tl.constexpr,
    BIAS: tl.constexpr,
    RESIDUAL: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    COLUMN_SUMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SUBTILES: tl.constexpr,  # column slices to run it on one after the other: 1, 2 or 4
):
    """Everything after the product, for a tile's columns (the other arguments are matmul_kernel's).
    Each step is per column, so it can run on column slices in turn: with SUBTILES > 1 the tile is
    cut into halves (BLOCK_M, width) -> (BLOCK_M, width / 2, 2) -> split, each half handled in turn,
    so only one slice's loads and temporaries are live next to the accumulator."""
    if SUBTILES > 1:
        width: tl.constexpr = acc.shape[1]
        acc_left, acc_right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, width // 2)), (0, 2, 1)))
        _epilogue(
            acc_left, pid_m, offs_m, off_n, split, M, N,
            c_ptr, stride_cm, stride_cn, stride_c_split, bias_ptr, aux_ptr, stride_xm, stride_xn,
            act_out_ptr, stride_om, stride_on, residual_ptr, stride_rm, stride_rn,
            accumulate_ptr, stride_um, stride_un, column_sums_ptr, bias_grad_ptr,
            ACTIVATION, ONES_ROW, EPILOGUE, BIAS, RESIDUAL, ACCUMULATE, COLUMN_SUMS, BLOCK_M, SUBTILES // 2,
        )  # fmt: skip
        _epilogue(
            acc_right, pid_m, offs_m, off_n + width // 2, split, M, N,
            c_ptr, stride_cm, stride_cn, stride_c_split, bias_ptr, aux_ptr, stride_xm, stride_xn,
            act_out_ptr, stride_om, stride_on, residual_ptr, stride_rm, stride_rn,
            accumulate_ptr, stride_um, stride_un, column_sums_ptr, bias_grad_ptr,
            ACTIVATION, ONES_ROW, EPILOGUE, BIAS, RESIDUAL, ACCUMULATE, COLUMN_SUMS, BLOCK_M, SUBTILES // 2,
        )  # fmt: skip
        return
    offs_n = off_n + tl.arange(0, acc.shape[1])  # (width,)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    offs_m64 = offs_m.to(tl.int64)
    if ONES_ROW:
        # Only the tile holding row M stores it.
        ones_row = tl.sum(tl.where(offs_m[:, None] == M, acc, 0.0), axis=0)  # (width,)
        ones_mask = mask_n & ((tl.zeros_like(offs_n) + pid_m) == M // BLOCK_M)
        if ACCUMULATE:
            ones_row += tl.load(bias_grad_ptr + offs_n, mask=ones_mask, other=0.0)
        tl.store(bias_grad_ptr + offs_n, ones_row.to(bias_grad_ptr.dtype.element_ty), mask=ones_mask)
    if ACCUMULATE:
        acc += tl.load(
            accumulate_ptr + offs_m64[:, None] * stride_um + offs_n[None, :] * stride_un, mask=mask, other=0.0
        )
    if BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    out = acc
    if EPILOGUE == STORE_PREACT:
        # h is rounded to the storage dtype first, so act(h) here equals the backward's.
        h = acc.to(aux_ptr.dtype.element_ty)
        tl.store(aux_ptr + offs_m64[:, None] * stride_xm + offs_n[None, :] * stride_xn, h, mask=mask)
        out = activation(h.to(tl.float32), ACTIVATION)
    elif EPILOGUE == ACTIVATE:
        out = activation(acc.to(c_ptr.dtype.element_ty).to(tl.float32), ACTIVATION)
    elif EPILOGUE == GRAD_ACTIVATION or EPILOGUE == GRAD_AND_ACTIVATE:
        h = tl.load(
            aux_ptr + offs_m64[:, None] * stride_xm + offs_n[None, :] * stride_xn, mask=mask, other=0.0
        ).to(tl.float32)
        if EPILOGUE == GRAD_AND_ACTIVATE:
            activated, grad = activation_and_grad(h, ACTIVATION)
            act_out_ptrs = act_out_ptr + offs_m64[:, None] * stride_om + offs_n[None, :] * stride_on
            tl.store(act_out_ptrs, activated.to(act_out_ptr.dtype.element_ty), mask=mask)
            out = acc * grad
        else:
            out = acc * activation_grad(h, ACTIVATION)
    if RESIDUAL:
        out += tl.load(
            residual_ptr + offs_m64[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0
        ).to(tl.float32)
    if COLUMN_SUMS:
        partial = tl.sum(tl.where(mask_m[:, None], out, 0.0), axis=0)  # (width,), rows past M left out
        tl.store(column_sums_ptr + pid_m.to(tl.int64) * N + offs_n, partial, mask=mask_n)
    c_ptrs = (
        c_ptr
        + split.to(tl.int64) * stride_c_split
        + offs_m64[:, None] * stride_cm
        + offs_n[None, :] * stride_cn
    )
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def matmul_kernel(
    a,  # A (M, K): a pointer read through (stride_am, stride_ak), or a descriptor of A or A^T (A_LOAD)
    b,  # B (K, N): a pointer read through (stride_bk, stride_bn), or a descriptor of B or B^T (B_LOAD)
    c_ptr,  # C (M, N); with split-K, SPLIT_K fp32 partials stride_c_split apart
    M,  # rows of A and C (not counting the ONES_ROW row); may be 0 with ONES_ROW
    N,  # columns of B and C
    K,  # the reduced dimension
    SPLIT_K,  # ranges K is split into (1: no split)
    stride_am,  # A's row stride, in elements (0 for a broadcast operand)
    stride_ak,  # A's column stride
    stride_bk,  # B's row stride
    stride_bn,  # B's column stride
    stride_cm,  # C's row stride
    stride_cn,  # C's column stride
    stride_c_split,  # distance between split-K partials of C
    bias_ptr,  # (N,) added to every row (BIAS)
    aux_ptr,  # (M, N) pre-activation h: written (STORE_PREACT) or read (GRAD_ACTIVATION, GRAD_AND_ACTIVATE)
    stride_xm,  # aux's row stride
    stride_xn,  # aux's column stride
    act_out_ptr,  # (M, N) act(aux), written by GRAD_AND_ACTIVATE
    stride_om,  # act_out's row stride
    stride_on,  # act_out's column stride
    residual_ptr,  # (M, N) added after the activation (RESIDUAL)
    stride_rm,  # residual's row stride
    stride_rn,  # residual's column stride
    accumulate_ptr,  # (M, N) fp32 added to the product (ACCUMULATE); may alias C
    stride_um,  # accumulate's row stride
    stride_un,  # accumulate's column stride
    column_sums_ptr,  # fp32 (>= cdiv(M, BLOCK_M), N): row pid_m gets the column sums of this tile of C
    bias_grad_ptr,  # (N,) output row of A's virtual row of ones (ONES_ROW); fp32 when accumulating
    ACTIVATION: tl.constexpr,  # activation used by the epilogue
    ONES_ROW: tl.constexpr,  # append a row of ones to A, its output row going to bias_grad_ptr
    EPILOGUE: tl.constexpr,  # PLAIN, STORE_PREACT, GRAD_ACTIVATION, ACTIVATE or GRAD_AND_ACTIVATE
    BIAS: tl.constexpr,  # add bias_ptr
    RESIDUAL: tl.constexpr,  # add residual_ptr
    ACCUMULATE: tl.constexpr,  # add accumulate_ptr (and, with ONES_ROW, bias_grad_ptr's old value)
    COLUMN_SUMS: tl.constexpr,  # write column sums of C's tile to column_sums_ptr
    A_LOAD: tl.constexpr,  # POINTER, DESCRIPTOR (a describes A) or DESCRIPTOR_T (a describes A^T)
    B_LOAD: tl.constexpr,  # POINTER, DESCRIPTOR (b describes B) or DESCRIPTOR_T (b describes B^T)
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands: exact fp32 products, as torch without TF32
    BLOCK_M: tl.constexpr,  # rows of C per tile
    BLOCK_N: tl.constexpr,  # columns of C per tile
    BLOCK_K: tl.constexpr,  # K per step of the main loop
    GROUP_M: tl.constexpr,  # tile rows per group of the grouped ordering
    EPILOGUE_SUBTILES: tl.constexpr,  # 1, or 2: the epilogue runs on the tile's column halves in turn
):
    rows = M + ONES_ROW
    num_pid_m = tl.cdiv(rows, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    tiles_per_split = num_pid_m * num_pid_n
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    # Persistent: program p takes tiles p, p + programs, ...; splits are the slowest index.
    for tile in range(tl.program_id(0), tiles_per_split * SPLIT_K, tl.num_programs(0)):
        split = tile // tiles_per_split
        pid_m, pid_n = _grouped_tile(tile % tiles_per_split, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        k_start = split * k_per_split
        k_end = min(K, k_start + k_per_split)
        # Only the last tile row holds the ones row. With both operands loaded by TMA, the other tile
        # rows run a copy of the K loop without it, so their A tiles go from shared memory to wgmma
        # untouched. With a pointer-loaded operand one loop serves all: a second copy competes for the
        # registers its address tensors take (at sm_80, 33 KB of spills in cross-entropy's V=50257 dW
        # GEMM against 1.5 KB).
        if ONES_ROW and (A_LOAD == POINTER or B_LOAD == POINTER or pid_m == num_pid_m - 1):
            acc = _tile_product(
                a, b, off_m, off_n, k_start, k_end, M, N, stride_am, stride_ak, stride_bk, stride_bn,
                True, A_LOAD, B_LOAD, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
        else:
            acc = _tile_product(
                a, b, off_m, off_n, k_start, k_end, M, N, stride_am, stride_ak, stride_bk, stride_bn,
                False, A_LOAD, B_LOAD, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip

        _epilogue(
            acc, pid_m, off_m + tl.arange(0, BLOCK_M), off_n, split, M, N,
            c_ptr, stride_cm, stride_cn, stride_c_split, bias_ptr, aux_ptr, stride_xm, stride_xn,
            act_out_ptr, stride_om, stride_on, residual_ptr, stride_rm, stride_rn,
            accumulate_ptr, stride_um, stride_un, column_sums_ptr, bias_grad_ptr,
            ACTIVATION, ONES_ROW, EPILOGUE, BIAS, RESIDUAL, ACCUMULATE, COLUMN_SUMS, BLOCK_M, EPILOGUE_SUBTILES,
        )  # fmt: skip


@triton.jit
def sum_rows_kernel(
    partials_ptr,  # fp32 (R, N), rows contiguous
    out_ptr,  # (N,) sum over the R rows, in out's dtype
    R,  # rows to add
    N,  # length of a row
    BLOCK_R: tl.constexpr,  # rows added per step
    BLOCK_N: tl.constexpr,  # columns per program
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for r in range(0, R, BLOCK_R):
        offs_r = r + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        ptrs = partials_ptr + offs_r.to(tl.int64)[:, None] * N + offs_n[None, :]
        acc += tl.load(ptrs, mask=(offs_r[:, None] < R) & mask_n[None, :], other=0.0)
    tl.store(out_ptr + offs_n, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask_n)


# ----------------------------------------------------------------------------------------------
# Launchers

_AUTOTUNE_KEY = [
    "M",
    "N",
    "K",
    "SPLIT_K",
    "stride_ak",
    "stride_bk",
    "ACTIVATION",
    "ONES_ROW",
    "EPILOGUE",
    "BIAS",
    "RESIDUAL",
    "ACCUMULATE",
    "COLUMN_SUMS",
    "A_LOAD",
    "B_LOAD",
]
_CONFIG_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


def _set_descriptor_blocks(args):
    """Give the operand descriptors the tile shapes of the configuration about to run (an autotune
    pre-hook: a descriptor's block shape is part of the kernel's signature)."""
    block_m, block_n, block_k = (args[name] for name in _CONFIG_NAMES)
    for name, load, rows, columns in (("a", "A_LOAD", block_m, block_k), ("b", "B_LOAD", block_k, block_n)):
        if args[load] == DESCRIPTOR.value:
            args[name].block_shape = [rows, columns]
        elif args[load] == DESCRIPTOR_T.value:
            args[name].block_shape = [columns, rows]


def _gpu_config(config):
    block_m, block_n, block_k, num_stages, num_warps, epilogue_subtiles = config
    return triton.Config(
        {
            "BLOCK_M": block_m,
            "BLOCK_N": block_n,
            "BLOCK_K": block_k,
            "GROUP_M": GROUP_M,
            "EPILOGUE_SUBTILES": epilogue_subtiles,
        },
        num_stages=num_stages,
        num_warps=num_warps,
        pre_hook=_set_descriptor_blocks,
    )


def gpu_configs(capability):
    """The GEMM configurations tried on a GPU of this compute capability (sm_80 set below 90)."""
    return GPU_CONFIGS[90 if capability >= 90 else 80]


def shared_memory_bytes(config, element_size):
    block_m, block_n, block_k, num_stages = config[:4]
    return num_stages * (block_m * block_k + block_k * block_n) * element_size


def _element_size(operand):
    return (operand.base if isinstance(operand, TensorDescriptor) else operand).element_size()


def _prune_by_shared_memory(configs, named_args, **kwargs):
    """Drop configurations whose operand pipeline does not fit next to the epilogue (fp32 operands
    take twice the bytes of bf16); keep the smallest if none fits. Triton 3.9 passes the launch's
    keyword arguments in named_args, Triton 3.6 in kwargs."""
    args = {**kwargs, **named_args}
    capability = torch.cuda.get_device_capability(args["c_ptr"].device)[0]
    limit = SHARED_MEMORY_BUDGET[90 if capability >= 9 else 80]
    fitting = [
        config
        for config in configs
        if shared_memory_bytes(
            tuple(config.kwargs[name] for name in _CONFIG_NAMES) + (config.num_stages,),
            _element_size(args["a"]),
        )
        <= limit
    ]
    return fitting or [min(configs, key=lambda config: config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"])]


@functools.cache
def _autotuned_matmul(capability, operand_dtype, accumulates, column_sums):
    """matmul_kernel autotuned over this capability's configurations, built on first use per operand
    dtype: the autotuner's cache key holds the dtypes of tensor arguments only, and a TensorDescriptor
    has none, so with both operands described and an fp32 C (split-K partials, the cross-entropy's dW
    accumulator) a choice made for 16-bit operands would otherwise serve fp32 ones, whose pipeline
    takes twice the shared memory (128 x 256 x 64 at 4 stages: 384 KiB, over every GPU's limit). Trial
    runs must not leave traces: kernels that read and rewrite their outputs (ACCUMULATE) get them
    restored after each trial, and the COLUMN_SUMS buffer (whose rows in use depend on BLOCK_M) is
    zeroed before each trial and before the chosen configuration runs."""
    return triton.autotune(
        configs=[_gpu_config(config) for config in gpu_configs(capability)],
        key=_AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": _prune_by_shared_memory},
        restore_value=["c_ptr", "accumulate_ptr", "bias_grad_ptr"] if accumulates else None,
        reset_to_zero=["column_sums_ptr"] if column_sums else None,
    )(matmul_kernel)


def multiprocessor_count(device):
    """SMs on a CUDA device; the interpreter pretends to have 2, so split heuristics still trigger
    and the persistent GEMM's programs each take several tiles."""
    if device.type != "cuda":
        return 2
    return _cuda_multiprocessor_count(
        device.index if device.index is not None else torch.cuda.current_device()
    )


@functools.cache
def _cuda_multiprocessor_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _strides(tensor):
    return (tensor.stride(0), tensor.stride(1)) if tensor is not None else (0, 0)


def _tma_describable(matrix):
    """Whether TMA can load tiles of this 2-D matrix as it is laid out: a unit last stride, a positive
    first stride and base address that are multiples of 16 bytes, and no empty dimension."""
    element = matrix.element_size()
    return (
        matrix.numel() > 0
        and matrix.stride(1) == 1
        and matrix.stride(0) > 0
        and (matrix.stride(0) * element) % TMA_ALIGNMENT == 0
        and matrix.data_ptr() % TMA_ALIGNMENT == 0
    )


def _operand_load(matrix, block_rows, block_columns):
    """(load mode, kernel argument) of a GEMM operand with (block_rows, block_columns) tiles: a
    descriptor of the matrix if TMA can describe it, else of its transpose, else the matrix itself."""
    if _tma_describable(matrix):
        return DESCRIPTOR.value, TensorDescriptor(
            matrix, list(matrix.shape), list(matrix.stride()), [block_rows, block_columns]
        )
    transposed = matrix.t()
    if _tma_describable(transposed):
        return DESCRIPTOR_T.value, TensorDescriptor(
            transposed, list(transposed.shape), list(transposed.stride()), [block_columns, block_rows]
        )
    return POINTER.value, matrix


def with_tensor_descriptors(args, block_m, block_n, block_k):
    """`args` with A and B replaced by TMA descriptors of (block_m, block_k) and (block_k, block_n)
    tiles where TMA can describe them (A_LOAD and B_LOAD say which)."""
    args = dict(args)
    args["A_LOAD"], args["a"] = _operand_load(args["a"], block_m, block_k)
    args["B_LOAD"], args["b"] = _operand_load(args["b"], block_k, block_n)
    return args


def matmul_arguments(
    a,
    b,
    c,
    *,
    bias=None,
    aux=None,
    act_out=None,
    residual=None,
    accumulate=None,
    column_sums=None,
    bias_grad=None,
    activation=None,
    epilogue="plain",
    split_k=None,
):
    """The kernel arguments (runtime and flag constexprs) of one GEMM, with pointer loads of A and B
    (`with_tensor_descriptors` swaps in descriptors); shared by the launcher and the compile check so
    both see the same signature. Unused pointers point at C. A 3-D C (split_k, M, N) holds split-K
    partials; split_k defaults to its leading size."""
    M, K = a.shape
    N = b.shape[1]
    if epilogue == "grad_and_activate" and act_out is None:
        raise ValueError("matmul: epilogue 'grad_and_activate' needs act_out")
    placeholder = c
    return {
        "a": a,
        "b": b,
        "c_ptr": c,
        "M": M,
        "N": N,
        "K": K,
        "SPLIT_K": split_k or (c.shape[0] if c.dim() == 3 else 1),
        "stride_am": a.stride(0),
        "stride_ak": a.stride(1),
        "stride_bk": b.stride(0),
        "stride_bn": b.stride(1),
        "stride_cm": c.stride(-2),
        "stride_cn": c.stride(-1),
        "stride_c_split": c.stride(0) if c.dim() == 3 else 0,
        "bias_ptr": bias if bias is not None else placeholder,
        "aux_ptr": aux if aux is not None else placeholder,
        "stride_xm": _strides(aux)[0],
        "stride_xn": _strides(aux)[1],
        "act_out_ptr": act_out if act_out is not None else placeholder,
        "stride_om": _strides(act_out)[0],
        "stride_on": _strides(act_out)[1],
        "residual_ptr": residual if residual is not None else placeholder,
        "stride_rm": _strides(residual)[0],
        "stride_rn": _strides(residual)[1],
        "accumulate_ptr": accumulate if accumulate is not None else placeholder,
        "stride_um": _strides(accumulate)[0],
        "stride_un": _strides(accumulate)[1],
        "column_sums_ptr": column_sums if column_sums is not None else placeholder,
        "bias_grad_ptr": bias_grad if bias_grad is not None else placeholder,
        "ACTIVATION": ACTIVATION_IDS[activation] if activation else 0,
        "ONES_ROW": int(bias_grad is not None),
        "EPILOGUE": EPILOGUE_IDS[epilogue],
        "BIAS": bias is not None,
        "RESIDUAL": residual is not None,
        "ACCUMULATE": accumulate is not None,
        "COLUMN_SUMS": column_sums is not None,
        "A_LOAD": POINTER.value,
        "B_LOAD": POINTER.value,
        "INPUT_PRECISION": "ieee" if a.dtype == torch.float32 else "tf32",
    }


def column_sums_rows(M):
    """Rows of the COLUMN_SUMS partial buffer: one per tile row for the smallest BLOCK_M in use.
    Larger tiles leave rows untouched, so the buffer starts at zero."""
    block_m = INTERPRETER_CONFIG[0] if triton_interpreter_enabled() else MIN_BLOCK_M
    return triton.cdiv(M, block_m)


def matmul(a, b, c, *, split_k=1, **options):
    """C = epilogue(A @ B) for A (M, K), B (K, N) and C (M, N), or C (split_k, M, N) fp32 partials.

    Options are those of `matmul_arguments`. Matrices of any strides are read in place; the kernel
    reads the bias with unit stride, so a strided bias view is copied (N values). An output with no
    rows or no columns launches nothing (column_sums then keeps its zeros). One program per SM (two
    in the interpreter) walks all tiles.
    """
    if options.get("bias") is not None:
        options["bias"] = options["bias"].contiguous()  # (N,)
    if c.dim() == 3 and c.shape[0] != split_k:
        raise ValueError(f"matmul: C holds {c.shape[0]} split-K partials, split_k is {split_k}")
    args = matmul_arguments(a, b, c, split_k=split_k, **options)
    N = args["N"]
    rows = args["M"] + args["ONES_ROW"]
    if rows == 0 or N == 0:
        return c
    programs = multiprocessor_count(a.device)
    if triton_interpreter_enabled():
        block_m, block_n, block_k, _, _, epilogue_subtiles = INTERPRETER_CONFIG
        # The interpreter emulates TMA loads, so it runs the descriptor path where an operand allows.
        args = with_tensor_descriptors(args, block_m, block_n, block_k)
        tiles = triton.cdiv(rows, block_m) * triton.cdiv(N, block_n) * split_k
        matmul_kernel[(min(programs, tiles),)](
            **args,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            GROUP_M=INTERPRETER_GROUP_M,
            EPILOGUE_SUBTILES=epilogue_subtiles,
        )
        return c
    capability = torch.cuda.get_device_capability(a.device)
    capability = capability[0] * 10 + capability[1]
    if capability >= TMA_MIN_CAPABILITY:
        # The block shapes are placeholders: each configuration's pre-hook sets its own.
        args = with_tensor_descriptors(args, *gpu_configs(capability)[0][:3])
    kernel = _autotuned_matmul(capability, a.dtype, args["ACCUMULATE"], args["COLUMN_SUMS"])

    def grid(meta):
        tiles = triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]) * split_k
        return (min(programs, tiles),)

    kernel[grid](**args)
    return c


def split_k_for(M, N, K, device):
    """Splits of K for a GEMM whose output has too few tiles to fill the GPU (the linear
    cross-entropy's dx chunk: a few thousand tokens x C, reduced over the whole vocabulary). Aims for
    two tiles per SM, with at least 4 K-tiles per split so the pipeline stays full."""
    block_m, block_n, block_k = INTERPRETER_CONFIG[:3] if triton_interpreter_enabled() else (128, 128, 64)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    wanted = triton.cdiv(2 * multiprocessor_count(device), tiles)
    return max(1, min(wanted, triton.cdiv(K, 4 * block_k), 16))


def sum_rows(partials, out):
    """out (N,) = partials (R, N) fp32 summed over rows, in a fixed order (deterministic)."""
    R, N = partials.shape
    if N == 0:
        return out
    block_r = min(SUM_ROWS_BLOCK_R, triton.next_power_of_2(max(R, 1)))  # split-K has only a few rows
    grid = (triton.cdiv(N, SUM_ROWS_BLOCK_N),)
    sum_rows_kernel[grid](partials, out, R, N, BLOCK_R=block_r, BLOCK_N=SUM_ROWS_BLOCK_N, num_warps=8)
    return out


# ----------------------------------------------------------------------------------------------
# No-GPU compile check


_TRITON_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.int64: "i64",
    torch.int32: "i32",
}


def compile_case(name, kernel, args, meta, num_warps, num_stages, tensor_cores):
    """A triton_compile.CompileCase from launch arguments, specialised as a launch would be: integers
    equal to 1 (unit strides) become constants, and only multiples of 16 are marked divisible by 16.
    Tensor descriptors are typed with their block shape; a case with one expects TMA loads."""
    from fastgpt.ops.triton_compile import CompileCase

    signature, constexprs, unaligned = {}, dict(meta), set()
    for param in kernel.params:
        arg_name = param.name
        value = meta[arg_name] if arg_name in meta else args[arg_name]
        if param.is_constexpr:
            signature[arg_name] = "constexpr"
            constexprs[arg_name] = value
        elif isinstance(value, TensorDescriptor):
            block = ", ".join(str(size) for size in value.block_shape)
            signature[arg_name] = f"tensordesc<{_TRITON_TYPES[value.base.dtype]}[{block}]>"
        elif isinstance(value, torch.Tensor):
            signature[arg_name] = "*" + _TRITON_TYPES[value.dtype]
        elif value == 1:
            signature[arg_name] = "constexpr"
            constexprs[arg_name] = 1
        else:
            signature[arg_name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16:
                unaligned.add(arg_name)
    return CompileCase(
        name=name,
        kernel=kernel,
        signature=signature,
        constexprs=constexprs,
        num_warps=num_warps,
        num_stages=num_stages,
        tensor_cores=tensor_cores,
        unaligned=frozenset(unaligned),
        tma=any(value.startswith("tensordesc") for value in signature.values()),
    )


def matmul_compile_cases(
    capability, variant_name, make_arguments, dtypes=(torch.bfloat16,), configs="largest"
):
    """Compile cases of one GEMM variant for configs "all", "largest" (the most shared memory and
    registers: where an epilogue is most likely to break) or "smallest" (the quickest to compile).
    `make_arguments(dtype)` returns the matmul_arguments of a representative launch on meta tensors;
    on sm_90 its operands go through TMA where the launch's would."""
    configs = {
        "all": gpu_configs(capability),
        "largest": gpu_configs(capability)[:1],
        "smallest": gpu_configs(capability)[-1:],
    }[configs]
    cases = []
    for dtype in dtypes:
        for config in configs:
            block_m, block_n, block_k, num_stages, num_warps, epilogue_subtiles = config
            if (
                shared_memory_bytes(config, dtype.itemsize)
                > SHARED_MEMORY_BUDGET[90 if capability >= 90 else 80]
            ):
                continue
            args = make_arguments(dtype)
            if capability >= TMA_MIN_CAPABILITY:
                args = with_tensor_descriptors(args, block_m, block_n, block_k)
            meta = {
                "BLOCK_M": block_m,
                "BLOCK_N": block_n,
                "BLOCK_K": block_k,
                "GROUP_M": GROUP_M,
                "EPILOGUE_SUBTILES": epilogue_subtiles,
            }
            name = f"matmul[{variant_name}] {str(dtype).replace('torch.', '')} {block_m}x{block_n}x{block_k} s{num_stages} w{num_warps}"
            cases.append(
                compile_case(name, matmul_kernel, args, meta, num_warps, num_stages, tensor_cores=True)
            )
    return cases


def gpu_compile_cases(capability):
    """The plain GEMM (x @ W^T) in bf16 for every configuration and in fp16 for the largest, and sum_rows.
    The modules using the GEMM add their epilogue variants."""

    def plain(dtype):
        a = torch.empty(4096, 768, dtype=dtype, device="meta")
        b = torch.empty(3072, 768, dtype=dtype, device="meta").t()
        return matmul_arguments(a, b, torch.empty(4096, 3072, dtype=dtype, device="meta"))

    cases = matmul_compile_cases(capability, "plain", plain, configs="all")
    cases += matmul_compile_cases(capability, "plain", plain, dtypes=(torch.float16,))
    for dtype in (torch.bfloat16, torch.float32):
        partials = torch.empty(64, 768, dtype=torch.float32, device="meta")
        args = {
            "partials_ptr": partials,
            "out_ptr": torch.empty(768, dtype=dtype, device="meta"),
            "R": 64,
            "N": 768,
        }
        meta = {"BLOCK_R": SUM_ROWS_BLOCK_R, "BLOCK_N": SUM_ROWS_BLOCK_N}
        cases.append(
            compile_case(
                f"sum_rows to {str(dtype).replace('torch.', '')}",
                sum_rows_kernel,
                args,
                meta,
                8,
                3,
                tensor_cores=False,
            )
        )
    return cases
