"""Split-KV flash-decoding in Triton: attention of one new query per head against a long KV cache.

With q_len == 1 the causal mask is empty (the query is the last position and sees every key), and
the forward kernel of triton_attention would run a single program per head, each walking the whole
cache: a few dozen programs on a GPU with 132 SMs. Here the cache is cut into `num_splits` slices:

1. `_decode_partial_kernel`, one program per (kv split, batch * kv head), attends every query head
   of the kv head's GQA group to the keys of its slice, so each K/V tile is read from memory once
   for the whole group. It writes a partial output, normalised within the slice, and the slice's
   logsumexp (float32, natural log).
2. `_decode_combine_kernel`, one program per (batch * head), merges the slices:
   out = sum_s exp(lse_s - max) * out_s / sum_s exp(lse_s - max).

q is (B, H, 1, D); k and v are (B, Hkv, L, D) in any strides, typically a view cache[:, :, :L] of a
preallocated cache, read in place. Inference only: no backward is registered.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from fastgpt import dispatch
from fastgpt.ops.device import on_device_of
from fastgpt.ops.memory import new_output
from fastgpt.ops.triton_compile import CompileCase

# ----------------------------------------------------------------------------------------------
# Constants

# Used inside the kernels, hence tl.constexpr.
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): converts a base-2 logsumexp to natural log
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16: head_dim and the group of query heads are padded to it
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
# No bfloat16 under the interpreter, which computes it on the raw bits (see triton_attention).
if INTERPRETER:
    SUPPORTED_DTYPES = (torch.float16, torch.float32)
else:
    SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# Split sizing. On a GPU: enough (split, kv head) programs to fill every SM about twice, but no
# split shorter than 256 keys, below which the combine pass and the per-program setup cost more
# than the parallelism gains; split boundaries are multiples of 128, the largest BLOCK_N, so tiles
# start aligned. At most 64 splits, so the combine kernel's (splits, D) tile stays in registers.
WAVES_PER_SM = 2
MIN_SPLIT_KEYS = 256
SPLIT_ALIGN = 128
MAX_SPLITS = 64
# Interpreter: short splits, so the CPU tests at a few dozen keys cover several splits, a ragged
# last one, and a split that is not a multiple of BLOCK_N.
INTERPRETER_SPLITS = 3
INTERPRETER_MIN_SPLIT_KEYS = 24
INTERPRETER_SPLIT_ALIGN = 8
INTERPRETER_CONFIG = {"BLOCK_N": 16}

# Partial kernel configurations (BLOCK_N, num_warps, num_stages) by capability and padded head_dim.
# The kernel is bandwidth-bound (a 16-row query tile against each K/V tile, mma.sync even on sm_90
# since 16 rows are below wgmma's 64), so the choice is about keeping enough K/V bytes in flight:
# deep cp.async pipelines of modest tiles. Measured as a launch specialises them (bf16/fp16):
# at most 182 registers; only sm_90's 32-key tile at D=256 spills (8 bytes). Shared memory in the
# comments.
DECODE_CONFIGS = {
    # sm_90 (227 KiB): 4 stages of 64 keys (102 KiB at D=128) or 3 of 128 (136 KiB).
    90: {64: [(128, 4, 4), (64, 4, 4)], 128: [(64, 4, 4), (128, 4, 3)], 256: [(64, 4, 3), (32, 4, 4)]},
    # sm_80 (163 KiB): one stage fewer than sm_90 at each tile size (70-74 KiB).
    80: {64: [(128, 4, 3), (64, 4, 3)], 128: [(64, 4, 3), (128, 4, 2)], 256: [(32, 4, 3), (64, 4, 2)]},
    # Others (99 KiB on sm_86/89): 2 stages of a tile that fits.
    "other": {64: [(64, 4, 2)], 128: [(64, 4, 2)], 256: [(32, 4, 2)]},
}
# float32 inputs (exact FMA products): 4-byte tiles, so 2 stages of 32 KiB K+V tiles on any GPU.
FLOAT32_CONFIGS = {64: [(64, 4, 2)], 128: [(32, 4, 2)], 256: [(16, 4, 2)]}
# The combine kernel reads (splits, BLOCK_D) fp32 once: 4 warps, or 8 for D=256 to keep the
# 64 x 256 tile at 64 registers/thread.
COMBINE_WARPS = {64: 4, 128: 4, 256: 8}


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def online_softmax_block(scores, row_max, row_sum, qk_scale, RAW_SCORES: tl.constexpr):
    """One key block of the online softmax over the rows of scores (ROWS, BLOCK_N), masked keys at -inf;
    shared by this module's decode kernel and triton_attention's forward. The scores are in base-2
    units, or raw (unscaled) with RAW_SCORES (float32 inputs), which subtract the max first, exact near
    it, and scale after (triton_attention's docstring says why). row_max, row_sum: the running max and
    sum (ROWS,), in the scores' units. Returns the block's unnormalised probabilities (ROWS, BLOCK_N),
    the factor that rescales what was accumulated before, the new max and the new sum."""
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    if RAW_SCORES:
        rescale = tl.exp2((row_max - new_max) * qk_scale)
        p = tl.exp2((scores - new_max[:, None]) * qk_scale)
    else:
        rescale = tl.exp2(row_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
    return p, rescale, new_max, row_sum * rescale + tl.sum(p, 1)


@triton.jit
def _decode_partial_kernel(
    Q,  # (B, H, 1, D), any strides
    K,
    V,  # (B, Hkv, L, D), any strides
    PartialOut,  # output (B, H, S, D) float32, contiguous: each split's normalised output
    PartialLse,  # output (B, H, S) float32, contiguous: each split's logsumexp (natural log)
    softmax_scale,  # float: scores are softmax_scale * q.k
    stride_qb,
    stride_qh,
    stride_qd,  # q strides (its length-1 dimension is never stepped)
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,  # k strides
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,  # v strides
    kv_heads,  # Hkv
    group,  # H // Hkv: query heads sharing a kv head
    kv_len,  # L: the keys to attend to; with KV_LEN_ON_DEVICE, the cache's capacity (k's length)
    KvLen,  # with KV_LEN_ON_DEVICE: pointer to int32/int64 valid lengths (clamped to kv_len); else None
    stride_len,  # KvLen's stride between sequences: 0 when one length serves every sequence
    split_len,  # keys per split (the last may be shorter)
    num_splits,  # S
    KV_LEN_ON_DEVICE: tl.constexpr,  # read the valid length from KvLen (a captured decode step)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D padded to a power of two >= 16
    BLOCK_H: tl.constexpr,  # group padded to a power of two >= 16 (the tl.dot M)
    BLOCK_N: tl.constexpr,  # keys per iteration
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
):
    batch_kv_head = tl.program_id(0)  # on axis 0, which is not capped at 65535
    split = tl.program_id(1)
    batch = (batch_kv_head // kv_heads).to(tl.int64)
    kv_head = (batch_kv_head % kv_heads).to(tl.int64)

    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    heads_ok = offs_h < group
    dims_ok = offs_d < HEAD_DIM
    head = kv_head * group + offs_h  # (BLOCK_H,) the query heads of this kv head
    q_ptrs = Q + batch * stride_qb + head[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=heads_ok[:, None] & dims_ok[None, :], other=0.0)  # (BLOCK_H, BLOCK_D)

    if KV_LEN_ON_DEVICE:
        # Clamped to the capacity, so a length past the cache never reads outside it; in 64 bits, so an
        # int64 length of 2**32 or more is clamped rather than wrapped to a small one.
        kv_len = tl.minimum(tl.load(KvLen + batch * stride_len).to(tl.int64), kv_len).to(tl.int32)
    key_start = split * split_len
    key_end = tl.minimum(key_start + split_len, kv_len)
    k_ptrs = K + batch * stride_kb + kv_head * stride_kh + (key_start + offs_n)[:, None] * stride_kt
    k_ptrs += offs_d[None, :] * stride_kd
    v_ptrs = V + batch * stride_vb + kv_head * stride_vh + (key_start + offs_n)[:, None] * stride_vt
    v_ptrs += offs_d[None, :] * stride_vd

    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    row_max = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # raw scores for fp32, else base 2
    qk_scale = softmax_scale * LOG2E
    for start_n in range(key_start, key_end, BLOCK_N):
        keys_ok = start_n + offs_n < key_end
        tile_mask = keys_ok[:, None] & dims_ok[None, :]
        k = tl.load(k_ptrs, mask=tile_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_H, BLOCK_N)
        if q.dtype != tl.float32:
            scores *= qk_scale  # base-2 units: the max and exponents below need no further product
        scores = tl.where(keys_ok[None, :], scores, float("-inf"))
        # The loop runs only over a split that holds a key, and its first block starts with one.
        p, rescale, row_max_next, row_sum = online_softmax_block(
            scores, row_max, row_sum, qk_scale, q.dtype == tl.float32
        )
        v = tl.load(v_ptrs, mask=tile_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * rescale[:, None], input_precision=DOT_PRECISION)
        row_max = row_max_next
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt

    # (BLOCK_H,) rows of the (B * H * S, D) partial outputs
    partial = ((batch * kv_heads + kv_head) * group + offs_h) * num_splits + split
    out_ptrs = PartialOut + partial[:, None] * HEAD_DIM + offs_d[None, :]
    partial_out = acc / row_sum[:, None]  # (BLOCK_H, BLOCK_D)
    if q.dtype == tl.float32:
        lse = tl.fma(row_max, softmax_scale, tl.log(row_sum))  # one rounding of the large term
    else:
        lse = (row_max + tl.log2(row_sum)) * LN2  # base 2 -> natural log
    if KV_LEN_ON_DEVICE:
        # A split past the device length (the loop did not run) contributes nothing: output 0 rather
        # than 0/0, and lse -inf, which the combine kernel weighs exp(-inf) = 0.
        split_empty = key_start >= kv_len
        partial_out = tl.where(split_empty, 0.0, partial_out)
        lse = tl.where(split_empty, float("-inf"), lse)
    tl.store(out_ptrs, partial_out, mask=heads_ok[:, None] & dims_ok[None, :])
    tl.store(PartialLse + partial, lse, mask=heads_ok)


@triton.jit
def _decode_combine_kernel(
    PartialOut,  # (B, H, S, D) float32, contiguous
    PartialLse,  # (B, H, S) float32, contiguous
    Out,  # output (B, H, 1, D) in q's dtype, any strides
    stride_ob,
    stride_oh,
    stride_od,  # out strides
    heads,  # H
    num_splits,  # S
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,  # S padded to a power of two
):
    batch_head = tl.program_id(0)
    batch = (batch_head // heads).to(tl.int64)
    head = (batch_head % heads).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    splits_ok = offs_s < num_splits
    dims_ok = offs_d < HEAD_DIM
    rows = batch_head.to(tl.int64) * num_splits + offs_s  # (BLOCK_S,)
    lse = tl.load(PartialLse + rows, mask=splits_ok, other=float("-inf"))
    max_lse = tl.max(lse, 0)
    # All splits empty (a device length of 0): subtract 0, not -inf, which would make (-inf) - (-inf) NaN.
    max_lse = tl.where(max_lse == float("-inf"), 0.0, max_lse)
    weight = tl.exp2((lse - max_lse) * LOG2E)  # padded and empty splits weigh exp(-inf) = 0
    partial_ptrs = PartialOut + rows[:, None] * HEAD_DIM + offs_d[None, :]  # (BLOCK_S, BLOCK_D)
    partial = tl.load(partial_ptrs, mask=splits_ok[:, None] & dims_ok[None, :], other=0.0)
    total_weight = tl.sum(weight, 0)
    # No key at all: output 0 (FlashAttention's value for a row with every key masked). A NaN weight
    # (a NaN query) is not 0, so NaN still stays in its own row.
    out = tl.where(total_weight == 0.0, 0.0, tl.sum(weight[:, None] * partial, 0) / total_weight)
    out_ptrs = Out + batch * stride_ob + head * stride_oh + offs_d * stride_od
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=dims_ok)


# ----------------------------------------------------------------------------------------------
# Configuration choice


def _head_dim_class(block_d):
    return max(block_d, 64)


def gpu_configs(capability, block_d, dtype):
    """The autotune candidates of the partial kernel for `dtype` inputs on a GPU of this capability."""
    if dtype == torch.float32:
        table = FLOAT32_CONFIGS
    else:
        table = DECODE_CONFIGS.get(capability, DECODE_CONFIGS["other"])
    return [
        triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_n, warps, stages in table[_head_dim_class(block_d)]
    ]


@functools.cache
def _autotuned_partial(capability, block_d, dtype):
    """Built on first use per (capability, head size, dtype). Keyed on the group's padded size and
    where the length comes from, not on the cache length, which grows every decoding step; the kernel
    only writes its outputs, so tuning re-runs are harmless."""
    configs = gpu_configs(capability, block_d, dtype)
    return triton.autotune(configs=configs, key=["BLOCK_H", "KV_LEN_ON_DEVICE"])(_decode_partial_kernel)


@functools.cache
def _device_facts(device_index):
    """(capability as 80/90/..., number of SMs) of a CUDA device."""
    properties = torch.cuda.get_device_properties(device_index)
    return properties.major * 10 + properties.minor, properties.multi_processor_count


def _block_d(head_dim):
    return max(MIN_BLOCK, triton.next_power_of_2(head_dim))


def _split_len(programs_per_split, kv_len, device):
    """Keys per split: see the split sizing constants."""
    if INTERPRETER:
        wanted_splits = INTERPRETER_SPLITS
        min_keys, align = INTERPRETER_MIN_SPLIT_KEYS, INTERPRETER_SPLIT_ALIGN
    else:
        sms = _device_facts(device.index)[1]
        wanted_splits = triton.cdiv(WAVES_PER_SM * sms, programs_per_split)
        min_keys, align = MIN_SPLIT_KEYS, SPLIT_ALIGN
    split_len = max(min_keys, triton.cdiv(kv_len, min(wanted_splits, MAX_SPLITS)))
    return triton.cdiv(split_len, align) * align


def check_head_span(name, tensor):
    """The attention kernels (here and in triton_attention) offset a (batch, head) slice with 64-bit
    integers but index inside it with 32-bit ones, which cover every realistic layout: a packed qkv
    at T=32k, H=32, D=128 spans 2^28.6 elements. Raises ValueError for a slice they cannot cover."""
    span = sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape[2:], tensor.stride()[2:]))
    if span >= 2**31:
        raise ValueError(
            f"causal_attention: {name} spans {span} elements within one (batch, head) slice (shape "
            f"{tuple(tensor.shape)}, strides {tensor.stride()}); the triton kernels need fewer than 2**31"
        )


# ----------------------------------------------------------------------------------------------
# Launcher


def decode_forward(q, k, v, softmax_scale):
    """q (B, H, 1, D); k, v (B, Hkv, L, D) with H % Hkv == 0 -> out (B, H, 1, D) in q's dtype."""
    return _decode(q, k, v, softmax_scale, None)


def decode_forward_with_length(q, k, v, kv_len, softmax_scale):
    """q (B, H, 1, D); k, v (B, Hkv, L, D) caches; kv_len: an int32/int64 tensor on q's device of one
    element (every sequence's number of valid keys) or B (each sequence's), read by the kernel, never
    by the host, and clamped to L -> out (B, H, 1, D) in q's dtype, attention of sequence b's query to
    its keys 0 .. kv_len[b]-1. The splits are sized for L, so every launch of a decode loop has the same
    grid (a CUDA graph replays it); splits past a sequence's length contribute nothing. Output 0 where
    the length is 0."""
    return _decode(q, k, v, softmax_scale, kv_len)


def _decode(q, k, v, softmax_scale, device_kv_len):
    """The two launches. device_kv_len: None (attend to all L keys), or the length tensor."""
    batch, heads, _, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    out = new_output(q.shape, q.dtype, q.device)  # (B, H, 1, D)
    if out.numel() == 0:
        return out
    for name, tensor in (("k", k), ("v", v)):
        check_head_span(name, tensor)
    group = heads // kv_heads
    if device_kv_len is not None:
        device_kv_len = device_kv_len.reshape(-1)  # (1,) or (B,): one stride steps from sequence to sequence
    split_len = _split_len(batch * kv_heads, kv_len, q.device)
    num_splits = triton.cdiv(kv_len, split_len)  # every split holds at least one of the L keys
    partial_out = new_output((batch, heads, num_splits, head_dim), torch.float32, q.device)  # (B, H, S, D)
    partial_lse = new_output((batch, heads, num_splits), torch.float32, q.device)  # (B, H, S)
    block_d = _block_d(head_dim)
    args = (
        q,
        k,
        v,
        partial_out,
        partial_lse,
        softmax_scale,
        q.stride(0),
        q.stride(1),
        q.stride(3),
        *k.stride(),
        *v.stride(),
        kv_heads,
        group,
        kv_len,
        device_kv_len,
        0 if device_kv_len is None or device_kv_len.numel() == 1 else device_kv_len.stride(0),
        split_len,
        num_splits,
    )
    constexprs = {
        "KV_LEN_ON_DEVICE": device_kv_len is not None,
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d,
        "BLOCK_H": max(MIN_BLOCK, triton.next_power_of_2(group)),
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }
    grid = (batch * kv_heads, num_splits)
    if INTERPRETER:
        _decode_partial_kernel[grid](*args, **constexprs, **INTERPRETER_CONFIG)
    else:
        _autotuned_partial(_device_facts(q.device.index)[0], block_d, q.dtype)[grid](*args, **constexprs)
    _decode_combine_kernel[(batch * heads,)](
        partial_out,
        partial_lse,
        out,
        out.stride(0),
        out.stride(1),
        out.stride(3),
        heads,
        num_splits,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_S=triton.next_power_of_2(num_splits),
        num_warps=COMBINE_WARPS[_head_dim_class(block_d)],
    )
    return out


# ----------------------------------------------------------------------------------------------
# Custom op


@torch.library.custom_op("fastgpt::triton_decode_attention", mutates_args=())
def decode_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float
) -> torch.Tensor:
    """Checks its arguments as decode_attention does (a user may call the operator directly)."""
    softmax_scale = _validate_decode(q, k, v, softmax_scale, "fastgpt::triton_decode_attention")
    with on_device_of(q):
        return decode_forward(q, k, v, softmax_scale)


@decode_attention_op.register_fake
def _(q, k, v, softmax_scale):
    return q.new_empty(q.shape)


def decode_attention(q, k, v, softmax_scale=None):
    """Attention of a single query per head to a KV cache: q (B, H, 1, D); k, v (B, Hkv, L, D), any
    strides (a view cache[:, :, :L] is read in place). Equals fastgpt.causal_attention for q_len == 1
    (which routes such calls here when no gradient is needed); inference only. Validates its
    arguments like causal_attention, plus q_len == 1."""
    return decode_attention_op(q, k, v, _validate_decode(q, k, v, softmax_scale, "decode_attention"))


def _validate_decode(q, k, v, softmax_scale, op):
    """causal_attention's checks, plus q_len == 1 and what the kernel takes; returns the softmax scale."""
    softmax_scale = dispatch.validate_attention(q, k, v, softmax_scale, op)
    if q.shape[2] != 1:
        raise ValueError(f"{op}: q must have shape (batch, heads, 1, head_dim), got {tuple(q.shape)}")
    dispatch.check_kernel_dtype(op, "q", q, SUPPORTED_DTYPES)
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim must be <= {MAX_HEAD_DIM}, got {q.shape[3]}")
    return softmax_scale


@torch.library.custom_op("fastgpt::triton_decode_attention_with_length", mutates_args=())
def decode_attention_with_length_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor, softmax_scale: float
) -> torch.Tensor:
    """Checks its arguments as decode_attention_with_length does (a user may call the operator)."""
    op = "fastgpt::triton_decode_attention_with_length"
    softmax_scale = dispatch.validate_decode_with_length(q, k, v, kv_len, softmax_scale, op)
    dispatch.check_kernel_dtype(op, "q", q, SUPPORTED_DTYPES)
    with on_device_of(q):
        return decode_forward_with_length(q, k, v, kv_len, softmax_scale)


@decode_attention_with_length_op.register_fake
def _(q, k, v, kv_len, softmax_scale):
    return q.new_empty(q.shape)


# ----------------------------------------------------------------------------------------------
# GPU compile check (fastgpt.ops.triton_compile)

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _unit_feature_strides(kernel):
    """{name: 1} for the feature-dimension strides: a launch specialises an integer equal to 1 into
    a constant, and real tensors have a contiguous last dimension."""
    return {name: 1 for name in kernel.arg_names if name.startswith("stride_") and name.endswith("d")}


def _compile_case(name, kernel, element, pointers, constexprs, num_warps, num_stages, tensor_cores):
    constexprs = dict(constexprs, **_unit_feature_strides(kernel))
    signature = {arg: "i32" for arg in kernel.arg_names}
    pointer_types = {"PartialOut": "*fp32", "PartialLse": "*fp32", "KvLen": "*i64"}
    signature.update({arg: pointer_types.get(arg, element) for arg in pointers})
    signature.update({arg: "fp32" for arg in kernel.arg_names if arg == "softmax_scale"})
    signature.update({arg: "constexpr" for arg in constexprs})
    return CompileCase(name, kernel, signature, constexprs, num_warps, num_stages, tensor_cores)


def gpu_compile_cases(capability):
    """Each partial-kernel configuration of each head-size class, for a GQA group of up to 16 query
    heads, with the length as an int and read from the device (the captured decode step's variant,
    "decode_partial_device_len"), and the combine kernel at D=128. fp16 and bf16 share every line of
    these kernels, so each head size is compiled in one of them (the attention kernels' cases cover
    both dtypes)."""
    cases = []
    length_variants = (
        ("decode_partial", {"KV_LEN_ON_DEVICE": False, "KvLen": None}, ()),
        ("decode_partial_device_len", {"KV_LEN_ON_DEVICE": True}, ("KvLen",)),
    )
    for dtype, head_dim in ((torch.float16, 64), (torch.bfloat16, 128), (torch.bfloat16, 256)):
        block_d = _block_d(head_dim)
        shape = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_H": MIN_BLOCK, "DOT_PRECISION": "tf32"}
        for config in gpu_configs(capability, block_d, dtype):
            for name, length_constexprs, length_pointers in length_variants:
                cases.append(
                    _compile_case(
                        f"{name} {TRITON_TYPES[dtype]} D={head_dim} N={config.kwargs['BLOCK_N']} "
                        f"w{config.num_warps} s{config.num_stages}",
                        _decode_partial_kernel,
                        "*" + TRITON_TYPES[dtype],
                        ("Q", "K", "V", "PartialOut", "PartialLse", *length_pointers),
                        dict(config.kwargs, **shape, **length_constexprs),
                        config.num_warps,
                        config.num_stages,
                        tensor_cores=True,
                    )
                )
    cases.append(
        _compile_case(
            f"decode_combine bf16 D=128 S={MAX_SPLITS}",
            _decode_combine_kernel,
            "*bf16",
            ("PartialOut", "PartialLse", "Out"),
            {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_S": MAX_SPLITS},
            COMBINE_WARPS[128],
            1,
            tensor_cores=False,
        )
    )
    return cases
