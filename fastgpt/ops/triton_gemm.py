"""Shared Triton building blocks: a tiled GEMM with fused epilogues, and a deterministic row-sum.

`matmul` computes C = A @ B for A (M, K) and B (K, N) given by pointers and strides, so transposed
operands (x^T, W^T, dH^T) are read in place and never copied. The FFN and the linear cross-entropy
choose what happens around the product with compile-time flags:

- A_ACTIVATION: A is replaced by act(A) as its tiles load (dWproj from the saved pre-activation h);
- ONES_ROW: A gets a virtual row M of ones; its output row, sum_k B[k, :], is a bias gradient;
- epilogues: + bias; store h and act(h) (STORE_PREACT) or act(h) only (ACTIVATE); multiply by
  act'(h) (GRAD_ACTIVATION);
  + residual; + an fp32 accumulator (ACCUMULATE); per-tile column sums (COLUMN_SUMS);
- split-K: grid axis 1 splits K; each split writes an fp32 partial, summed by `sum_rows`.

`sum_rows` adds the rows of an fp32 (R, N) buffer into one row of N in a fixed order: the second
stage of every deterministic, atomic-free reduction in the Triton backend (bias gradients, LayerNorm
weight gradients, split-K partials).
"""

import functools

import torch
import triton
import triton.language as tl

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

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)
GELU_TANH_CUBIC: tl.constexpr = tl.constexpr(0.044715)
INV_SQRT_2: tl.constexpr = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)

# Tiles are grouped GROUP_M rows of tiles at a time, so the programs running together share B
# column panels and A row panels in L2 (the Triton matmul tutorial's "grouped ordering").
GROUP_M = 8

# GPU configurations: (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps). All BLOCK_M are >= 64,
# which bounds the rows of the COLUMN_SUMS partial buffer (see MIN_BLOCK_M).
GPU_CONFIGS = {
    80: (
        # A100: 164 KiB shared memory, 108 SMs.
        (128, 256, 64, 3, 8),  # big GEMMs: (128x64 + 64x256) bf16 = 48 KiB/stage, 3 stages = 144 KiB
        (256, 128, 64, 3, 8),  # the same area for tall outputs (tokens x C of GEMM2 and dx)
        (128, 128, 64, 4, 4),  # 32 KiB/stage x 4: more tiles when M x N is too small for 256-wide tiles
        (128, 128, 32, 4, 4),  # 16 KiB/stage: fp32 (4-byte) operands and short K
        (64, 128, 32, 4, 4),  # small outputs (C x C weight grads at small C): twice the programs
    ),
    90: (
        # H100/H200: 228 KiB shared memory, 132 SMs; Triton emits wgmma for 4- and 8-warp tiles.
        (128, 256, 64, 4, 8),  # 48 KiB/stage x 4 = 192 KiB: the workhorse of large bf16 GEMMs
        (256, 128, 64, 3, 8),  # tall outputs, 3 stages keep 144 KiB
        (128, 128, 64, 4, 8),  # 32 KiB/stage: when 128 x 256 tiles leave SMs idle
        (128, 128, 32, 4, 4),  # fp32 (4-byte) operands and short K
        (64, 128, 64, 4, 4),  # small outputs: twice the programs of 128 x 128
    ),
}
MIN_BLOCK_M = 64
# Shared memory a configuration's operand pipeline may take, below the opt-in limits (A100 163 KiB,
# H100/H200 227 KiB) to leave room for the epilogue's layout conversions.
SHARED_MEMORY_BUDGET = {80: 160 * 1024, 90: 224 * 1024}
# The interpreter runs one program at a time: 32 x 32 x 32 tiles keep tests quick while ragged sizes
# (33, 70, 131) still leave partial tiles in every dimension, and GROUP_M 2 exercises grouping.
INTERPRETER_CONFIG = (32, 32, 32, 1, 4)
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
def matmul_kernel(
    a_ptr,  # A (M, K), read through (stride_am, stride_ak)
    b_ptr,  # B (K, N), read through (stride_bk, stride_bn)
    c_ptr,  # C (M, N); with split-K, SPLIT_K fp32 partials stride_c_split apart
    M,  # rows of A and C (not counting the ONES_ROW row); may be 0 with ONES_ROW
    N,  # columns of B and C
    K,  # the reduced dimension
    stride_am,  # A's row stride, in elements (0 for a broadcast operand)
    stride_ak,  # A's column stride
    stride_bk,  # B's row stride
    stride_bn,  # B's column stride
    stride_cm,  # C's row stride
    stride_cn,  # C's column stride
    stride_c_split,  # distance between split-K partials of C
    bias_ptr,  # (N,) added to every row (BIAS)
    aux_ptr,  # (M, N) pre-activation h: written (STORE_PREACT) or read (GRAD_ACTIVATION)
    stride_xm,  # aux's row stride
    stride_xn,  # aux's column stride
    residual_ptr,  # (M, N) added after the activation (RESIDUAL)
    stride_rm,  # residual's row stride
    stride_rn,  # residual's column stride
    accumulate_ptr,  # (M, N) fp32 added to the product (ACCUMULATE); may alias C
    stride_um,  # accumulate's row stride
    stride_un,  # accumulate's column stride
    column_sums_ptr,  # fp32 (>= cdiv(M, BLOCK_M), N): row pid_m gets the column sums of this tile of C
    bias_grad_ptr,  # (N,) output row of A's virtual row of ones (ONES_ROW); fp32 when accumulating
    ACTIVATION: tl.constexpr,  # activation applied to A (A_ACTIVATION) or used by the epilogue
    A_ACTIVATION: tl.constexpr,  # replace A by act(A) as its tiles load
    ONES_ROW: tl.constexpr,  # append a row of ones to A, its output row going to bias_grad_ptr
    EPILOGUE: tl.constexpr,  # PLAIN, STORE_PREACT, GRAD_ACTIVATION or ACTIVATE
    BIAS: tl.constexpr,  # add bias_ptr
    RESIDUAL: tl.constexpr,  # add residual_ptr
    ACCUMULATE: tl.constexpr,  # add accumulate_ptr (and, with ONES_ROW, bias_grad_ptr's old value)
    COLUMN_SUMS: tl.constexpr,  # write column sums of C's tile to column_sums_ptr
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands: exact fp32 products, as torch without TF32
    BLOCK_M: tl.constexpr,  # rows of C per program
    BLOCK_N: tl.constexpr,  # columns of C per program
    BLOCK_K: tl.constexpr,  # K per step of the main loop
    GROUP_M: tl.constexpr,  # tile rows per group of the grouped ordering
):
    # Grouped ordering: walk GROUP_M tile rows down one tile column before moving right.
    pid = tl.program_id(0)
    rows = M + ONES_ROW
    num_pid_m = tl.cdiv(rows, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # This split's range of K.
    split = tl.program_id(1)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), tl.num_programs(1)) * BLOCK_K
    k_start = split * k_per_split
    k_end = min(K, k_start + k_per_split)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Edge rows and columns are masked rather than wrapped (as the Triton tutorial does): a mask keeps
    # the contiguity of a transposed (M-contiguous) A, so its loads still vectorise and pipeline.
    # 64-bit row offsets: M x stride can pass 2^31.
    offs_m64 = offs_m.to(tl.int64)
    a_ptrs = (
        a_ptr + offs_m64[:, None] * stride_am + (k_start + offs_k)[None, :] * stride_ak
    )  # (BLOCK_M, BLOCK_K)
    b_ptrs = (
        b_ptr + (k_start + offs_k)[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn
    )  # (BLOCK_K, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        k_mask = (k + offs_k) < k_end  # (BLOCK_K,)
        a = tl.load(a_ptrs, mask=mask_m[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & mask_n[None, :], other=0.0)
        if A_ACTIVATION:
            a = activation(a.to(tl.float32), ACTIVATION).to(b.dtype)  # act(0) = 0: padding stays 0
        if ONES_ROW:
            a = tl.where((offs_m[:, None] == M) & k_mask[None, :], 1.0, a).to(b.dtype)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask = mask_m[:, None] & mask_n[None, :]
    if ONES_ROW:
        # Only the tile holding row M stores it.
        ones_row = tl.sum(tl.where(offs_m[:, None] == M, acc, 0.0), axis=0)  # (BLOCK_N,)
        ones_mask = mask_n & ((tl.zeros((BLOCK_N,), dtype=tl.int32) + pid_m) == M // BLOCK_M)
        if ACCUMULATE:
            ones_row += tl.load(bias_grad_ptr + offs_n, mask=ones_mask, other=0.0)
        tl.store(bias_grad_ptr + offs_n, ones_row.to(bias_grad_ptr.dtype.element_ty), mask=ones_mask)
    if ACCUMULATE:
        acc_ptrs = accumulate_ptr + offs_m64[:, None] * stride_um + offs_n[None, :] * stride_un
        acc += tl.load(acc_ptrs, mask=mask, other=0.0)
    if BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    out = acc
    if EPILOGUE == STORE_PREACT:
        # h is rounded to the storage dtype first, so act(h) here equals the backward's recomputation.
        h = acc.to(aux_ptr.dtype.element_ty)
        tl.store(aux_ptr + offs_m64[:, None] * stride_xm + offs_n[None, :] * stride_xn, h, mask=mask)
        out = activation(h.to(tl.float32), ACTIVATION)
    elif EPILOGUE == ACTIVATE:
        out = activation(acc.to(c_ptr.dtype.element_ty).to(tl.float32), ACTIVATION)
    elif EPILOGUE == GRAD_ACTIVATION:
        h = tl.load(
            aux_ptr + offs_m64[:, None] * stride_xm + offs_n[None, :] * stride_xn, mask=mask, other=0.0
        )
        out = acc * activation_grad(h.to(tl.float32), ACTIVATION)
    if RESIDUAL:
        out += tl.load(
            residual_ptr + offs_m64[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0
        ).to(tl.float32)
    if COLUMN_SUMS:
        partial = tl.sum(tl.where(mask_m[:, None], out, 0.0), axis=0)  # (BLOCK_N,), rows past M left out
        tl.store(column_sums_ptr + pid_m.to(tl.int64) * N + offs_n, partial, mask=mask_n)
    c_ptrs = (
        c_ptr
        + split.to(tl.int64) * stride_c_split
        + offs_m64[:, None] * stride_cm
        + offs_n[None, :] * stride_cn
    )
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)


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
    "stride_ak",
    "stride_bk",
    "ACTIVATION",
    "A_ACTIVATION",
    "ONES_ROW",
    "EPILOGUE",
    "BIAS",
    "RESIDUAL",
    "ACCUMULATE",
    "COLUMN_SUMS",
]
_CONFIG_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


def _gpu_config(config):
    block_m, block_n, block_k, num_stages, num_warps = config
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": GROUP_M},
        num_stages=num_stages,
        num_warps=num_warps,
    )


def gpu_configs(capability):
    """The GEMM configurations tried on a GPU of this compute capability (sm_80 set below 90)."""
    return GPU_CONFIGS[90 if capability >= 90 else 80]


def shared_memory_bytes(config, element_size):
    block_m, block_n, block_k, num_stages, _ = config
    return num_stages * (block_m * block_k + block_k * block_n) * element_size


def _prune_by_shared_memory(configs, named_args, **kwargs):
    """Drop configurations whose operand pipeline does not fit next to the epilogue (fp32 operands
    take twice the bytes of bf16); keep the smallest if none fits. Triton 3.9 passes the launch's
    keyword arguments in named_args, Triton 3.6 in kwargs."""
    a = {**kwargs, **named_args}["a_ptr"]
    limit = SHARED_MEMORY_BUDGET[90 if torch.cuda.get_device_capability(a.device)[0] >= 9 else 80]
    fitting = [
        config
        for config in configs
        if shared_memory_bytes(
            tuple(config.kwargs[name] for name in _CONFIG_NAMES) + (config.num_stages, 0), a.element_size()
        )
        <= limit
    ]
    return fitting or [min(configs, key=lambda config: config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"])]


@functools.cache
def _autotuned_matmul(capability, accumulates, column_sums):
    """matmul_kernel autotuned over this capability's configurations, built on first use. Trial runs
    must not leave traces: kernels that read and rewrite their outputs (ACCUMULATE) get them restored
    after each trial, and the COLUMN_SUMS buffer (whose rows in use depend on BLOCK_M) is zeroed
    before each trial and before the chosen configuration runs."""
    return triton.autotune(
        configs=[_gpu_config(config) for config in gpu_configs(capability)],
        key=_AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": _prune_by_shared_memory},
        restore_value=["c_ptr", "accumulate_ptr", "bias_grad_ptr"] if accumulates else None,
        reset_to_zero=["column_sums_ptr"] if column_sums else None,
    )(matmul_kernel)


def multiprocessor_count(device):
    """SMs on a CUDA device; the interpreter pretends to have 2, so split heuristics still trigger."""
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


def matmul_arguments(
    a,
    b,
    c,
    *,
    bias=None,
    aux=None,
    residual=None,
    accumulate=None,
    column_sums=None,
    bias_grad=None,
    activation=None,
    a_activation=False,
    epilogue="plain",
):
    """The kernel arguments (runtime and flag constexprs) of one GEMM; shared by the launcher and the
    compile check so both see the same signature. Unused pointers point at C."""
    M, K = a.shape
    N = b.shape[1]
    placeholder = c
    return {
        "a_ptr": a,
        "b_ptr": b,
        "c_ptr": c,
        "M": M,
        "N": N,
        "K": K,
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
        "residual_ptr": residual if residual is not None else placeholder,
        "stride_rm": _strides(residual)[0],
        "stride_rn": _strides(residual)[1],
        "accumulate_ptr": accumulate if accumulate is not None else placeholder,
        "stride_um": _strides(accumulate)[0],
        "stride_un": _strides(accumulate)[1],
        "column_sums_ptr": column_sums if column_sums is not None else placeholder,
        "bias_grad_ptr": bias_grad if bias_grad is not None else placeholder,
        "ACTIVATION": ACTIVATION_IDS[activation] if activation else 0,
        "A_ACTIVATION": a_activation,
        "ONES_ROW": int(bias_grad is not None),
        "EPILOGUE": {
            "plain": PLAIN.value,
            "store_preact": STORE_PREACT.value,
            "grad_activation": GRAD_ACTIVATION.value,
            "activate": ACTIVATE.value,
        }[epilogue],
        "BIAS": bias is not None,
        "RESIDUAL": residual is not None,
        "ACCUMULATE": accumulate is not None,
        "COLUMN_SUMS": column_sums is not None,
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
    rows or no columns launches nothing (column_sums then keeps its zeros).
    """
    if options.get("bias") is not None:
        options["bias"] = options["bias"].contiguous()  # (N,)
    args = matmul_arguments(a, b, c, **options)
    N = args["N"]
    rows = args["M"] + args["ONES_ROW"]
    if rows == 0 or N == 0:
        return c
    if triton_interpreter_enabled():
        block_m, block_n, block_k, _, _ = INTERPRETER_CONFIG
        grid = (triton.cdiv(rows, block_m) * triton.cdiv(N, block_n), split_k)
        matmul_kernel[grid](
            **args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=INTERPRETER_GROUP_M
        )
        return c
    capability = torch.cuda.get_device_capability(a.device)
    kernel = _autotuned_matmul(capability[0] * 10 + capability[1], args["ACCUMULATE"], args["COLUMN_SUMS"])

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split_k)

    kernel[grid](**args)
    return c


def split_k_for(M, N, K, device):
    """Splits of K for a GEMM whose output has too few tiles to fill the GPU (the linear
    cross-entropy's dx chunk: a few thousand tokens x C, reduced over the whole vocabulary). Aims for
    two programs per SM, with at least 4 K-tiles per split so the pipeline stays full."""
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
    equal to 1 (unit strides) become constants, and only multiples of 16 are marked divisible by 16."""
    from fastgpt.ops.triton_compile import CompileCase

    signature, constexprs, unaligned = {}, dict(meta), set()
    for param in kernel.params:
        arg_name = param.name
        value = meta[arg_name] if arg_name in meta else args[arg_name]
        if param.is_constexpr:
            signature[arg_name] = "constexpr"
            constexprs[arg_name] = value
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
    )


def matmul_compile_cases(
    capability, variant_name, make_arguments, dtypes=(torch.bfloat16,), configs="largest"
):
    """Compile cases of one GEMM variant for configs "all", "largest" (the most shared memory and
    registers: where an epilogue is most likely to break) or "smallest" (the quickest to compile).
    `make_arguments(dtype)` returns the matmul_arguments of a representative launch on meta tensors."""
    configs = {
        "all": gpu_configs(capability),
        "largest": gpu_configs(capability)[:1],
        "smallest": gpu_configs(capability)[-1:],
    }[configs]
    cases = []
    for dtype in dtypes:
        args = make_arguments(dtype)
        for config in configs:
            block_m, block_n, block_k, num_stages, num_warps = config
            if (
                shared_memory_bytes(config, dtype.itemsize)
                > SHARED_MEMORY_BUDGET[90 if capability >= 90 else 80]
            ):
                continue
            meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": GROUP_M}
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
