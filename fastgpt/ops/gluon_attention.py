"""Causal attention forward in Gluon for Hopper (sm_90a): warp-specialized, after FlashAttention-3.

An opt-in alternative to the forward kernel of triton_attention.py, taken by the triton backend when
FASTGPT_TRITON_ATTENTION=gluon (read on every call) on a compute capability 9.0 GPU, for float16 or
bfloat16 q, k, v at head_dim 64 or 128 that TMA can describe; every other call, and every backward,
keeps triton_attention.py's kernels. Its outputs follow the same contract: out (B, H, Tq, D) in q's
dtype and lse (B, H, Tq) float32 in natural log, so the Triton backward consumes them unchanged.
Layouts as there: q (B, H, Tq, D); k, v (B, Hkv, Tk, D) with H % Hkv == 0 and Tq <= Tk, query head h
reading kv head h // (H // Hkv); the causal mask is aligned to the bottom right (query i sees keys
j <= i + Tk - Tq). Every tensor is read and written through a host-side TMA descriptor of its own
4-D strides, so views of a fused qkv projection are never copied.

Gluon programs the warps explicitly, so the kernel is split into three partitions:
- a producer warp issues TMA copies: each tile's 128 queries once into one Q buffer, then the tile's
  128-key blocks of K and V into a ring of STAGES buffers. Each ring slot has a "ready" and an
  "empty" mbarrier per operand: the TMA transaction count completes "ready", and both consumers
  arrive on "empty" when they no longer read that operand; the producer waits on "empty" before
  reusing it. K and V are released apart because a block's K is read by its QK^T and its V only by
  the PV product one step later: a K block loads as soon as the QK^T that last read its slot is done,
  not a step later when its V is.
- two consumer warpgroups, each owning 64 of the tile's 128 query rows (the wgmma M of one
  warpgroup), multiply with asynchronous wgmma: S = Q K^T from shared memory, O += P V with P, the
  16-bit probabilities, in registers as the A operand (no round trip through shared memory).
- registers are reallocated between them with setmaxnreg: the producer keeps only a few (it holds
  scalars), the consumers take the rest for the S, P and O tiles.
The consumers take turns issuing their products (ping-pong, FlashAttention-3's schedule): a pair of
mbarriers passes a token, and a consumer issues the PV product of the previous key block and the
QK^T of the current one only while it holds the token, then hands it over. So one warpgroup's
exponentials run while the tensor cores work on the other's products. Within a warpgroup the PV
product of block i-1 stays in flight during the softmax of block i as well.

The softmax is online and in base 2: scores are multiplied by softmax_scale * log2(e) once, so every
exponential is one exp2; lse = (max + log2(sum)) * ln(2) at the end, as the Triton forward saves it.
Key blocks wholly above the diagonal are never loaded (a tile's loop stops before them); blocks wholly
below it run without a mask; only the blocks crossing the diagonal are masked. TMA zero-fills rows
past Tq or Tk, and clips the output store to Tq, so ragged lengths need nothing else.

The grid is persistent, one program per SM, and walks the tiles in triton_attention.py's order:
longest first within sections of (batch, head) slices whose K and V fit half the L2.

Nothing here runs in the Triton interpreter: its correctness is checked by the GPU tests of
tests/test_triton_attention.py, and its code by the sm_90 compile checks of
tests/test_triton_compile.py, which compile it for sm_90a with Triton 3.9 here; it compiles with
Triton 3.6, the GPU machines' version, as well. The Gluon API it uses is the same in both but for
the names of the TMA copies (tma_load and tma_store below pick whichever this Triton has).
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from fastgpt.ops.memory import new_output
from fastgpt.ops.triton_attention import (
    TRITON_TYPES,
    _capability,
    _cdiv,
    _multiprocessors,
    section_heads,
    tma_strides,
)
from fastgpt.ops.triton_compile import CompileCase
from fastgpt.ops.triton_decode import LOG2E, check_head_span

# ----------------------------------------------------------------------------------------------
# Constants

CAPABILITY = 90  # wgmma, TMA and setmaxnreg: Hopper only (sm_90a)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128)
# Triton 3.9 renamed Gluon's TMA copies; 3.6, which the GPU machines run, has only the old names. The
# kernels call these two, whichever names this Triton has (their arguments are the same).
if hasattr(tma, "async_load"):
    tma_load, tma_store = tma.async_load, tma.async_store
else:
    tma_load, tma_store = tma.async_copy_global_to_shared, tma.async_copy_shared_to_global
LN2 = gl.constexpr(0.6931471805599453)  # ln(2): converts the base-2 logsumexp to natural log

# Queries per tile: two consumer warpgroups of CONSUMER_ROWS each.
BLOCK_M = 128
# The wgmma M of one warpgroup (4 warps x 16 rows): each consumer's share of the tile.
CONSUMER_ROWS = 64
# Keys per step: S (64 x 128 fp32) is 64 registers per consumer thread and P (16-bit) 32, beside the
# O accumulator (64 x D fp32: 64 registers at D=128), which fits the consumers' 240 registers; the
# QK^T product is one m64n128 wgmma per k-step.
BLOCK_N = 128
# K/V ring depth. Shared memory holds Q (128 x D), the ring of K and V blocks (128 x D each) and the
# two consumers' output staging buffers (64 x D each), in 16-bit elements: at D=128 that is
# 32 + STAGES * 64 + 32 KiB, so 2 stages (192 KiB; 3 would need 256 KiB, over the 227 KiB limit); at
# D=64, 16 + STAGES * 32 + 16 KiB, so 3 stages (128 KiB) let the producer run two blocks ahead.
STAGES = {64: 3, 128: 2}
# The default partition is consumer 0, one warpgroup; the workers are consumer 1 (a warpgroup) and
# the producer (one warp, padded to a warpgroup by the register allocator).
NUM_WARPS = 4
CONSUMER_WARPS = gl.constexpr(4)
PRODUCER_WARPS = gl.constexpr(1)
# Registers per thread. The kernel is compiled for maxnreg=168: three warpgroups x 128 threads x 168
# = 64512 of the SM's 65536 registers, one program per SM. setmaxnreg then moves them: the producer
# drops to 24 (the minimum; it holds loop counters and coordinates) and consumer 1 rises to 240; the
# default partition (consumer 0) gets what remains, 3 * 168 - 24 - 240 = 240.
MAX_REGISTERS = 168
PRODUCER_REGISTERS = gl.constexpr(24)
CONSUMER_REGISTERS = gl.constexpr(240)


# ----------------------------------------------------------------------------------------------
# Kernels


@gluon.jit
def _tile_coordinates(tile, num_m_blocks, batch_heads, heads, group, section_heads, BLOCK_M: gl.constexpr):
    """(batch, head, kv_head, batch_head, start_m) of persistent tile number `tile`, in
    triton_attention.py's forward order: sections of section_heads (batch, head) slices, and within
    a section the last query block of every slice first (it sees the most keys)."""
    section_tiles = num_m_blocks * section_heads
    section = tile // section_tiles
    first_slice = section * section_heads
    slices = gl.minimum(section_heads, batch_heads - first_slice)  # the last section may be short
    within = tile - section * section_tiles
    start_m = (num_m_blocks - 1 - within // slices) * BLOCK_M
    batch_head = first_slice + within % slices
    batch = batch_head // heads
    head = batch_head % heads
    return batch, head, head // group, batch_head, start_m


@gluon.jit
def _key_blocks(start_m, q_len, kv_len, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Key blocks the tile of queries [start_m, start_m + BLOCK_M) sees: the last one holds the key
    its last query (or the last key) stops at; blocks above the diagonal are never visited."""
    causal_end = gl.minimum(start_m + BLOCK_M + kv_len - q_len, kv_len)
    return gl.cdiv(causal_end, BLOCK_N)


@gluon.jit
def _producer_partition(
    Q,
    K,
    V,  # descriptors: blocks (1, 1, BLOCK_M, D), (1, 1, BLOCK_N, D), (1, 1, BLOCK_N, D)
    q_smem,  # (1, 1, BLOCK_M, D): the tile's queries
    k_smem,
    v_smem,  # (STAGES, 1, 1, BLOCK_N, D): the K/V ring
    q_ready,
    q_empty,  # mbarriers of the Q buffer
    k_ready,
    v_ready,
    k_empty,
    v_empty,  # (STAGES, 1) each: both consumers have read the slot's K block / its V block
    batch_heads,
    heads,
    group,
    section_heads,
    q_len,
    kv_len,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
):
    num_m_blocks = gl.cdiv(q_len, BLOCK_M)
    loaded = 0  # key blocks loaded so far: slot loaded % STAGES, its use number loaded // STAGES
    for tile in range(gl.program_id(0), num_m_blocks * batch_heads, gl.num_programs(0)):
        batch, head, kv_head, _, start_m = _tile_coordinates(
            tile, num_m_blocks, batch_heads, heads, group, section_heads, BLOCK_M
        )
        tiles_done = (tile - gl.program_id(0)) // gl.num_programs(0)  # by this program
        # Both consumers release the Q buffer after their tile's last QK^T (a fresh mbarrier counts
        # as released once: phase parity 1 passes).
        mbarrier.wait(q_empty, (tiles_done & 1) ^ 1)
        mbarrier.expect(q_ready, Q.block_type.nbytes)
        tma_load(Q, [batch, head, start_m, 0], q_ready, q_smem)
        for block in range(_key_blocks(start_m, q_len, kv_len, BLOCK_M, BLOCK_N)):
            slot = loaded % STAGES
            released = ((loaded // STAGES) & 1) ^ 1  # the parity of the slot's previous use ending
            mbarrier.wait(k_empty.index(slot), released)
            mbarrier.expect(k_ready.index(slot), K.block_type.nbytes)
            tma_load(K, [batch, kv_head, block * BLOCK_N, 0], k_ready.index(slot), k_smem.index(slot))
            mbarrier.wait(v_empty.index(slot), released)
            mbarrier.expect(v_ready.index(slot), V.block_type.nbytes)
            tma_load(V, [batch, kv_head, block * BLOCK_N, 0], v_ready.index(slot), v_smem.index(slot))
            loaded += 1


@gluon.jit
def _softmax_step(scores, row_max, row_sum, qk_scale, rows, first_key, diag_offset, MASKED):
    """One online-softmax step in base 2 on a (CONSUMER_ROWS, BLOCK_N) fp32 score block: returns
    (p, rescale, row_max, row_sum) with p = exp2(scores * qk_scale - row_max) and rescale the factor
    by which the running output and sum shrink. The max is taken before scaling, which is the same
    as after since qk_scale > 0 (dispatch rejects other softmax scales); the exponent is then one
    FMA per score. MASKED (a runtime flag) sets the scores of keys past each query's diagonal to -inf;
    key 0 is in every tile's first block and every query sees it, so the running max is finite from
    the first block on (rows past Tq, never stored, excepted)."""
    if MASKED:
        keys = first_key + gl.arange(0, scores.shape[1], layout=gl.SliceLayout(0, scores.type.layout))
        visible = keys[None, :] <= rows[:, None] + diag_offset
        scores = gl.where(visible, scores, float("-inf"))
    row_max_next = gl.maximum(row_max, gl.max(scores, axis=1) * qk_scale)
    rescale = gl.exp2(row_max - row_max_next)
    p = gl.exp2(scores * qk_scale - row_max_next[:, None])
    row_sum = row_sum * rescale + gl.sum(p, axis=1)
    return p, rescale, row_max_next, row_sum


@gluon.jit
def _consumer_partition(
    Out,  # descriptor of out (B, H, Tq, D), block (1, 1, CONSUMER_ROWS, D)
    Lse,  # (B, H, Tq) float32, contiguous
    q_smem,
    k_smem,
    v_smem,
    o_smem,  # (1, 1, CONSUMER_ROWS, D): this consumer's output staging buffer
    q_ready,
    q_empty,
    k_ready,
    v_ready,
    k_empty,
    v_empty,
    my_turn,
    other_turn,  # ping-pong tokens: this consumer waits on my_turn and hands over on other_turn
    qk_scale,  # softmax_scale * log2(e)
    batch_heads,
    heads,
    group,
    section_heads,
    q_len,
    kv_len,
    CONSUMER: gl.constexpr,  # 0 or 1: which 64 rows of the tile this warpgroup owns
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
):
    ROWS: gl.constexpr = BLOCK_M // 2
    dtype: gl.constexpr = q_smem.dtype
    # wgmma accumulators: one warpgroup, m64 split into four warps of 16 rows, n the whole block.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    # P as the register A operand of the PV product (k_width 2: two 16-bit elements per register).
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

    # The ping-pong token starts with consumer 0: its first wait passes on the fresh mbarrier
    # (parity 1), consumer 1's first wait needs consumer 0's first hand-over (parity 0).
    TURN_PARITY: gl.constexpr = 1 if CONSUMER == 0 else 0
    q_rows = q_smem.reshape([BLOCK_M, HEAD_DIM]).slice(CONSUMER * ROWS, ROWS)  # (ROWS, D)
    o_tile = o_smem.reshape([ROWS, HEAD_DIM])
    diag_offset = kv_len - q_len
    num_m_blocks = gl.cdiv(q_len, BLOCK_M)
    consumed = 0  # key blocks consumed so far, in the producer's numbering
    turns = 0
    for tile in range(gl.program_id(0), num_m_blocks * batch_heads, gl.num_programs(0)):
        batch, head, _, batch_head, start_m = _tile_coordinates(
            tile, num_m_blocks, batch_heads, heads, group, section_heads, BLOCK_M
        )
        tiles_done = (tile - gl.program_id(0)) // gl.num_programs(0)  # by this program
        first_row = start_m + CONSUMER * ROWS
        rows = first_row + gl.arange(0, ROWS, layout=row_layout)
        num_blocks = _key_blocks(start_m, q_len, kv_len, BLOCK_M, BLOCK_N)
        # Blocks [0, unmasked) hold only keys every query of this warpgroup sees.
        unmasked = (first_row + diag_offset + 1) // BLOCK_N
        zero_scores = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
        mbarrier.wait(q_ready, tiles_done & 1)

        # Block 0: its QK^T alone (no PV product is pending yet).
        slot = consumed % STAGES
        mbarrier.wait(k_ready.index(slot), (consumed // STAGES) & 1)
        mbarrier.wait(my_turn, (turns & 1) ^ TURN_PARITY)
        k_block = k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM])
        s_token = warpgroup_mma(q_rows, k_block.permute((1, 0)), zero_scores, use_acc=False, is_async=True)
        mbarrier.arrive(other_turn, count=1)
        turns += 1
        scores = warpgroup_mma_wait(0, deps=(s_token,))
        mbarrier.arrive(k_empty.index(slot), count=1)
        row_max = gl.full([ROWS], float("-inf"), gl.float32, row_layout)
        row_sum = gl.zeros([ROWS], gl.float32, row_layout)
        p, _, row_max, row_sum = _softmax_step(
            scores, row_max, row_sum, qk_scale, rows, 0, diag_offset, unmasked <= 0
        )
        p = gl.convert_layout(p.to(dtype), p_layout)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
        previous = slot

        for block in range(1, num_blocks):
            consumed += 1
            slot = consumed % STAGES
            mbarrier.wait(k_ready.index(slot), (consumed // STAGES) & 1)
            mbarrier.wait(v_ready.index(previous), ((consumed - 1) // STAGES) & 1)
            mbarrier.wait(my_turn, (turns & 1) ^ TURN_PARITY)
            k_block = k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM])
            v_block = v_smem.index(previous).reshape([BLOCK_N, HEAD_DIM])
            s_token = warpgroup_mma(
                q_rows, k_block.permute((1, 0)), zero_scores, use_acc=False, is_async=True
            )
            o_token = warpgroup_mma(p, v_block, acc, is_async=True)
            mbarrier.arrive(other_turn, count=1)
            turns += 1
            # Products complete in issue order: one outstanding is the PV product, so S is ready.
            scores = warpgroup_mma_wait(1, deps=(s_token,))
            mbarrier.arrive(k_empty.index(slot), count=1)  # K is free long before V: its own release
            p_next, rescale, row_max, row_sum = _softmax_step(
                scores, row_max, row_sum, qk_scale, rows, block * BLOCK_N, diag_offset, block >= unmasked
            )
            acc, p = warpgroup_mma_wait(0, deps=(o_token, p))
            mbarrier.arrive(v_empty.index(previous), count=1)
            acc = acc * gl.convert_layout(rescale, o_row_layout)[:, None]
            p = gl.convert_layout(p_next.to(dtype), p_layout)
            previous = slot

        # The tile's last QK^T is done: the producer may load the next tile's queries.
        mbarrier.arrive(q_empty, count=1)
        mbarrier.wait(v_ready.index(previous), (consumed // STAGES) & 1)
        v_block = v_smem.index(previous).reshape([BLOCK_N, HEAD_DIM])
        o_token = warpgroup_mma(p, v_block, acc, is_async=True)
        acc, p = warpgroup_mma_wait(0, deps=(o_token, p))
        mbarrier.arrive(v_empty.index(previous), count=1)
        consumed += 1

        out = acc / gl.convert_layout(row_sum, o_row_layout)[:, None]
        tma.store_wait(0)  # the previous tile's output has left the staging buffer
        o_tile.store(out.to(dtype))
        fence_async_shared()
        tma_store(Out, [batch, head, first_row, 0], o_smem)  # clipped to Tq
        lse = (row_max + gl.log2(row_sum)) * LN2  # base 2 -> natural log
        gl.store(Lse + batch_head.to(gl.int64) * q_len + rows, lse, mask=rows < q_len)
    tma.store_wait(0)


@gluon.jit
def _gluon_attention_forward_kernel(
    Q,
    K,
    V,  # descriptors of q (B, H, Tq, D), k, v (B, Hkv, Tk, D): blocks (1, 1, BLOCK_M or BLOCK_N, D)
    Out,  # descriptor of out (B, H, Tq, D) in q's dtype, block (1, 1, BLOCK_M // 2, D)
    Lse,  # output (B, H, Tq) float32, contiguous: natural-log logsumexp of each score row
    qk_scale,  # softmax_scale * log2(e)
    batch_heads,  # B * H
    heads,  # H
    group,  # H // Hkv: query heads per kv head
    section_heads,  # (batch, head) slices per section of the tile order
    q_len,
    kv_len,  # Tq <= Tk
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
):
    dtype: gl.constexpr = Q.dtype
    q_smem = gl.allocate_shared_memory(dtype, Q.block_type.shape, Q.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + K.block_type.shape, K.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + V.block_type.shape, V.layout)
    o_smem0 = gl.allocate_shared_memory(dtype, Out.block_type.shape, Out.layout)
    o_smem1 = gl.allocate_shared_memory(dtype, Out.block_type.shape, Out.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn0 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    turn1 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    # Arrivals that complete each phase: the TMA transaction count (one expect) for "ready", one
    # per consumer for "empty" (K and V each), one hand-over for a turn.
    mbarrier.init(q_ready, count=1)
    mbarrier.init(q_empty, count=2)
    for slot in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(slot), count=1)
        mbarrier.init(v_ready.index(slot), count=1)
        mbarrier.init(k_empty.index(slot), count=2)
        mbarrier.init(v_empty.index(slot), count=2)
    mbarrier.init(turn0, count=1)
    mbarrier.init(turn1, count=1)

    gl.warp_specialize(
        [
            (
                _consumer_partition,
                (
                    Out,
                    Lse,
                    q_smem,
                    k_smem,
                    v_smem,
                    o_smem0,
                    q_ready,
                    q_empty,
                    k_ready,
                    v_ready,
                    k_empty,
                    v_empty,
                    turn0,
                    turn1,
                    qk_scale,
                    batch_heads,
                    heads,
                    group,
                    section_heads,
                    q_len,
                    kv_len,
                    0,
                    HEAD_DIM,
                    BLOCK_M,
                    BLOCK_N,
                    STAGES,
                ),
            ),
            (
                _consumer_partition,
                (
                    Out,
                    Lse,
                    q_smem,
                    k_smem,
                    v_smem,
                    o_smem1,
                    q_ready,
                    q_empty,
                    k_ready,
                    v_ready,
                    k_empty,
                    v_empty,
                    turn1,
                    turn0,
                    qk_scale,
                    batch_heads,
                    heads,
                    group,
                    section_heads,
                    q_len,
                    kv_len,
                    1,
                    HEAD_DIM,
                    BLOCK_M,
                    BLOCK_N,
                    STAGES,
                ),
            ),
            (
                _producer_partition,
                (
                    Q,
                    K,
                    V,
                    q_smem,
                    k_smem,
                    v_smem,
                    q_ready,
                    q_empty,
                    k_ready,
                    v_ready,
                    k_empty,
                    v_empty,
                    batch_heads,
                    heads,
                    group,
                    section_heads,
                    q_len,
                    kv_len,
                    BLOCK_M,
                    BLOCK_N,
                    STAGES,
                ),
            ),
        ],
        [CONSUMER_WARPS, PRODUCER_WARPS],
        [CONSUMER_REGISTERS, PRODUCER_REGISTERS],
    )


# ----------------------------------------------------------------------------------------------
# Launchers

GLUON_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


def supports(q, k, v):
    """Whether this kernel serves attention_forward(q, k, v): a compute capability 9.0 GPU, float16 or
    bfloat16, head_dim 64 or 128, no empty dimension, and q, k, v that TMA can describe (a 16-byte
    aligned base, a unit feature stride, 16-byte multiples for the other strides)."""
    return (
        q.is_cuda
        and _capability(q.device.index) == CAPABILITY
        and q.dtype in SUPPORTED_DTYPES
        and q.shape[-1] in HEAD_DIMS
        and q.numel() > 0
        and k.numel() > 0
        and all(tma_strides(tensor) is not None for tensor in (q, k, v))
    )


def _descriptor(tensor, rows):
    """A TMA descriptor of `tensor` (B, heads, T, D) with its real strides, block (1, 1, rows, D), in
    the swizzled shared-memory layout wgmma reads."""
    block = [1, 1, rows, tensor.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(block, GLUON_DTYPES[tensor.dtype])
    return TensorDescriptor(tensor, list(tensor.shape), tma_strides(tensor), block, layout)


def attention_forward(q, k, v, softmax_scale):
    """q (B, H, Tq, D); k, v (B, Hkv, Tk, D) -> out (B, H, Tq, D) in q's dtype, lse (B, H, Tq) float32
    (natural log), as triton_attention.attention_forward. Arguments are assumed validated
    (dispatch.validate_attention) and supported (supports)."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    out = new_output((batch, heads, q_len, head_dim), q.dtype, q.device)  # (B, H, Tq, D)
    lse = new_output((batch, heads, q_len), torch.float32, q.device)  # (B, H, Tq)
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_head_span(name, tensor)
    group = heads // kv_heads
    tiles = _cdiv(q_len, BLOCK_M) * batch * heads
    grid = (min(tiles, _multiprocessors(q.device.index)),)  # persistent: one program per SM
    _gluon_attention_forward_kernel[grid](
        _descriptor(q, BLOCK_M),
        _descriptor(k, BLOCK_N),
        _descriptor(v, BLOCK_N),
        _descriptor(out, CONSUMER_ROWS),
        lse,
        softmax_scale * LOG2E,
        batch * heads,
        heads,
        group,
        section_heads(k, group, batch * heads),
        q_len,
        kv_len,
        HEAD_DIM=head_dim,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        STAGES=STAGES[head_dim],
        num_warps=NUM_WARPS,
        maxnreg=MAX_REGISTERS,
    )
    return out, lse


# ----------------------------------------------------------------------------------------------
# GPU compile check (fastgpt.ops.triton_compile)


def gpu_compile_cases(capability):
    """The kernel as a launch on sm_90 compiles it, in bf16 and fp16 at head_dim 64 and 128 (nothing
    on other capabilities: it is never launched there). Descriptor arguments are typed as a launch
    types them, with their block shapes and shared-memory layouts."""
    if capability != CAPABILITY:
        return []
    cases = []
    for dtype in SUPPORTED_DTYPES:
        for head_dim in HEAD_DIMS:
            blocks = {"Q": BLOCK_M, "K": BLOCK_N, "V": BLOCK_N, "Out": CONSUMER_ROWS}
            signature = {}
            for name in _gluon_attention_forward_kernel.arg_names:
                if name in blocks:
                    block = [1, 1, blocks[name], head_dim]
                    layout = gl.NVMMASharedLayout.get_default_for(block, GLUON_DTYPES[dtype])
                    block_text = ",".join(str(size) for size in block)
                    signature[name] = f"tensordesc<{TRITON_TYPES[dtype]}[{block_text}],{layout!r}>"
                else:
                    signature[name] = {"Lse": "*fp32", "qk_scale": "fp32"}.get(name, "i32")
            constexprs = {
                "HEAD_DIM": head_dim,
                "BLOCK_M": BLOCK_M,
                "BLOCK_N": BLOCK_N,
                "STAGES": STAGES[head_dim],
            }
            signature.update(dict.fromkeys(constexprs, "constexpr"))
            cases.append(
                CompileCase(
                    name=f"gluon_attention_forward {TRITON_TYPES[dtype]} D={head_dim} "
                    f"{BLOCK_M}x{BLOCK_N} s{STAGES[head_dim]}",
                    kernel=_gluon_attention_forward_kernel,
                    signature=signature,
                    constexprs=constexprs,
                    num_warps=NUM_WARPS,
                    num_stages=STAGES[head_dim],
                    tensor_cores=True,
                    unaligned=frozenset({"group"}),  # often 1 or a small power of two
                    tma=True,
                    max_registers=MAX_REGISTERS,
                )
            )
    return cases
