"""Causal attention in Triton, after FlashAttention-2: forward, backward, and their custom ops.

Layouts follow SDPA: q (B, H, Tq, D); k, v (B, Hkv, Tk, D) with H % Hkv == 0 and Tq <= Tk. The
causal mask is aligned to the bottom right: query i sees keys j <= i + (Tk - Tq). Every tensor is
read and written through its own strides, so views of a fused qkv projection are never copied.

Forward: a tile is a block of BLOCK_M queries of one (batch, head); each program loops over every
num_programs-th tile, longest first (on sm_90 the grid is persistent, one program per SM). A tile
streams the keys in blocks of BLOCK_N with an online softmax in float32, in base 2: the scores are
multiplied by softmax_scale * log2(e) once, so every exponential is a single exp2. Key blocks wholly
above the diagonal are never visited (the loop stops before them); key blocks wholly below it run
without a mask; only the few blocks crossing the diagonal are masked. It saves the logsumexp of each
row, in float32 and natural log (the reference's convention): lse = log(sum_j exp(scale * q.k_j)).
On sm_90, 16-bit q, k, v and out go through host-side tensor descriptors (TMA) that carry the
tensors' own 4-D strides: loads cost no address or mask registers, and tiles of 128x128 fit at
head_dim 128. Tensors TMA cannot describe (a stride or base not 16-byte aligned, a feature stride
other than 1) take the same kernel through pointers, as do float32 and other GPUs. The interpreter
runs the descriptor path wherever the tensors allow, for every dtype, so the CPU tests check it.
On sm_90 each step's PV product stays in flight (Triton leaves its wgmma unwaited) through the next
step's K wait and QK^T, which waits for both; the softmax runs with the tensor cores idle. A loop
that carries P from one step to the next, so that block j's PV is issued before block j + 1's
softmax (FlashAttention-3's order), compiles to exactly that overlap, but does not fit: Triton keeps a
loop-carried wgmma A operand in shared memory (which then cannot stay in flight), so P must be
carried in float32, and Triton 3.9 spills 2.9 KB at head_dim 128 in 128x128 tiles, 180-196 bytes in
128x64, 712 bytes at head_dim 64 in 128x128 (checked 2026-12-07; only head_dim 64 in 128x64 tiles
compiled spill-free, at 206 registers). gluon_attention.py's forward, which moves registers from its
producer warp to its two consumer warpgroups, does overlap the two.
FASTGPT_TRITON_ATTENTION=gluon (read by every forward call) hands the forward of the calls it serves
to gluon_attention.py's warp-specialized Hopper kernel instead (same outputs, so either backward below
consumes them), and the fused backward's main kernel likewise where gluon_attention.supports_backward
allows (head_dim 64 and 128): a backward follows the choice its forward was made under, whatever the
variable says when it runs. The default, "tl", is this module's kernels throughout.

Backward, by default: one preprocess computes delta = rowsum(dO * O) and zeroes a float32 dQ
accumulator; then one fused kernel, one program per block of BLOCK_N keys of a kv head, loops over
the query blocks that see those keys, for every query head of its GQA group in turn, and per block
recomputes P^T = exp2(scale * log2(e) * k.q - lse * log2(e)) from the saved logsumexp and forms
dV += P^T dO, dP^T = V dO^T, dS^T = P^T * (dP^T - delta), dK += dS^T Q and this block's share of dQ,
dS K, which it adds to the accumulator with atomics (five products); last, one kernel casts the
accumulator, times softmax_scale, to the input dtype. On sm_90, 16-bit q, k, v and dO come in
through tensor descriptors as in the forward. The atomics add in whatever order the programs run, so
dQ may differ between calls in its last bits. When torch.are_deterministic_algorithms_enabled() (and
at head_dim > 128, where the fused kernel spills), the backward takes two atomic-free kernels
instead: one program per key block accumulates dK and dV (the GQA group's sum formed in registers),
then one program per query block accumulates dQ over the key blocks it sees, in a fixed order.

Float32 inputs order those steps differently, because rounding a scaled logit errs by up to half
its ulp, and at logits of 30-60 that is up to 2.6e-6 relative in P, as much as eager's whole error,
which the tests allow only twice. The forward keeps the raw scores and their running max and
scales the difference, (q.k - max) * scale * log2(e), exact near the max where P matters; it forms
lse = max * scale + log(sum) with one rounding (an FMA). The backward subtracts before scaling too,
with lse split into a raw-score part and a small remainder (_lse_terms). Per score that is the same
number of operations in the forward and one more in the backward, next to float32's FMA products;
16-bit inputs, whose P is rounded to 16 bits for the next product anyway, keep the form above.

head_dim is padded to BLOCK_D, the next power of two (at least 16, the smallest tl.dot K), with
masked loads and stores (descriptor blocks are BLOCK_D wide: TMA zero-fills past D and clips the
stores). Autotune configurations are chosen per GPU capability, built lazily on the first launch
(importing this module needs no GPU). Under TRITON_INTERPRET=1 one fixed small
configuration runs, so the CPU tests stay fast.
"""

import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fastgpt import dispatch
from fastgpt.ops.device import on_device_of
from fastgpt.ops.memory import new_output
from fastgpt.ops.triton_compile import CompileCase
from fastgpt.ops.triton_decode import LOG2E, check_head_span, online_softmax_block

# ----------------------------------------------------------------------------------------------
# Constants

MAX_HEAD_DIM = 256
# tl.dot needs every dimension >= 16, so head_dim is padded to at least this.
MIN_BLOCK_D = 16
# Used inside the kernels, hence tl.constexpr (LOG2E, log2(e), is triton_decode's).
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): converts a base-2 logsumexp to natural log

# Set before this module is imported, TRITON_INTERPRET=1 makes @triton.jit yield interpreted
# functions; they run on CPU tensors with numpy, one program at a time.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter has no bfloat16 arithmetic (numpy has no such type: it computes on the raw bits and
# returns garbage), so under it bfloat16 is declined rather than answered wrongly.
if INTERPRETER:
    SUPPORTED_DTYPES = (torch.float16, torch.float32)
else:
    SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The one configuration the interpreter runs. Its cost grows with the number of programs, so blocks
# are small but not minimal; BLOCK_M != BLOCK_N on purpose, as on the GPU, so the tests exercise the
# diagonal bookkeeping of unequal blocks (a query block spanning two key blocks and the reverse).
INTERPRETER_CONFIGS = {
    "forward": {"BLOCK_M": 32, "BLOCK_N": 16},
    "preprocess": {"BLOCK_M": 32},
    "dkdv": {"BLOCK_M": 16, "BLOCK_N": 32},
    "dq": {"BLOCK_M": 32, "BLOCK_N": 16},
    "fused": {"BLOCK_M": 16, "BLOCK_N": 32},
    "cast": {"BLOCK": 1024},
}

# Programs of the forward's persistent grid under the interpreter: fewer than the tiles of most test
# shapes, so each program runs several tiles, and odd, so they do not divide evenly.
INTERPRETER_PROGRAMS = 3
# The environment variable that picks the forward kernel and the fused backward's main kernel on a GPU,
# and its values: "tl" is this module's; "gluon" is gluon_attention.py's warp-specialized Hopper
# kernels where they apply.
FORWARD_SELECTOR = "FASTGPT_TRITON_ATTENTION"
FORWARD_CHOICES = ("tl", "gluon")
# Compute capabilities whose forward reads through tensor descriptors (TMA) when the tensors allow.
TMA_CAPABILITIES = (90,)
# The forward's tile order visits (batch, head) slices in sections whose K and V together take at most
# this much: half of an H100's 50 MiB L2, so a section's keys are read from HBM about once.
KV_SECTION_BYTES = 24 * 2**20

# GPU configurations: (BLOCK_M, BLOCK_N, num_warps, num_stages), by kernel, capability and padded
# head_dim (64 stands for every BLOCK_D <= 64). The binding limit is registers, not shared memory:
# each figure quoted below ("R regs, S KiB") is what ptxas reports for the bf16 kernel compiled as
# a launch specialises it (16-byte aligned pointers and strides, unit feature stride), by Triton
# 3.9's ptxas. One listed configuration spills a little, and was kept as the fastest measured: the
# sm_90 dK/dV at 32x64 for D=128 (88 bytes); the others spill nothing (tests/test_triton_compile.py
# holds the ledger). Bigger tiles that spilled more were dropped: e.g. the pointer forward at 128x128
# for D=128 on sm_90 (100 bytes; the TMA forward runs it without spilling) or dK/dV at 64x128 (588).
# Shared memory limits: 227 KiB per block on sm_90, 163 KiB on sm_80, 99 KiB on sm_86/89.
FORWARD_CONFIGS = {
    # sm_90 through pointers: the fallback for tensors TMA cannot describe (FORWARD_TMA_CONFIGS below
    # serves the rest).
    90: {
        # The tile loop costs the pointer path a few registers, so the tiles that filled the 255
        # before spill now: 128x64 at 4 warps for D=64 (56 bytes), 128x64 at 8 warps for D=128 (16),
        # 128x32 at 8 warps for D=256 (24). What remains spills nothing:
        64: [(128, 128, 8, 3)],  # 225 regs, 112 KiB
        128: [(64, 64, 4, 3)],  # 255 regs, 112 KiB
        256: [(64, 32, 8, 2)],  # 214 regs, 96 KiB
    },
    80: {
        # mma.sync keeps operands in registers, so tiles are smaller than on sm_90 for the same budget:
        # 128x64 at 8 warps (183 regs) and 64x64 at 4 warps (185 regs).
        64: [(128, 64, 8, 3), (64, 64, 4, 3)],
        # D=128: 128x32 at 8 warps (196 regs) or 64x64 at 4 warps (255 regs, 56 bytes spilled); 128x64
        # spills more.
        128: [(128, 32, 8, 3), (64, 64, 4, 3)],
        # D=256: 64x32 at 8 warps (228 regs, 68 KiB).
        256: [(64, 32, 8, 2)],
    },
    # Any other capability (sm_75, sm_86/89, newer parts): one modest tile per head size that fits
    # 99 KiB of shared memory at 2 stages.
    "other": {64: [(64, 64, 4, 2)], 128: [(64, 64, 4, 2)], 256: [(64, 32, 8, 2)]},
}
# The sm_90 forward through tensor descriptors (TMA): loads cost no registers for addresses or masks,
# so the tiles are those the pointer path spilled at. Every configuration is 8 warps, two warpgroups of
# 64 query rows each (the wgmma M), one program per SM (the grid is persistent).
# Shared memory holds Q, num_stages buffers of K and V, and the output's staging buffer for its TMA
# store (a Q-sized tile), hence 2 stages at D=128 and only 32 keys per step at D=256.
FORWARD_TMA_CONFIGS = {
    64: [(128, 128, 8, 3), (128, 64, 8, 3)],  # 167 regs, 129 KiB; 115 regs, 81 KiB
    128: [(128, 128, 8, 2)],  # 203 regs, 193 KiB; both products are m64n128 wgmma
    256: [(128, 32, 8, 2)],  # 187 regs, 192 KiB (128x64 needs 256 KiB at 2 stages)
}
# The preprocess reads O and dO once and reduces along D: bandwidth-bound, no tensor cores, no
# pipelining. 64 rows per program at 4 warps; 32 rows at D=256 keeps two fp32 tiles at 64 regs.
PREPROCESS_CONFIGS = {64: [(64, 4)], 128: [(64, 4)], 256: [(32, 4)]}
# dK/dV: the program holds K, V (BLOCK_N x D, in shared memory) and the fp32 dK, dV accumulators
# (2 * BLOCK_N * D * 4 bytes over the threads: 128 regs/thread at 128x128 on 8 warps) and streams
# Q and dO in blocks of BLOCK_M rows. Every product has BLOCK_N as its M dimension, so BLOCK_N=128
# at 8 warps feeds two wgmma warpgroups; what registers remain go to the BLOCK_N x BLOCK_M score,
# P, dP and dS tiles, which is why BLOCK_M is only 16-32.
DKDV_CONFIGS = {
    90: {
        64: [(32, 128, 8, 3), (32, 64, 4, 3)],  # 218 and 247 regs
        128: [(16, 128, 8, 3), (32, 64, 8, 3)],  # 244 regs, 88 KiB; 255 regs + 88 bytes spilled, 81 KiB
        256: [(16, 32, 8, 2)],  # the accumulators are 64 regs at 32 keys on 8 warps
    },
    80: {
        64: [(32, 128, 8, 2), (32, 64, 4, 3)],  # 214 and 254 regs
        128: [(32, 64, 8, 2), (16, 64, 8, 3)],  # 246 and 220 regs; BLOCK_N=128 spills here
        256: [(16, 32, 8, 2)],  # 224 regs
    },
    "other": {64: [(32, 64, 4, 2)], 128: [(32, 64, 8, 2)], 256: [(16, 32, 8, 2)]},
}
# dQ: the program holds Q, dO and the fp32 dQ accumulator (BLOCK_M x D) and streams K and V: the
# mirror image of dK/dV with one accumulator instead of two, so BLOCK_M=128 at 8 warps fits.
DQ_CONFIGS = {
    90: {
        64: [(128, 64, 8, 3), (64, 64, 4, 3)],  # 169 and 166 regs
        128: [(128, 64, 8, 2), (128, 32, 8, 3)],  # 246 regs, 128 KiB; 193 regs, 112 KiB
        256: [(64, 32, 8, 2)],  # 248 regs
    },
    80: {
        64: [(128, 64, 8, 2), (64, 32, 4, 3)],  # 242 and 168 regs
        128: [(128, 32, 8, 2), (64, 64, 8, 3)],  # 255 (no spill) and 209 regs
        256: [(64, 16, 8, 2)],  # 219 regs
    },
    "other": {64: [(64, 32, 4, 2)], 128: [(64, 32, 4, 2)], 256: [(64, 16, 8, 2)]},
}
# The fused backward (dK, dV and a share of dQ per key block): the dK/dV kernel's register budget plus
# the (BLOCK_M, BLOCK_D) fp32 dQ product it adds to the accumulator with atomics. Figures as above
# (bf16, Triton 3.9's ptxas). On sm_90 through descriptors: 64x128 at D=64 (250 regs, 81 KiB); at
# D=128, 32x64 (248 regs, 72 KiB) spills nothing, and 64x128, the tile issue 20 asks for, is a second
# candidate although it spills about 1.1 KiB (255 regs, 161 KiB; recorded in the spill ledger): the
# autotuner keeps it only if it is the faster one on the GPU. 64x128 at 1 stage (1.1 KiB), 64x64
# (320 bytes) and 32x128 (600 bytes) spill too. Through pointers (sm_90 fallback, sm_80, others) the
# address registers leave less: 32x128 (213 regs) at D=64 and 16x64 (228 regs) at D=128 on sm_90;
# on sm_80 32x64 at 4 warps (253 regs) for D=64, 32x64 (248) or 16x64 (236) at 8 warps for D=128.
# Head dims over FUSED_MAX_BLOCK_D take the two-kernel backward: at D=256 every fused tile tried
# spilled 2.7 KiB or more (16x64 and 32x64 on sm_90).
FUSED_MAX_BLOCK_D = 128
FUSED_CONFIGS = {
    90: {64: [(32, 128, 8, 2)], 128: [(16, 64, 8, 2)]},
    80: {64: [(32, 64, 4, 2)], 128: [(32, 64, 8, 2), (16, 64, 8, 2)]},
    "other": {64: [(32, 64, 4, 2)], 128: [(16, 64, 8, 2)]},
}
FUSED_TMA_CONFIGS = {64: [(64, 128, 8, 2)], 128: [(32, 64, 8, 2), (64, 128, 8, 2)]}
# float32 inputs take exact fp32 products ("ieee": FMA, no tensor cores), a correctness path rather
# than a fast one. Four-byte elements double every tile, so one small tile per head size, unpipelined
# (one stage), on any capability: at most 98 KiB of shared memory (D=256), under every limit above.
# 8 warps, because FMA products hold whole operand rows in registers (at 4 warps the D=256 forward
# spills 6 KiB; at 8, under 0.5 KiB).
FLOAT32_CONFIGS = {
    "forward": {64: [(64, 32, 8, 2)], 128: [(64, 32, 8, 1)], 256: [(32, 32, 8, 1)]},
    "dkdv": {64: [(32, 64, 8, 1)], 128: [(16, 32, 8, 1)], 256: [(16, 32, 8, 1)]},
    "dq": {64: [(64, 32, 8, 1)], 128: [(32, 32, 8, 1)], 256: [(16, 32, 8, 1)]},
    "fused": {64: [(32, 64, 8, 1)], 128: [(16, 32, 8, 1)]},
}
# The dQ cast: an elementwise pass over the float32 accumulator, 8 float32 elements per thread per
# step at 4 warps (two 16-byte loads), 2048 per program.
CAST_CONFIG = {"BLOCK": 2048}
CAST_WARPS = 4


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _tile_ptrs(base, rows, cols, stride_row, stride_col):
    """Pointers to the (rows, cols) tile of the matrix at `base` with the given strides."""
    return base + rows[:, None] * stride_row + cols[None, :] * stride_col


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a (rows, cols) tile, masking rows and/or columns only where the caller needs it
    (out-of-range elements read as 0)."""
    if MASK_ROWS:
        if MASK_COLS:
            tile = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if MASK_COLS:
            tile = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _load_block(
    X,  # a TensorDescriptor of the (B, heads, T, D) tensor, block (1, 1, ROWS, BLOCK_D), with TMA; else its pointer
    batch,
    head,
    start,  # the block's first row: rows [start, start + ROWS) of (batch, head)
    length,  # T: rows from here on read as 0
    stride_b,
    stride_h,
    stride_t,
    stride_d,  # X's strides (the pointer path's)
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_ROWS: tl.constexpr,  # the pointer path masks rows >= length only when the caller asks
    TMA: tl.constexpr,
):
    """A (ROWS, BLOCK_D) block of one (batch, head) slice. TMA bounds the copy by the descriptor's
    shape in every dimension and zero-fills the rest: rows past T and features past D read as 0 and
    never spill into the next head."""
    if TMA:
        block = X.load([batch, head, start, 0]).reshape(ROWS, BLOCK_D)
    else:
        rows = start + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        base = X + batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h
        ptrs = _tile_ptrs(base, rows, cols, stride_t, stride_d)
        block = _load_tile(ptrs, rows < length, cols < HEAD_DIM, MASK_ROWS, HEAD_DIM != BLOCK_D)
    return block


@triton.jit
def _forward_inner(
    acc,
    row_sum,
    row_max,  # running output (BLOCK_M, BLOCK_D) fp32, softmax sum and max (BLOCK_M,)
    q,  # (BLOCK_M, BLOCK_D) query tile
    K,
    V,  # descriptors (TMA) or pointers of k and v
    batch,
    kv_head,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,  # k strides
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,  # v strides
    offs_m,  # query positions (BLOCK_M,)
    key_start,
    key_end,  # the range of keys to visit, key_start a multiple of BLOCK_N
    diag_offset,  # kv_len - q_len: query i sees keys j <= i + diag_offset
    kv_len,
    qk_scale,  # softmax_scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ON_DIAGONAL: tl.constexpr,  # the range crosses the diagonal (mask scores and ragged keys)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (eager fp32 matmuls do not use TF32)
    TMA: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(key_start, key_end, BLOCK_N):
        k = _load_block(
            K,
            batch,
            kv_head,
            start_n,
            kv_len,
            stride_kb,
            stride_kh,
            stride_kt,
            stride_kd,
            BLOCK_N,
            HEAD_DIM,
            BLOCK_D,
            ON_DIAGONAL,
            TMA,
        )  # (BLOCK_N, BLOCK_D)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if q.dtype != tl.float32:
            scores *= qk_scale  # base-2 units: the max and exponents below need no further product
        if ON_DIAGONAL:
            keys = start_n + offs_n
            scores = tl.where(keys[None, :] <= offs_m[:, None] + diag_offset, scores, float("-inf"))
        # Key 0 is in the first block visited and every query sees it, so the max is finite from the
        # first iteration on and -inf - -inf never happens.
        p, rescale, row_max_next, row_sum = online_softmax_block(
            scores, row_max, row_sum, qk_scale, q.dtype == tl.float32
        )
        v = _load_block(
            V,
            batch,
            kv_head,
            start_n,
            kv_len,
            stride_vb,
            stride_vh,
            stride_vt,
            stride_vd,
            BLOCK_N,
            HEAD_DIM,
            BLOCK_D,
            ON_DIAGONAL,
            TMA,
        )  # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * rescale[:, None], input_precision=DOT_PRECISION)
        row_max = row_max_next
    return acc, row_sum, row_max


@triton.jit
def tile_coordinates(tile, num_m_blocks, batch_heads, heads, group, section_heads, BLOCK_M: tl.constexpr):
    """(batch, head, kv_head, batch_head, start_m) of the forward's tile number `tile`: sections of
    section_heads (batch, head) slices, and within a section the last query block of every slice
    first (it sees the most keys). gluon_attention.py's forward walks its tiles by this too."""
    section_tiles = num_m_blocks * section_heads
    section = tile // section_tiles
    first_slice = section * section_heads
    slices = tl.minimum(section_heads, batch_heads - first_slice)  # the last section may be short
    within = tile - section * section_tiles
    start_m = (num_m_blocks - 1 - within // slices) * BLOCK_M
    batch_head = first_slice + within % slices
    batch = batch_head // heads
    head = batch_head % heads
    return batch, head, head // group, batch_head, start_m


@triton.jit
def _attention_forward_kernel(
    Q,
    K,
    V,  # inputs (B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D): TensorDescriptors (TMA) or pointers
    Out,  # output (B, H, Tq, D) in q's dtype: a TensorDescriptor (TMA) or a pointer
    Lse,  # output (B, H, Tq) float32, contiguous: natural-log logsumexp of each score row
    softmax_scale,  # float: scores are softmax_scale * q.k
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,  # q strides (the pointer path's; descriptors carry their own)
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,  # k strides
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,  # v strides
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,  # out strides
    batch_heads,  # B * H
    heads,  # H
    group,  # H // Hkv: query heads per kv head
    section_heads,  # (batch, head) slices per section of the tile order (see below)
    q_len,
    kv_len,  # Tq <= Tk
    tune_len,  # next power of two of Tk: an autotune key only, so lengths of one octave share a tuning
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # queries per tile
    BLOCK_N: tl.constexpr,  # keys per iteration
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision
    TMA: tl.constexpr,  # Q, K, V, Out are TensorDescriptors with blocks (1, 1, BLOCK_M or BLOCK_N, BLOCK_D)
):
    # Tiles of BLOCK_M queries of one (batch, head); each program takes every num_programs-th tile,
    # so the grid may be persistent (one program per SM) or one program per tile. The order runs
    # longest first: the (batch, head) slices are cut into sections of section_heads, chosen on the
    # host so that a section's K and V stay in L2, and within a section the last query block of
    # every slice comes first (it sees the most keys), then the one before, and so on. The short
    # tiles taken last fill the tail evenly.
    num_m_blocks = tl.cdiv(q_len, BLOCK_M)
    for tile in range(tl.program_id(0), num_m_blocks * batch_heads, tl.num_programs(0)):
        batch, head, kv_head, batch_head, start_m = tile_coordinates(
            tile, num_m_blocks, batch_heads, heads, group, section_heads, BLOCK_M
        )

        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows_ok = offs_m < q_len
        q = _load_block(
            Q,
            batch,
            head,
            start_m,
            q_len,
            stride_qb,
            stride_qh,
            stride_qt,
            stride_qd,
            BLOCK_M,
            HEAD_DIM,
            BLOCK_D,
            True,
            TMA,
        )  # (BLOCK_M, BLOCK_D)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # raw scores for fp32, else base 2
        qk_scale = softmax_scale * LOG2E

        diag_offset = kv_len - q_len
        # Keys [0, full_end) are seen by every query of the tile (the first sees j <= start_m + diag_offset).
        full_end = (start_m + diag_offset + 1) // BLOCK_N * BLOCK_N
        # Keys past causal_end are seen by none: those blocks are skipped, not masked.
        causal_end = tl.minimum(start_m + BLOCK_M + diag_offset, kv_len)
        acc, row_sum, row_max = _forward_inner(
            acc,
            row_sum,
            row_max,
            q,
            K,
            V,
            batch,
            kv_head,
            stride_kb,
            stride_kh,
            stride_kt,
            stride_kd,
            stride_vb,
            stride_vh,
            stride_vt,
            stride_vd,
            offs_m,
            0,
            full_end,
            diag_offset,
            kv_len,
            qk_scale,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_N,
            False,
            DOT_PRECISION,
            TMA,
        )
        acc, row_sum, row_max = _forward_inner(
            acc,
            row_sum,
            row_max,
            q,
            K,
            V,
            batch,
            kv_head,
            stride_kb,
            stride_kh,
            stride_kt,
            stride_kd,
            stride_vb,
            stride_vh,
            stride_vt,
            stride_vd,
            offs_m,
            full_end,
            causal_end,
            diag_offset,
            kv_len,
            qk_scale,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_N,
            True,
            DOT_PRECISION,
            TMA,
        )

        out = (acc / row_sum[:, None]).to(q.dtype)
        if TMA:
            Out.store([batch, head, start_m, 0], out.reshape(1, 1, BLOCK_M, BLOCK_D))  # clipped to (Tq, D)
        else:
            out_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
            offs_d = tl.arange(0, BLOCK_D)
            o_ptrs = _tile_ptrs(out_base, offs_m, offs_d, stride_ot, stride_od)
            tl.store(o_ptrs, out, mask=rows_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
        if q.dtype == tl.float32:
            lse = tl.fma(row_max, softmax_scale, tl.log(row_sum))  # one rounding of the large term
        else:
            lse = (row_max + tl.log2(row_sum)) * LN2  # base 2 -> natural log
        tl.store(Lse + batch_head.to(tl.int64) * q_len + offs_m, lse, mask=rows_ok)


@triton.jit
def _attention_backward_preprocess_kernel(
    Out,
    dOut,  # (B, H, Tq, D) forward output and its gradient, any strides
    Delta,  # output (B, H, Tq) float32, contiguous: rowsum(dO * O)
    dQacc,  # None, or the fused backward's (B, H, Tq, D) float32 contiguous dQ accumulator, zeroed here
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,  # out strides
    stride_gb,
    stride_gh,
    stride_gt,
    stride_gd,  # dout strides
    heads,
    q_len,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program
):
    num_m_blocks = tl.cdiv(q_len, BLOCK_M)  # 1-D grid of (row block, batch * head)
    batch_head = tl.program_id(0) // num_m_blocks
    batch = (batch_head // heads).to(tl.int64)
    head = (batch_head % heads).to(tl.int64)
    offs_m = tl.program_id(0) % num_m_blocks * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = offs_m < q_len
    o_ptrs = _tile_ptrs(Out + batch * stride_ob + head * stride_oh, offs_m, offs_d, stride_ot, stride_od)
    g_ptrs = _tile_ptrs(dOut + batch * stride_gb + head * stride_gh, offs_m, offs_d, stride_gt, stride_gd)
    o = _load_tile(o_ptrs, rows_ok, offs_d < HEAD_DIM, True, HEAD_DIM != BLOCK_D).to(tl.float32)
    do = _load_tile(g_ptrs, rows_ok, offs_d < HEAD_DIM, True, HEAD_DIM != BLOCK_D).to(tl.float32)
    tl.store(Delta + batch_head.to(tl.int64) * q_len + offs_m, tl.sum(o * do, 1), mask=rows_ok)
    if dQacc is not None:  # the same rows of the accumulator: no separate memset launch
        rows = batch_head.to(tl.int64) * q_len + offs_m
        acc_ptrs = dQacc + rows[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(
            acc_ptrs,
            tl.zeros([BLOCK_M, BLOCK_D], tl.float32),
            mask=rows_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        )


@triton.jit
def _lse_terms(lse, softmax_scale, FLOAT32: tl.constexpr):
    """The row terms (hi, lo) that _probabilities takes, from the forward's natural-log logsumexp.
    16-bit inputs: (lse * log2(e), 0). Float32: hi = lse / softmax_scale in raw-score units, and
    lo = (hi * softmax_scale - lse) * log2(e), the part of lse that the rounded hi misses: the FMA
    forms that small difference with a single rounding, so hi and lo together keep lse exact to
    within a rounding of lo."""
    if FLOAT32:
        hi = lse / softmax_scale
        lo = tl.fma(hi, softmax_scale, -lse) * LOG2E
    else:
        hi = lse * LOG2E
        lo = tl.zeros_like(hi)
    return hi, lo


@triton.jit
def _probabilities(scores, lse_hi, lse_lo, qk_scale, FLOAT32: tl.constexpr):
    """P = exp2(scores * qk_scale - lse * log2(e)) from raw scores and the _lse_terms broadcast against
    them; qk_scale = softmax_scale * log2(e)."""
    if FLOAT32:
        # Wherever P is not negligible, scores is close to hi and their difference is exact, so the
        # exponent is rounded only relative to its own small size (see the module docstring).
        p = tl.exp2(tl.fma(scores - lse_hi, qk_scale, lse_lo))
    else:
        p = tl.exp2(scores * qk_scale - lse_hi)
    return p


@triton.jit
def _backward_dkdv_inner(
    dk,
    dv,  # running (BLOCK_N, BLOCK_D) fp32 gradients of this key block
    k,
    v,  # (BLOCK_N, BLOCK_D) key and value tiles
    q_ptrs,
    do_ptrs,  # pointers to the query / output-gradient tile at query query_start
    lse_ptr,
    delta_ptr,  # pointers to the row statistics of query 0 of this head
    stride_qt,
    stride_gt,  # strides between queries, between output-gradient rows
    offs_n,
    offs_d,  # key positions (BLOCK_N,), feature offsets (BLOCK_D,)
    query_start,
    query_end,  # the range of queries to visit, query_start a multiple of BLOCK_M
    diag_offset,
    q_len,
    softmax_scale,
    qk_scale,  # softmax_scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ON_DIAGONAL: tl.constexpr,  # the range crosses the diagonal: mask P
    DOT_PRECISION: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(query_start, query_end, BLOCK_M):
        queries = start_m + offs_m
        rows_ok = queries < q_len
        # Rows past q_len read as zeros (q, dO, lse, delta), so they add exactly 0 to dK and dV.
        q = _load_tile(q_ptrs, rows_ok, offs_d < HEAD_DIM, True, HEAD_DIM != BLOCK_D)  # (BLOCK_M, BLOCK_D)
        lse = tl.load(lse_ptr + queries, mask=rows_ok, other=0.0)
        lse_hi, lse_lo = _lse_terms(lse, softmax_scale, q.dtype == tl.float32)
        # Work transposed, keys along rows, so P^T and dS^T come out ready for the dK/dV products.
        scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        p_t = _probabilities(scores_t, lse_hi[None, :], lse_lo[None, :], qk_scale, q.dtype == tl.float32)
        if ON_DIAGONAL:
            p_t = tl.where(offs_n[:, None] <= queries[None, :] + diag_offset, p_t, 0.0)
        do = _load_tile(do_ptrs, rows_ok, offs_d < HEAD_DIM, True, HEAD_DIM != BLOCK_D)  # (BLOCK_M, BLOCK_D)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(delta_ptr + queries, mask=rows_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        q_ptrs += BLOCK_M * stride_qt
        do_ptrs += BLOCK_M * stride_gt
    return dk, dv


@triton.jit
def _attention_backward_dkdv_kernel(
    Q,
    K,
    V,
    dOut,  # (B, H, Tq, D), (B, Hkv, Tk, D) x 2, (B, H, Tq, D), any strides
    Lse,
    Delta,  # (B, H, Tq) float32, contiguous: forward logsumexp (natural log), rowsum(dO * O)
    dK,
    dV,  # outputs (B, Hkv, Tk, D) in k's dtype, any strides
    softmax_scale,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,  # q strides
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,  # k strides
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,  # v strides
    stride_gb,
    stride_gh,
    stride_gt,
    stride_gd,  # dout strides
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dkd,  # dk strides
    stride_dvb,
    stride_dvh,
    stride_dvt,
    stride_dvd,  # dv strides
    heads,
    group,
    q_len,
    kv_len,
    tune_len,  # next power of two of Tk, an autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per iteration
    BLOCK_N: tl.constexpr,  # keys per program
    DOT_PRECISION: tl.constexpr,
):
    # 1-D grid of (key block, batch * kv head). The first key blocks are seen by the most queries
    # and run first.
    num_n_blocks = tl.cdiv(kv_len, BLOCK_N)
    batch_kv_head = tl.program_id(0) // num_n_blocks
    start_n = tl.program_id(0) % num_n_blocks * BLOCK_N
    kv_heads = heads // group
    batch = (batch_kv_head // kv_heads).to(tl.int64)
    kv_head = (batch_kv_head % kv_heads).to(tl.int64)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    keys_ok = offs_n < kv_len
    k_ptrs = _tile_ptrs(K + batch * stride_kb + kv_head * stride_kh, offs_n, offs_d, stride_kt, stride_kd)
    v_ptrs = _tile_ptrs(V + batch * stride_vb + kv_head * stride_vh, offs_n, offs_d, stride_vt, stride_vd)
    k = _load_tile(k_ptrs, keys_ok, offs_d < HEAD_DIM, True, HEAD_DIM != BLOCK_D)  # (BLOCK_N, BLOCK_D)
    v = _load_tile(v_ptrs, keys_ok, offs_d < HEAD_DIM, True, HEAD_DIM != BLOCK_D)  # (BLOCK_N, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = softmax_scale * LOG2E

    diag_offset = kv_len - q_len
    # Query i sees key j when i >= j - diag_offset. Query blocks before the one holding query
    # start_n - diag_offset see none of these keys and are skipped; blocks from full_start on see
    # all of them (their first query sees the block's last key) and run unmasked.
    query_start = tl.maximum(start_n - diag_offset, 0) // BLOCK_M * BLOCK_M
    full_start = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag_offset, 0), BLOCK_M) * BLOCK_M
    full_start = tl.minimum(full_start, q_len)
    for member in range(group):
        head = kv_head * group + member
        queries = query_start + offs_m
        q_ptrs = _tile_ptrs(Q + batch * stride_qb + head * stride_qh, queries, offs_d, stride_qt, stride_qd)
        do_base = dOut + batch * stride_gb + head * stride_gh
        do_ptrs = _tile_ptrs(do_base, queries, offs_d, stride_gt, stride_gd)
        row_stats = (batch * heads + head) * q_len
        dk, dv = _backward_dkdv_inner(
            dk,
            dv,
            k,
            v,
            q_ptrs,
            do_ptrs,
            Lse + row_stats,
            Delta + row_stats,
            stride_qt,
            stride_gt,
            offs_n,
            offs_d,
            query_start,
            full_start,
            diag_offset,
            q_len,
            softmax_scale,
            qk_scale,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_M,
            True,
            DOT_PRECISION,
        )
        skipped = full_start - query_start
        dk, dv = _backward_dkdv_inner(
            dk,
            dv,
            k,
            v,
            q_ptrs + skipped * stride_qt,
            do_ptrs + skipped * stride_gt,
            Lse + row_stats,
            Delta + row_stats,
            stride_qt,
            stride_gt,
            offs_n,
            offs_d,
            full_start,
            q_len,
            diag_offset,
            q_len,
            softmax_scale,
            qk_scale,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_M,
            False,
            DOT_PRECISION,
        )

    dk *= softmax_scale  # d(scores)/dk = softmax_scale * q
    store_mask = keys_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    dk_base = dK + batch * stride_dkb + kv_head * stride_dkh
    dv_base = dV + batch * stride_dvb + kv_head * stride_dvh
    dk_ptrs = _tile_ptrs(dk_base, offs_n, offs_d, stride_dkt, stride_dkd)
    dv_ptrs = _tile_ptrs(dv_base, offs_n, offs_d, stride_dvt, stride_dvd)
    tl.store(dk_ptrs, dk.to(dK.dtype.element_ty), mask=store_mask)
    tl.store(dv_ptrs, dv.to(dV.dtype.element_ty), mask=store_mask)


@triton.jit
def _backward_dq_inner(
    dq,  # running (BLOCK_M, BLOCK_D) fp32 gradient of this query block
    q,
    do,  # (BLOCK_M, BLOCK_D) query and output-gradient tiles
    lse_hi,
    lse_lo,  # (BLOCK_M,) _lse_terms of the rows' logsumexps
    delta,  # (BLOCK_M,) rowsum(dO * O)
    k_ptrs,
    v_ptrs,  # pointers to the first key/value tile of the range
    stride_kt,
    stride_vt,
    offs_m,
    offs_d,
    key_start,
    key_end,  # the range of keys to visit, key_start a multiple of BLOCK_N
    diag_offset,
    kv_len,
    qk_scale,  # softmax_scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ON_DIAGONAL: tl.constexpr,  # the range crosses the diagonal: mask P and ragged keys
    DOT_PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(key_start, key_end, BLOCK_N):
        keys = start_n + offs_n
        k = _load_tile(k_ptrs, keys < kv_len, offs_d < HEAD_DIM, ON_DIAGONAL, HEAD_DIM != BLOCK_D)
        v = _load_tile(v_ptrs, keys < kv_len, offs_d < HEAD_DIM, ON_DIAGONAL, HEAD_DIM != BLOCK_D)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        p = _probabilities(scores, lse_hi[:, None], lse_lo[:, None], qk_scale, q.dtype == tl.float32)
        if ON_DIAGONAL:
            p = tl.where(keys[None, :] <= offs_m[:, None] + diag_offset, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return dq


@triton.jit
def _attention_backward_dq_kernel(
    Q,
    K,
    V,
    dOut,  # (B, H, Tq, D), (B, Hkv, Tk, D) x 2, (B, H, Tq, D), any strides
    Lse,
    Delta,  # (B, H, Tq) float32, contiguous
    dQ,  # output (B, H, Tq, D) in q's dtype, any strides
    softmax_scale,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,  # q strides
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,  # k strides
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,  # v strides
    stride_gb,
    stride_gh,
    stride_gt,
    stride_gd,  # dout strides
    stride_dqb,
    stride_dqh,
    stride_dqt,
    stride_dqd,  # dq strides
    heads,
    group,
    q_len,
    kv_len,
    tune_len,  # next power of two of Tk, an autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per iteration
    DOT_PRECISION: tl.constexpr,
):
    num_m_blocks = tl.cdiv(q_len, BLOCK_M)  # the forward's grid layout: longest rows first
    batch_head = tl.program_id(0) // num_m_blocks
    start_m = (num_m_blocks - 1 - tl.program_id(0) % num_m_blocks) * BLOCK_M
    batch = (batch_head // heads).to(tl.int64)
    head = (batch_head % heads).to(tl.int64)
    kv_head = head // group

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = offs_m < q_len
    q_ptrs = _tile_ptrs(Q + batch * stride_qb + head * stride_qh, offs_m, offs_d, stride_qt, stride_qd)
    do_ptrs = _tile_ptrs(dOut + batch * stride_gb + head * stride_gh, offs_m, offs_d, stride_gt, stride_gd)
    q = _load_tile(q_ptrs, rows_ok, offs_d < HEAD_DIM, True, HEAD_DIM != BLOCK_D)  # (BLOCK_M, BLOCK_D)
    do = _load_tile(do_ptrs, rows_ok, offs_d < HEAD_DIM, True, HEAD_DIM != BLOCK_D)  # (BLOCK_M, BLOCK_D)
    row_stats = batch_head.to(tl.int64) * q_len + offs_m
    lse = tl.load(Lse + row_stats, mask=rows_ok, other=0.0)
    delta = tl.load(Delta + row_stats, mask=rows_ok, other=0.0)
    k_ptrs = _tile_ptrs(K + batch * stride_kb + kv_head * stride_kh, offs_n, offs_d, stride_kt, stride_kd)
    v_ptrs = _tile_ptrs(V + batch * stride_vb + kv_head * stride_vh, offs_n, offs_d, stride_vt, stride_vd)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lse_hi, lse_lo = _lse_terms(lse, softmax_scale, q.dtype == tl.float32)
    qk_scale = softmax_scale * LOG2E

    diag_offset = kv_len - q_len
    full_end = (start_m + diag_offset + 1) // BLOCK_N * BLOCK_N  # as in the forward
    causal_end = tl.minimum(start_m + BLOCK_M + diag_offset, kv_len)
    dq = _backward_dq_inner(
        dq,
        q,
        do,
        lse_hi,
        lse_lo,
        delta,
        k_ptrs,
        v_ptrs,
        stride_kt,
        stride_vt,
        offs_m,
        offs_d,
        0,
        full_end,
        diag_offset,
        kv_len,
        qk_scale,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        False,
        DOT_PRECISION,
    )
    dq = _backward_dq_inner(
        dq,
        q,
        do,
        lse_hi,
        lse_lo,
        delta,
        k_ptrs + full_end * stride_kt,
        v_ptrs + full_end * stride_vt,
        stride_kt,
        stride_vt,
        offs_m,
        offs_d,
        full_end,
        causal_end,
        diag_offset,
        kv_len,
        qk_scale,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        True,
        DOT_PRECISION,
    )

    dq *= softmax_scale  # d(scores)/dq = softmax_scale * k
    dq_ptrs = _tile_ptrs(dQ + batch * stride_dqb + head * stride_dqh, offs_m, offs_d, stride_dqt, stride_dqd)
    tl.store(dq_ptrs, dq.to(dQ.dtype.element_ty), mask=rows_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _backward_fused_inner(
    dk,
    dv,  # running (BLOCK_N, BLOCK_D) fp32 gradients of this key block
    k,
    v,  # (BLOCK_N, BLOCK_D) key and value tiles
    Q,
    dOut,  # descriptors (TMA) or pointers of q and dout
    dq_base,  # pointer to row 0, feature 0 of this (batch, head) in the fp32 dQ accumulator (Tq, D), contiguous
    lse_ptr,
    delta_ptr,  # pointers to the row statistics of query 0 of this (batch, head)
    batch,
    head,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,  # q strides (the pointer path's)
    stride_gb,
    stride_gh,
    stride_gt,
    stride_gd,  # dout strides
    offs_n,  # key positions (BLOCK_N,)
    query_start,
    query_end,  # the range of queries to visit, query_start a multiple of BLOCK_M
    diag_offset,
    q_len,
    softmax_scale,
    qk_scale,  # softmax_scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ON_DIAGONAL: tl.constexpr,  # the range crosses the diagonal: mask P
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(query_start, query_end, BLOCK_M):
        queries = start_m + offs_m
        rows_ok = queries < q_len
        # Rows past q_len read as zeros (q, dO, lse, delta): they add exactly 0 to dK and dV, and their
        # dQ is not stored.
        q = _load_block(
            Q,
            batch,
            head,
            start_m,
            q_len,
            stride_qb,
            stride_qh,
            stride_qt,
            stride_qd,
            BLOCK_M,
            HEAD_DIM,
            BLOCK_D,
            True,
            TMA,
        )  # (BLOCK_M, BLOCK_D)
        lse = tl.load(lse_ptr + queries, mask=rows_ok, other=0.0)
        lse_hi, lse_lo = _lse_terms(lse, softmax_scale, q.dtype == tl.float32)
        # Keys along rows, as in the dK/dV kernel, so P^T and dS^T are the dK/dV products' A operands.
        scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        p_t = _probabilities(scores_t, lse_hi[None, :], lse_lo[None, :], qk_scale, q.dtype == tl.float32)
        if ON_DIAGONAL:
            p_t = tl.where(offs_n[:, None] <= queries[None, :] + diag_offset, p_t, 0.0)
        do = _load_block(
            dOut,
            batch,
            head,
            start_m,
            q_len,
            stride_gb,
            stride_gh,
            stride_gt,
            stride_gd,
            BLOCK_M,
            HEAD_DIM,
            BLOCK_D,
            True,
            TMA,
        )  # (BLOCK_M, BLOCK_D)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(delta_ptr + queries, mask=rows_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)  # (BLOCK_N, BLOCK_M)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)
        # This key block's share of dQ (unscaled: the cast kernel applies softmax_scale), added to the
        # float32 accumulator that every key block of the row's range adds to.
        dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_D) fp32
        # Offsets in int32 from the block's first row: int64 ones per element cost registers (at 64x128
        # and D=128 on sm_90, 84 more bytes spilled).
        dq_ptrs = dq_base + start_m * HEAD_DIM + (offs_m[:, None] * HEAD_DIM + offs_d[None, :])
        if HEAD_DIM == BLOCK_D:
            tl.atomic_add(dq_ptrs, dq, mask=rows_ok[:, None], sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq, mask=rows_ok[:, None] & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit
def key_block_coordinates(
    batch_kv_heads, heads, group, kv_len, q_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """(batch, kv_head, batch_kv_head, start_n, query_start) of a fused backward program: its keys
    [start_n, start_n + BLOCK_N) of one (batch, kv head) on a 1-D grid key block major (the first key
    blocks of every slice are seen by the most queries and run first, and programs running together
    work on different slices, so their atomic additions to dQ seldom meet), and the first block of
    BLOCK_M queries that sees any of those keys. gluon_attention.py's backward takes its keys by this
    too."""
    batch_kv_head = tl.program_id(0) % batch_kv_heads
    start_n = tl.program_id(0) // batch_kv_heads * BLOCK_N
    kv_heads = heads // group
    query_start = tl.maximum(start_n - (kv_len - q_len), 0) // BLOCK_M * BLOCK_M
    return batch_kv_head // kv_heads, batch_kv_head % kv_heads, batch_kv_head, start_n, query_start


@triton.jit
def _attention_backward_fused_kernel(
    Q,
    K,
    V,
    dOut,  # (B, H, Tq, D), (B, Hkv, Tk, D) x 2, (B, H, Tq, D): TensorDescriptors (TMA) or pointers
    Lse,
    Delta,  # (B, H, Tq) float32, contiguous: forward logsumexp (natural log), rowsum(dO * O)
    dK,
    dV,  # outputs (B, Hkv, Tk, D) in k's dtype, contiguous
    dQacc,  # (B, H, Tq, D) float32, contiguous, zeroed: the unscaled dQ, summed over key blocks by atomics
    softmax_scale,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,  # q strides (the pointer path's; descriptors carry their own)
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,  # k strides
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,  # v strides
    stride_gb,
    stride_gh,
    stride_gt,
    stride_gd,  # dout strides
    batch_kv_heads,  # B * Hkv
    heads,  # H
    group,  # H // Hkv
    q_len,
    kv_len,
    tune_len,  # next power of two of Tk, an autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per iteration
    BLOCK_N: tl.constexpr,  # keys per program
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,  # Q, K, V, dOut are TensorDescriptors with blocks (1, 1, BLOCK_M or BLOCK_N, BLOCK_D)
):
    batch, kv_head, batch_kv_head, start_n, query_start = key_block_coordinates(
        batch_kv_heads, heads, group, kv_len, q_len, BLOCK_M, BLOCK_N
    )

    k = _load_block(
        K,
        batch,
        kv_head,
        start_n,
        kv_len,
        stride_kb,
        stride_kh,
        stride_kt,
        stride_kd,
        BLOCK_N,
        HEAD_DIM,
        BLOCK_D,
        True,
        TMA,
    )  # (BLOCK_N, BLOCK_D)
    v = _load_block(
        V,
        batch,
        kv_head,
        start_n,
        kv_len,
        stride_vb,
        stride_vh,
        stride_vt,
        stride_vd,
        BLOCK_N,
        HEAD_DIM,
        BLOCK_D,
        True,
        TMA,
    )  # (BLOCK_N, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = softmax_scale * LOG2E
    offs_n = start_n + tl.arange(0, BLOCK_N)

    diag_offset = kv_len - q_len
    # As in the dK/dV kernel: query blocks before query_start see none of these keys, those from
    # full_start on see all of them.
    full_start = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag_offset, 0), BLOCK_M) * BLOCK_M
    full_start = tl.minimum(full_start, q_len)
    for member in range(group):
        head = kv_head * group + member
        batch_head = (batch * heads + head).to(tl.int64)
        row_stats = batch_head * q_len
        dq_base = dQacc + row_stats * HEAD_DIM
        dk, dv = _backward_fused_inner(
            dk,
            dv,
            k,
            v,
            Q,
            dOut,
            dq_base,
            Lse + row_stats,
            Delta + row_stats,
            batch,
            head,
            stride_qb,
            stride_qh,
            stride_qt,
            stride_qd,
            stride_gb,
            stride_gh,
            stride_gt,
            stride_gd,
            offs_n,
            query_start,
            full_start,
            diag_offset,
            q_len,
            softmax_scale,
            qk_scale,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_M,
            True,
            DOT_PRECISION,
            TMA,
        )
        dk, dv = _backward_fused_inner(
            dk,
            dv,
            k,
            v,
            Q,
            dOut,
            dq_base,
            Lse + row_stats,
            Delta + row_stats,
            batch,
            head,
            stride_qb,
            stride_qh,
            stride_qt,
            stride_qd,
            stride_gb,
            stride_gh,
            stride_gt,
            stride_gd,
            offs_n,
            full_start,
            q_len,
            diag_offset,
            q_len,
            softmax_scale,
            qk_scale,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_M,
            False,
            DOT_PRECISION,
            TMA,
        )

    dk *= softmax_scale  # d(scores)/dk = softmax_scale * q
    offs_d = tl.arange(0, BLOCK_D)
    # dK and dV are contiguous (B, Hkv, Tk, D): row r of this slice sits at (slice * Tk + r) * D.
    out_offsets = (batch_kv_head.to(tl.int64) * kv_len + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
    store_mask = (offs_n < kv_len)[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.store(dK + out_offsets, dk.to(dK.dtype.element_ty), mask=store_mask)
    tl.store(dV + out_offsets, dv.to(dV.dtype.element_ty), mask=store_mask)


@triton.jit
def _attention_backward_dq_cast_kernel(
    dQacc,  # (B, H, Tq, D) float32, contiguous: the fused kernel's unscaled dQ
    dQ,  # output (B, H, Tq, D) in q's dtype, contiguous
    softmax_scale,
    numel,  # B * H * Tq * D
    BLOCK: tl.constexpr,  # elements per program
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < numel
    dq = tl.load(dQacc + offsets, mask=in_range) * softmax_scale  # d(scores)/dq = softmax_scale * k
    tl.store(dQ + offsets, dq.to(dQ.dtype.element_ty), mask=in_range)


KERNELS = {
    "forward": _attention_forward_kernel,
    "preprocess": _attention_backward_preprocess_kernel,
    "dkdv": _attention_backward_dkdv_kernel,
    "dq": _attention_backward_dq_kernel,
    "fused": _attention_backward_fused_kernel,
    "cast": _attention_backward_dq_cast_kernel,
}


# ----------------------------------------------------------------------------------------------
# Configuration choice


def _head_dim_class(block_d):
    """The configuration table column for a padded head_dim: 64 covers 16, 32 and 64."""
    return max(block_d, 64)


def gpu_configs(kernel_name, capability, block_d, dtype, tma=False):
    """The autotune candidates of one kernel for `dtype` inputs on a GPU of compute capability
    `capability` (80, 90, ...); `tma`: the forward reads and writes through tensor descriptors."""
    head_dims = _head_dim_class(block_d)
    if kernel_name == "preprocess":
        return [
            triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=1)
            for block_m, warps in PREPROCESS_CONFIGS[head_dims]
        ]
    if kernel_name == "cast":
        return [triton.Config(CAST_CONFIG, num_warps=CAST_WARPS, num_stages=1)]
    if tma:
        table = {"forward": FORWARD_TMA_CONFIGS, "fused": FUSED_TMA_CONFIGS}[kernel_name]
        pre_hook = _set_descriptor_blocks
    elif dtype == torch.float32:
        table, pre_hook = FLOAT32_CONFIGS[kernel_name], None
    else:
        tables = {"forward": FORWARD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS, "fused": FUSED_CONFIGS}
        tables = tables[kernel_name]
        table, pre_hook = tables.get(capability, tables["other"]), None
    return [
        triton.Config(
            {"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages, pre_hook=pre_hook
        )
        for block_m, block_n, warps, stages in table[head_dims]
    ]


def _set_descriptor_blocks(nargs):
    """Give a kernel's descriptors the blocks of the configuration about to launch (the autotuner
    calls this before each launch, so descriptors built once serve every candidate)."""
    for name, block in _descriptor_blocks(nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_D"]).items():
        if isinstance(nargs.get(name), TensorDescriptor):
            nargs[name].block_shape = block


def _descriptor_blocks(block_m, block_n, block_d):
    """The block of each descriptor a kernel may take: one (batch, head), a tile of rows (BLOCK_M of
    the query-side tensors, BLOCK_N of the key-side ones), the padded features."""
    return {
        "Q": [1, 1, block_m, block_d],
        "K": [1, 1, block_n, block_d],
        "V": [1, 1, block_n, block_d],
        "Out": [1, 1, block_m, block_d],
        "dOut": [1, 1, block_m, block_d],
    }


# Autotune keys: the length's octave (the dtype is added by Triton; the head size and capability
# select the autotuner itself).
AUTOTUNE_KEYS = {
    "forward": ["tune_len"],
    "preprocess": [],
    "dkdv": ["tune_len"],
    "dq": ["tune_len"],
    "fused": ["tune_len"],
    "cast": [],
}
# Outputs accumulated with atomics, which the autotuner must zero before each candidate and once more
# before the launch that keeps its result.
ACCUMULATED_OUTPUTS = {"fused": ["dQacc"]}


@functools.cache
def _launcher(kernel_name, capability, block_d, dtype, tma):
    """launch(grid, args, constexprs) of one kernel on a GPU, built on first use per (kernel,
    capability, head size, dtype, descriptors or pointers). Several candidates go through an
    autotuner; a single one is launched directly, without the autotuner's work on every call.
    Kernels other than the fused backward overwrite their outputs and accumulate in registers, so
    re-running them while tuning cannot corrupt results; the fused backward's dQ accumulator is
    reset between candidates (ACCUMULATED_OUTPUTS)."""
    configs = gpu_configs(kernel_name, capability, block_d, dtype, tma)
    kernel = KERNELS[kernel_name]
    if len(configs) > 1:
        tuner = triton.autotune(
            configs=configs,
            key=AUTOTUNE_KEYS[kernel_name],
            reset_to_zero=ACCUMULATED_OUTPUTS.get(kernel_name),
        )(kernel)
        return lambda grid, args, constexprs: tuner[grid](*args, **constexprs)
    (config,) = configs
    options = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    # The descriptors' blocks follow from this configuration: (argument position, block) of each.
    blocks = _descriptor_blocks(config.kwargs.get("BLOCK_M"), config.kwargs.get("BLOCK_N"), block_d)
    descriptor_blocks = [
        (kernel.arg_names.index(name), block) for name, block in blocks.items() if name in kernel.arg_names
    ]

    def launch(grid, args, constexprs):
        if tma:
            for position, block in descriptor_blocks:
                args[position].block_shape = block
        kernel[grid(config.kwargs)](*args, **constexprs, **options)

    return launch


@functools.cache
def _capability(device_index):
    major, minor = torch.cuda.get_device_capability(device_index)
    return major * 10 + minor


@functools.cache
def _multiprocessors(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch(kernel_name, inputs, grid, *args, **constexprs):
    """Launch one kernel on `inputs`' device for their dtype: the fixed interpreter configuration on
    CPU, the autotuned one on a GPU. `grid` maps a configuration's meta-parameters to the grid."""
    tma = constexprs.get("TMA", False)
    if INTERPRETER:
        config = INTERPRETER_CONFIGS[kernel_name]
        if tma:
            _set_descriptor_blocks(
                {**dict(zip(KERNELS[kernel_name].arg_names, args)), **constexprs, **config}
            )
        KERNELS[kernel_name][grid(config)](*args, **constexprs, **config)
    else:
        capability = _capability(inputs.device.index)
        block_d = constexprs.get("BLOCK_D", MIN_BLOCK_D)  # the cast kernel has none: one configuration
        _launcher(kernel_name, capability, block_d, inputs.dtype, tma)(grid, args, constexprs)


def _cdiv(numerator, denominator):
    """Host-side ceil division (triton.cdiv is a constexpr function in Triton 3.9, with its own cost on
    every call)."""
    return -(numerator // -denominator)


def _next_power_of_2(value):
    return 1 << (value - 1).bit_length()


def _block_d(head_dim):
    return max(MIN_BLOCK_D, _next_power_of_2(head_dim))


def _dot_precision(dtype):
    # fp32 inputs: exact fp32 products ("ieee"), as eager fp32 matmuls (TF32 is off in torch by
    # default). 16-bit inputs ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _tune_len(length):
    return _next_power_of_2(max(length, 16))


# ----------------------------------------------------------------------------------------------
# Launchers


def tma_strides(tensor):
    """The strides a TMA descriptor of `tensor` (B, heads, T, D) carries: its real ones, or None where
    TMA cannot address it. TMA needs a 16-byte aligned base, a unit feature stride, and positive
    strides of 16-byte multiples on every other dimension it steps; a dimension of size 1 is never
    stepped, so its stride is free and the descriptor carries an aligned one. (gluon_attention.py
    builds its descriptors from these too.)"""
    strides = tensor.stride()
    if tensor.data_ptr() % 16 or strides[-1] != 1:
        return None
    itemsize = tensor.element_size()
    described = []
    for size, stride in zip(tensor.shape[:-1], strides[:-1]):
        if size == 1:
            described.append(16 // itemsize)
        elif stride > 0 and stride * itemsize % 16 == 0:
            described.append(stride)
        else:
            return None
    return [*described, 1]


def _descriptor(tensor):
    """A TensorDescriptor of `tensor` (B, heads, T, D) with its real strides (tma_strides), or None
    where TMA cannot address it. The block is set per configuration (_set_descriptor_blocks, or the
    launcher of a single configuration)."""
    strides = tma_strides(tensor)
    if strides is None:
        return None
    return TensorDescriptor(tensor, list(tensor.shape), strides, [1, 1, MIN_BLOCK_D, MIN_BLOCK_D])


def _tma_operands(tensors):
    """(True, their TensorDescriptors) where the hardware has TMA and every tensor is describable: sm_90
    with 16-bit inputs (float32 keeps its exact FMA kernel on the pointer path); else (False, tensors).
    The interpreter takes descriptors for every dtype, so the CPU tests check the code that runs on
    Hopper."""
    if not INTERPRETER:
        capability = _capability(tensors[0].device.index)
        if capability not in TMA_CAPABILITIES or tensors[0].dtype == torch.float32:
            return False, tensors
    descriptors = []
    for tensor in tensors:
        descriptor = _descriptor(tensor)
        if descriptor is None:
            return False, tensors
        descriptors.append(descriptor)
    return True, tuple(descriptors)


def _forward_programs(tiles, device, tma):
    """Programs of the forward's grid: persistent (one per SM, as every TMA configuration takes a whole
    SM's registers with 8 warps near 255 registers each) on the TMA path, one per tile on the pointer
    path, whose configurations fit one to three programs per SM. The interpreter runs
    INTERPRETER_PROGRAMS, so the CPU tests loop over several tiles per program."""
    if INTERPRETER:
        return min(tiles, INTERPRETER_PROGRAMS)
    if tma:
        return min(tiles, _multiprocessors(device.index))
    return tiles


def section_heads(k, group, batch_heads):
    """(batch, head) slices per section of the forward's tile order: those whose K and V (k is
    (B, Hkv, Tk, D)) fit KV_SECTION_BYTES together, whole GQA groups of them, at most batch_heads."""
    kv_len, head_dim = k.shape[2], k.shape[3]
    slice_kv_bytes = 2 * kv_len * head_dim * k.element_size() // group
    return min(max(1, KV_SECTION_BYTES // max(slice_kv_bytes, 1) // group) * group, batch_heads)


def forward_kernel_choice():
    """FASTGPT_TRITON_ATTENTION, read on every call: "tl" (the default, also where it is empty) for this
    module's kernels, "gluon" for gluon_attention.py's where they apply (gluon_attention.supports for
    the forward, supports_backward for the fused backward)."""
    choice = os.environ.get(FORWARD_SELECTOR) or "tl"
    if choice not in FORWARD_CHOICES:
        raise ValueError(f"{FORWARD_SELECTOR} must be one of {FORWARD_CHOICES}, got {choice!r}")
    return choice


def _gluon_module(q, choice):
    """gluon_attention.py where `choice` (a forward_kernel_choice()) selects it and q is on a GPU, else
    None (the caller then asks its supports or supports_backward whether it serves the call)."""
    if choice == "gluon" and q.is_cuda:
        from fastgpt.ops import gluon_attention  # it imports this module: loaded on first use

        return gluon_attention
    return None


def attention_forward(q, k, v, softmax_scale):
    """q (B, H, Tq, D); k, v (B, Hkv, Tk, D) -> out (B, H, Tq, D) in q's dtype, lse (B, H, Tq) float32
    (natural log). Arguments are assumed validated (dispatch.validate_attention)."""
    gluon_attention = _gluon_module(q, forward_kernel_choice())
    if gluon_attention is not None and gluon_attention.supports(q, k, v):
        return gluon_attention.attention_forward(q, k, v, softmax_scale)
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    out = new_output((batch, heads, q_len, head_dim), q.dtype, q.device)  # (B, H, Tq, D)
    lse = new_output((batch, heads, q_len), torch.float32, q.device)  # (B, H, Tq)
    if out.numel() == 0:
        return out, lse
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_head_span(name, tensor)
    group = heads // kv_heads
    tma, tensors = _tma_operands((q, k, v, out))
    _launch(
        "forward",
        q,
        lambda meta: (_forward_programs(_cdiv(q_len, meta["BLOCK_M"]) * batch * heads, q.device, tma),),
        *tensors,
        lse,
        softmax_scale,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        batch * heads,
        heads,
        group,
        section_heads(k, group, batch * heads),
        q_len,
        kv_len,
        _tune_len(kv_len),
        HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim),
        DOT_PRECISION=_dot_precision(q.dtype),
        TMA=tma,
    )
    return out, lse


def attention_backward(dout, q, k, v, out, lse, softmax_scale, kernels):
    """Gradients of attention_forward: (dq (B, H, Tq, D), dk (B, Hkv, Tk, D), dv (B, Hkv, Tk, D)), in the
    inputs' dtype. dout and out are (B, H, Tq, D) in any strides; lse is attention_forward's.
    kernels: the forward_kernel_choice() its forward ran under (the autograd saves it), so that a
    forward called with FASTGPT_TRITON_ATTENTION=gluon gets the Gluon backward even if the variable
    has changed by the time the backward runs.
    The fused kernel, whose dQ is summed with atomics (bitwise results may vary between calls), or in
    its place gluon_attention.py's fused backward where kernels is "gluon" and
    gluon_attention.supports_backward holds (between the same preprocess and cast), unless
    torch.are_deterministic_algorithms_enabled() or head_dim > FUSED_MAX_BLOCK_D: then the separate dK/dV
    and dQ kernels, in a fixed order."""
    batch, heads, q_len = q.shape[:3]
    dq = new_output(q.shape, q.dtype, q.device)  # (B, H, Tq, D)
    dk = new_output(k.shape, k.dtype, k.device)  # (B, Hkv, Tk, D)
    dv = new_output(v.shape, v.dtype, v.device)  # (B, Hkv, Tk, D)
    if dk.numel() == 0:
        return dq, dk, dv
    if dq.numel() == 0:  # no query sees any key (q_len == 0): the gradients are zero
        return dq, dk.zero_(), dv.zero_()
    check_head_span("the output gradient", dout)
    # (B, H, Tq): every backward kernel (the Gluon one too) indexes lse as contiguous rows, and
    # torch.ops.fastgpt.triton_attention_backward may be handed a strided view (a no-op for the
    # forward's own lse).
    lse = lse.contiguous()
    delta = new_output((batch, heads, q_len), torch.float32, q.device)  # (B, H, Tq)
    if torch.are_deterministic_algorithms_enabled() or _block_d(q.shape[-1]) > FUSED_MAX_BLOCK_D:
        _preprocess(out, dout, delta, None)
        _deterministic_backward(dout, q, k, v, lse, delta, dq, dk, dv, softmax_scale)
    else:
        dq_acc = new_output(q.shape, torch.float32, q.device)  # (B, H, Tq, D), zeroed by the preprocess
        _preprocess(out, dout, delta, dq_acc)
        gluon_attention = _gluon_module(q, kernels)
        if gluon_attention is not None and gluon_attention.supports_backward(q, k, v, dout):
            gluon_attention.attention_backward(dout, q, k, v, lse, delta, dq_acc, dk, dv, softmax_scale)
        else:
            _fused_backward(dout, q, k, v, lse, delta, dq_acc, dk, dv, softmax_scale)
        _launch(
            "cast",
            q,
            lambda meta: (_cdiv(dq.numel(), meta["BLOCK"]),),
            dq_acc,
            dq,
            softmax_scale,
            dq.numel(),
        )
    return dq, dk, dv


def _preprocess(out, dout, delta, dq_acc):
    """delta = rowsum(dout * out); zeroes dq_acc (the fused backward's accumulator) unless it is None."""
    batch, heads, q_len, head_dim = out.shape
    _launch(
        "preprocess",
        out,
        lambda meta: (_cdiv(q_len, meta["BLOCK_M"]) * batch * heads,),
        out,
        dout,
        delta,
        dq_acc,
        *out.stride(),
        *dout.stride(),
        heads,
        q_len,
        HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim),
    )


def _fused_backward(dout, q, k, v, lse, delta, dq_acc, dk, dv, softmax_scale):
    """dk and dv (contiguous), and the unscaled dQ added into dq_acc, in one launch; q, k, v and dout
    through tensor descriptors where _tma_operands allows."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    tma, tensors = _tma_operands((q, k, v, dout))
    _launch(
        "fused",
        q,
        lambda meta: (_cdiv(kv_len, meta["BLOCK_N"]) * batch * kv_heads,),
        *tensors,
        lse,
        delta,
        dk,
        dv,
        dq_acc,
        softmax_scale,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *dout.stride(),
        batch * kv_heads,
        heads,
        heads // kv_heads,
        q_len,
        kv_len,
        _tune_len(kv_len),
        HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim),
        DOT_PRECISION=_dot_precision(q.dtype),
        TMA=tma,
    )


def _deterministic_backward(dout, q, k, v, lse, delta, dq, dk, dv, softmax_scale):
    """dk and dv by one kernel (a GQA group summed in registers), dq by another: no atomics."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    constexprs = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": _block_d(head_dim),
        "DOT_PRECISION": _dot_precision(q.dtype),
    }
    _launch(
        "dkdv",
        q,
        lambda meta: (_cdiv(kv_len, meta["BLOCK_N"]) * batch * kv_heads,),
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dk,
        dv,
        softmax_scale,
        *strides,
        *dk.stride(),
        *dv.stride(),
        heads,
        group,
        q_len,
        kv_len,
        _tune_len(kv_len),
        **constexprs,
    )
    _launch(
        "dq",
        q,
        lambda meta: (_cdiv(q_len, meta["BLOCK_M"]) * batch * heads,),
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        softmax_scale,
        *strides,
        *dq.stride(),
        heads,
        group,
        q_len,
        kv_len,
        _tune_len(kv_len),
        **constexprs,
    )


# ----------------------------------------------------------------------------------------------
# Custom ops and autograd


@torch.library.custom_op("fastgpt::triton_attention_forward", mutates_args=())
def attention_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, Tq, D), lse (B, H, Tq) float32, natural log); differentiable in q, k and v. Checks
    its arguments as causal_attention does: a user may call torch.ops.fastgpt.triton_attention_forward."""
    op = "fastgpt::triton_attention_forward"
    softmax_scale = dispatch.validate_attention(q, k, v, softmax_scale, op)
    dispatch.check_kernel_dtype(op, "q", q, SUPPORTED_DTYPES)
    with on_device_of(q):
        return attention_forward(q, k, v, softmax_scale)


@attention_forward_op.register_fake
def _(q, k, v, softmax_scale):
    batch, heads, q_len, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, q_len), dtype=torch.float32)


@torch.library.custom_op("fastgpt::triton_attention_backward", mutates_args=())
def attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    kernels: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of attention_forward_op, given the output gradient and its saved results (checked:
    the kernels index dout and out as q, and lse by (batch, head, row))."""
    op = "fastgpt::triton_attention_backward"
    softmax_scale = dispatch.validate_attention(q, k, v, softmax_scale, op)
    dispatch.check_kernel_dtype(op, "q", q, SUPPORTED_DTYPES)
    dispatch.check_saved(op, "dout", dout, q.shape, "q", q)
    dispatch.check_saved(op, "out", out, q.shape, "q", q)
    dispatch.check_saved(op, "lse", lse, q.shape[:3], "q", q, torch.float32)
    if kernels not in FORWARD_CHOICES:
        raise ValueError(f"{op}: kernels must be one of {FORWARD_CHOICES}, got {kernels!r}")
    with on_device_of(q):
        return attention_backward(dout, q, k, v, out, lse, softmax_scale, kernels)


@attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, softmax_scale, kernels):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale = softmax_scale
    ctx.kernels = forward_kernel_choice()
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.kernels)
    return dq, dk, dv, None


attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


def causal_attention(q, k, v, softmax_scale):
    """The triton backend of fastgpt.causal_attention (arguments validated by fastgpt.functional; a
    single query that needs no gradient is routed to triton_decode's kernel by dispatch instead)."""
    return attention_forward_op(q, k, v, softmax_scale)[0]


def unsupported_reason(op, head_dim=None, **facts):
    """Why this backend declines a call dispatch is about to make, or None."""
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        return f"the triton {op} kernel supports head_dim <= {MAX_HEAD_DIM}, got head_dim={head_dim}"
    return None


# ----------------------------------------------------------------------------------------------
# GPU compile check (fastgpt.ops.triton_compile)

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Pointer arguments that are always float32 (softmax statistics); other pointers have the input dtype.
FLOAT32_POINTERS = {"Lse", "Delta", "dQacc"}
POINTERS = {"Q", "K", "V", "Out", "dOut", "dK", "dV", "dQ"}
FLOAT_SCALARS = {"softmax_scale"}


def _signature(kernel, dtype, constexprs, descriptor_blocks=None):
    """Triton types of the kernel's arguments; `descriptor_blocks` maps the pointers that are
    TensorDescriptors at this launch to their block shapes."""
    descriptor_blocks = descriptor_blocks or {}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in descriptor_blocks:
            signature[name] = f"tensordesc<{TRITON_TYPES[dtype]}{descriptor_blocks[name]}>"
        elif name in FLOAT32_POINTERS:
            signature[name] = "*fp32"
        elif name in POINTERS:
            signature[name] = "*" + TRITON_TYPES[dtype]
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def unit_feature_strides(kernel):
    """{name: 1} for the kernel's feature-dimension strides (stride_*d). A launch specialises an
    integer argument equal to 1 into a constant, and real tensors have a contiguous last dimension,
    so compiling with these constants checks the vectorised code that actually runs."""
    return {name: 1 for name in kernel.arg_names if name.startswith("stride_") and name.endswith("d")}


def gpu_compile_cases(capability):
    """One CompileCase per (kernel, autotune configuration, dtype, head size) launched on a GPU of
    this capability: bf16 and fp16 at head_dim 64 and 128, and bf16 at 256 (the dQ cast, which has no
    head size, once per dtype). On a TMA capability the forward and the fused backward are compiled as
    they launch there, through descriptors (whose block shapes a launch takes from the
    configuration), and their pointer fallbacks in bf16. The preprocess is compiled as the fused
    backward launches it, zeroing the dQ accumulator. The float32
    path is left out: its FMA kernels take 6-20 s each to compile, too slow for CI (its D=256 tiles
    were compiled for sm_80 and sm_90 when they were chosen: at most 98 KiB of shared memory)."""
    shapes = [(dtype, head_dim) for dtype in (torch.bfloat16, torch.float16) for head_dim in (64, 128)]
    shapes.append((torch.bfloat16, 256))
    cases = []
    for dtype, head_dim in shapes:
        block_d = _block_d(head_dim)
        for kernel_name, kernel in KERNELS.items():
            if kernel_name == "cast" and head_dim != 64:
                continue
            if kernel_name == "fused" and block_d > FUSED_MAX_BLOCK_D:
                continue
            paths = [False]
            if kernel_name in ("forward", "fused") and capability in TMA_CAPABILITIES:
                paths = [True, False] if dtype == torch.bfloat16 else [True]
            for tma in paths:
                for config in gpu_configs(kernel_name, capability, block_d, dtype, tma):
                    cases.append(_compile_case(kernel_name, kernel, config, dtype, head_dim, tma))
    return cases


def _compile_case(kernel_name, kernel, config, dtype, head_dim, tma):
    block_d = _block_d(head_dim)
    blocks = "x".join(str(value) for value in config.kwargs.values())
    warps_stages = f"w{config.num_warps} s{config.num_stages}"
    if kernel_name == "cast":
        return CompileCase(
            name=f"attention_cast {TRITON_TYPES[dtype]} {blocks} {warps_stages}",
            kernel=kernel,
            signature=_signature(kernel, dtype, config.kwargs),
            constexprs=dict(config.kwargs),
            num_warps=config.num_warps,
            num_stages=config.num_stages,
            tensor_cores=False,
        )
    constexprs = dict(config.kwargs, HEAD_DIM=head_dim, BLOCK_D=block_d)
    constexprs.update(unit_feature_strides(kernel))
    if kernel_name != "preprocess":
        constexprs["DOT_PRECISION"] = _dot_precision(dtype)
    descriptor_blocks = None
    if kernel_name in ("forward", "fused"):
        constexprs["TMA"] = tma
        if tma:
            blocks_by_name = _descriptor_blocks(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], block_d)
            descriptor_blocks = {
                name: blocks_by_name[name] for name in kernel.arg_names if name in blocks_by_name
            }
    path = " tma" if tma else ""
    return CompileCase(
        name=f"attention_{kernel_name}{path} {TRITON_TYPES[dtype]} D={head_dim} {blocks} {warps_stages}",
        kernel=kernel,
        signature=_signature(kernel, dtype, constexprs, descriptor_blocks),
        constexprs=constexprs,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        tensor_cores=kernel_name != "preprocess",
        tma=tma,
    )
