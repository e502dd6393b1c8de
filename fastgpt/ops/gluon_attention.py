"""Causal attention forward and backward in Gluon for Hopper (sm_90a): warp-specialized, after
FlashAttention-3.

Opt-in alternatives to kernels of triton_attention.py, taken by the triton backend when
FASTGPT_TRITON_ATTENTION=gluon (read on every call) on a compute capability 9.0 GPU, for float16 or
bfloat16 q, k, v that TMA can describe: the forward at head_dim 64 or 128 (supports), and the fused
backward's main kernel at head_dim 64 or 128 with a describable dout too (supports_backward; not when
torch.are_deterministic_algorithms_enabled(), which keeps the order-fixed Triton kernels). Every other
call keeps triton_attention.py's kernels. The forward's outputs follow the same contract: out
(B, H, Tq, D) in q's dtype and lse (B, H, Tq) float32 in natural log, so either backward consumes
them unchanged.
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

The backward takes the place of triton_attention.py's fused kernel between its preprocess (delta =
rowsum(dO * O), and zeroing the float32 dQ accumulator) and its cast (dq = softmax_scale * accumulator
in q's dtype), with the same results: dK (times softmax_scale) and dV stored in k's dtype, the unscaled
dQ added into the accumulator. One program per block of BACKWARD_BLOCK_N = 128 keys of a (batch, kv
head), key block major (the first key blocks, seen by the most queries, first); again three partitions:
- the producer warp loads the program's K and V once by TMA, as two halves of 64 keys (one per
  consumer; one "kv_ready" mbarrier whose transaction count covers all four copies), then streams, for
  every query head of the kv head's GQA group in turn, the 64-query blocks that see any of the keys:
  Q and dO of a block by TMA into a ring of STAGES slots, each with a "ready" mbarrier (its two
  copies' bytes) and an "empty" one (both consumers arrive when their products no longer read it).
- each consumer warpgroup owns 64 of the 128 keys and per query block computes, with wgmma from
  shared memory, S = Q K^T and dP = dO V^T (64 queries x 64 keys, queries along rows, so a row's lse and
  delta are two registers per thread); P = exp2(S * scale * log2(e) - lse * log2(e)) (the causal mask,
  bottom-right aligned, as -inf scores only on blocks crossing the diagonal), dS = P * (dP - delta);
  P and dS go to shared memory in 16-bit, where dV += P^T dO and dK += dS^T Q read them transposed as
  the A operand, and dQ = dS K reads dS as it is. At head_dim 64 a warpgroup's share of dQ is its
  own keys' (64 x 64, its dS times its K half); at 128 that share (64 x 128 fp32, 64 registers) does
  not fit beside dK and dV, so each warpgroup takes half of dQ's columns over all 128 keys (both dS
  tiles times both K halves, sliced to its 64 columns): two mbarriers pass the dS tiles between the
  warpgroups, "ds_full" (both have stored this step's dS) and "ds_free" (both dQ products of the step
  have read them, so the next dS may overwrite them). The share is staged in a float32 buffer and
  added to the accumulator with vectorised atomics, a column chunk of DQ_CHUNK at a time; both
  warpgroups add their shares (a TMA reduce-add would spare the registers, but 3.6's Gluon, the GPU
  machines', has none). After the last block (and, at 128, the other warpgroup's last dQ product,
  which reads this one's K half), K's and V's halves, no longer read, stage dK and dV; both
  warpgroups arrive on "dkv_ready", and the producer, which holds the descriptors, stores them by TMA
  (clipping keys past Tk).
FlashAttention-3's backward keeps S^T (keys along rows) so that P^T is a register A operand; here that
layout cost one register per query column for lse and delta (16 each) and spilled, so P and dS take
the shared-memory route. The row statistics are read by the consumers themselves (gl.load, issued
before waiting on the products), not by the producer into the ring: the producer has 24 registers,
and a (B, H, Tq) float32 row is not generally TMA-describable (its stride Tq * 4 is a multiple of 16
only when Tq is a multiple of 4). Rows past Tq read as zeros and zero-filled Q and dO make their
contributions exactly 0; keys past Tk are masked on every block they take part in. The Q/dO ring is a
plain ring: the producer and both consumers walk the same sequence of group * cdiv(Tq - query_start,
64) blocks, the producer waits for a slot's previous use to end (parity of its use number, a fresh
mbarrier passing parity 1), the consumers for its loads. At head_dim 128, "ds_full" and "ds_free"
complete once per block: at block t a consumer waits on ds_free's phase t - 1 before storing dS and on
ds_full's phase t before its dQ product; neither can run two phases ahead of a waiter, since each
consumer's arrival on one follows its wait on the other.

Nothing here runs in the Triton interpreter: its correctness is checked by the GPU tests of
tests/test_triton_attention.py, and its code by the sm_90 compile checks of
tests/test_triton_compile.py, which compile both kernels for sm_90a with Triton 3.9 here; they
compile with Triton 3.6, the GPU machines' version, as well. The Gluon API they use is the same in
both but for the names of the TMA copies (tma_load and tma_store below pick whichever this Triton has).
"""

import itertools

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
    key_block_coordinates,
    section_heads,
    tile_coordinates,
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

# Backward (the same three partitions, registers and warps as the forward).
# Head dims the backward serves, both without spills under Triton 3.6 and 3.9. At D=128 the dK and dV
# accumulators (64 x 128 fp32 each) and S and dP (64 x 64 each) take 192 of a consumer's 240 registers,
# which is why dQ is split by columns there (BACKWARD_DQ_COLUMNS) and the dK/dV stores are the
# producer's.
BACKWARD_HEAD_DIMS = (64, 128)
# Keys per program: two consumer warpgroups of BACKWARD_BLOCK_N // 2 = 64 keys each (the wgmma M of one
# warpgroup), issue 20's 64 x 128 dK/dV tile.
BACKWARD_BLOCK_N = 128
# Queries per step: S and dP (64 x 64 fp32) are 32 registers each per consumer thread beside the dK
# and dV accumulators (64 x D fp32: 32 registers each at D=64, 64 at D=128) and the step's dQ share
# (64 x BACKWARD_DQ_COLUMNS fp32: 32 registers); the products are m64n64 (S, dP, and dQ at D=128) and
# m64nD (dV, dK, and dQ at D=64).
BACKWARD_BLOCK_M = 64
# Columns of dQ each consumer computes per step. At D=64, all of them over its own 64 keys (dS K with
# its own dS and K). At D=128 a 64 x 128 share would not fit beside dK and dV, so consumer c computes
# columns [64c, 64c + 64) over all 128 keys, reading both consumers' dS tiles and K halves (mbarriers
# ds_full and ds_free pass them between the two): 32 registers at either size.
BACKWARD_DQ_COLUMNS = {64: 64, 128: 64}
# Q/dO ring depth. Shared memory holds K and V (128 x D each), the ring of Q and dO blocks (64 x D
# each), the consumers' P and dS tiles (64 x 64 each, 16-bit) and their float32 dQ staging buffers
# (64 x BACKWARD_DQ_COLUMNS each): at D=64, 32 + STAGES * 16 + 32 + 32 KiB, so 3 stages (144 KiB);
# at D=128, 64 + STAGES * 32 + 32 + 32 KiB, so 3 stages (224 KiB, under the 227 KiB limit) as well:
# the producer runs two query blocks ahead.
BACKWARD_STAGES = {64: 3, 128: 3}
# Columns of dQ per atomic chunk: a warpgroup adds 64 x 8 floats, one 16-byte vector per thread, so the
# atomics need one address per thread (wider chunks cost registers the accumulators need).
DQ_CHUNK = gl.constexpr(8)


# ----------------------------------------------------------------------------------------------
# Kernels


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
        batch, head, kv_head, _, start_m = tile_coordinates(
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
        batch, head, _, batch_head, start_m = tile_coordinates(
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
    # The initialised barriers visible to the async proxy (TMA's completions) before any copy is issued,
    # as the CUDA programming guide's TMA example does after mbarrier init.
    fence_async_shared()

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


@gluon.jit
def _opaque_zero(step):
    """0, as an int32 the compiler cannot see through: an and with 0 in inline PTX marked impure, so it
    is neither folded nor hoisted out of the loop that computes it. Shared-memory buffers indexed with
    it get their wgmma descriptors formed where the products use them: with constant indices, the
    descriptors of the backward's loop-invariant operands (K, V, the P and dS tiles) are hoisted out of
    the consumers' loop and held in registers across it: Triton 3.6 does so with dozens of 64-bit
    values, and at D=128 spilled 808 bytes (3.9 forms them in the loop either way). Formed in the loop
    they cost a few integer adds per product."""
    return gl.inline_asm_elementwise(
        "and.b32 $0, $1, 0;", "=r,r", [step], dtype=gl.int32, is_pure=False, pack=1
    )


@gluon.jit
def _backward_producer_partition(
    Q,
    K,
    V,
    dOut,  # descriptors: blocks (1, 1, BLOCK_M, D), (1, 1, BLOCK_N // 2, D) x 2, (1, 1, BLOCK_M, D)
    dK,
    dV,  # descriptors of dk, dv (B, Hkv, Tk, D) in k's dtype, block (1, 1, BLOCK_N // 2, D)
    k_smem,
    v_smem,  # (2, 1, 1, BLOCK_N // 2, D): the program's keys and values, one half per consumer
    q_smem,
    do_smem,  # (STAGES, 1, 1, BLOCK_M, D): the ring of query and output-gradient blocks
    kv_ready,  # mbarrier: K and V have landed
    slot_ready,
    slot_empty,  # (STAGES, 1) each: a slot's Q and dO have landed / both consumers are done with them
    dkv_ready,  # both consumers have staged dK and dV (in the K and V buffers)
    batch_kv_heads,
    heads,
    group,
    q_len,
    kv_len,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
):
    KEYS: gl.constexpr = BLOCK_N // 2
    batch, kv_head, _, start_n, query_start = key_block_coordinates(
        batch_kv_heads, heads, group, kv_len, q_len, BLOCK_M, BLOCK_N
    )
    # Keys past Tk are zero-filled and still count their bytes, so the expected count is fixed.
    mbarrier.expect(kv_ready, 2 * K.block_type.nbytes + 2 * V.block_type.nbytes)
    for half in gl.static_range(2):
        tma_load(K, [batch, kv_head, start_n + half * KEYS, 0], kv_ready, k_smem.index(half))
        tma_load(V, [batch, kv_head, start_n + half * KEYS, 0], kv_ready, v_smem.index(half))
    step = 0  # query blocks loaded so far: slot step % STAGES, its use number step // STAGES
    for member in range(group):
        head = kv_head * group + member
        for start_m in range(query_start, q_len, BLOCK_M):
            slot = step % STAGES
            # The parity of the slot's previous use ending (a fresh mbarrier passes parity 1).
            mbarrier.wait(slot_empty.index(slot), ((step // STAGES) & 1) ^ 1)
            mbarrier.expect(slot_ready.index(slot), Q.block_type.nbytes + dOut.block_type.nbytes)
            tma_load(Q, [batch, head, start_m, 0], slot_ready.index(slot), q_smem.index(slot))
            tma_load(dOut, [batch, head, start_m, 0], slot_ready.index(slot), do_smem.index(slot))
            step += 1
    # Both consumers have staged dK and dV in the K and V buffers: store them (TMA clips keys past Tk).
    mbarrier.wait(dkv_ready, 0)
    for half in gl.static_range(2):
        tma_store(dK, [batch, kv_head, start_n + half * KEYS, 0], k_smem.index(half))
        tma_store(dV, [batch, kv_head, start_n + half * KEYS, 0], v_smem.index(half))
    tma.store_wait(0)


@gluon.jit
def _backward_consumer_partition(
    dQacc,  # (B, H, Tq, D) float32, contiguous, zeroed: the unscaled dQ, summed by atomics
    Lse,
    Delta,  # (B, H, Tq) float32, contiguous: forward logsumexp (natural log), rowsum(dO * O)
    k_smem,
    v_smem,
    q_smem,
    do_smem,
    p_smem,
    ds_smem,  # (2, BLOCK_M, BLOCK_N // 2) each: both consumers' P and dS (A operands of dV, dK, dQ)
    dq_smem,  # (BLOCK_M, DQ_COLUMNS) float32: this consumer's share of a step's dQ, on its way to the atomics
    kv_ready,
    slot_ready,
    slot_empty,
    ds_full,  # both consumers have stored the step's dS (used where DQ_COLUMNS < HEAD_DIM)
    ds_free,  # both consumers' dQ products have read the step's dS and K (likewise)
    dkv_ready,  # both consumers have staged their dK and dV in their K and V buffers
    softmax_scale,
    qk_scale,  # softmax_scale * log2(e)
    batch_kv_heads,
    heads,
    group,
    q_len,
    kv_len,
    CONSUMER: gl.constexpr,  # 0 or 1: which 64 keys of the program's block this warpgroup owns
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
    DQ_COLUMNS: gl.constexpr,
):
    KEYS: gl.constexpr = BLOCK_N // 2
    # DQ_COLUMNS == HEAD_DIM: this warpgroup's dQ share is dS K over its own keys. Less: over all
    # BLOCK_N keys (both warpgroups' dS and K), for columns [CONSUMER * DQ_COLUMNS, +DQ_COLUMNS).
    SPLIT_DQ: gl.constexpr = DQ_COLUMNS < HEAD_DIM
    dtype: gl.constexpr = k_smem.dtype
    # wgmma accumulators of one warpgroup (four warps of 16 rows): S and dP (queries x keys: a query's
    # lse and delta are then two registers per thread, not one per column), dK, dV (keys x D) and dQ
    # (queries x D).
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N // 2, 16]
    )
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    dq_acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DQ_COLUMNS, 16]
    )
    query_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    key_layout: gl.constexpr = gl.SliceLayout(0, s_layout)

    batch, kv_head, _, start_n, query_start = key_block_coordinates(
        batch_kv_heads, heads, group, kv_len, q_len, BLOCK_M, BLOCK_N
    )
    first_key = start_n + CONSUMER * KEYS
    diag_offset = kv_len - q_len
    # Query blocks from full_start on see all of this warpgroup's keys: only those before are masked.
    full_start = gl.cdiv(gl.maximum(first_key + KEYS - 1 - diag_offset, 0), BLOCK_M) * BLOCK_M
    key_offset = diag_offset - first_key  # key first_key + j is visible to query i if j <= i + key_offset
    zero_scores = gl.zeros([BLOCK_M, KEYS], gl.float32, s_layout)
    zero_dq = gl.zeros([BLOCK_M, DQ_COLUMNS], gl.float32, dq_acc_layout)
    dk = gl.zeros([KEYS, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([KEYS, HEAD_DIM], gl.float32, acc_layout)
    # A column chunk of dQ (BLOCK_M, DQ_CHUNK) as the atomics add it: each thread 4 consecutive floats
    # of a row (one 16-byte vector atomic), a warp 16 rows; offsets within a query block in int32.
    chunk_layout: gl.constexpr = gl.BlockedLayout(
        [1, 4], [32 // (DQ_CHUNK // 4), DQ_CHUNK // 4], [4, 1], [1, 0]
    )
    chunk_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, chunk_layout))
    chunk_cols = gl.arange(0, DQ_CHUNK, layout=gl.SliceLayout(0, chunk_layout))
    chunk_offsets = chunk_rows[:, None] * HEAD_DIM + chunk_cols[None, :]  # (BLOCK_M, DQ_CHUNK)

    first_head = batch * heads + kv_head * group  # of the GQA group, as a (batch, head) index
    mbarrier.wait(kv_ready, 0)
    blocks_per_head = gl.cdiv(q_len - query_start, BLOCK_M)
    for step in range(group * blocks_per_head):
        member = step // blocks_per_head
        start_m = query_start + (step - member * blocks_per_head) * BLOCK_M
        row_stats = (first_head + member).to(gl.int64) * q_len  # row 0 of its head in lse, delta, dQ
        slot = step % STAGES
        # Buffer indices the compiler cannot fold: this warpgroup's half (own) and the first (zero).
        zero = _opaque_zero(step)
        own = zero + CONSUMER
        k_rows = k_smem.index(own).reshape([KEYS, HEAD_DIM])  # (KEYS, D): this warpgroup's keys
        v_rows = v_smem.index(own).reshape([KEYS, HEAD_DIM])
        mbarrier.wait(slot_ready.index(slot), (step // STAGES) & 1)
        dq_block = dQacc + (row_stats + start_m) * HEAD_DIM  # this block's row 0 of dQ
        q_block = q_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
        do_block = do_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
        s_token = warpgroup_mma(q_block, k_rows.permute((1, 0)), zero_scores, use_acc=False, is_async=True)
        dp_token = warpgroup_mma(do_block, v_rows.permute((1, 0)), zero_scores, use_acc=False, is_async=True)
        # The row statistics load while the products run. Rows past Tq read 0: their Q and dO are
        # zero-filled, so they add exactly 0 to dK and dV, and their dQ is not stored.
        queries = start_m + gl.arange(0, BLOCK_M, layout=query_layout)
        query_ok = queries < q_len
        lse = gl.load(Lse + row_stats + queries, mask=query_ok, other=0.0) * LOG2E
        delta = gl.load(Delta + row_stats + queries, mask=query_ok, other=0.0)
        scores = warpgroup_mma_wait(1, deps=(s_token,))  # (BLOCK_M, KEYS)
        if start_m < full_start:  # the block crosses the diagonal
            # Key first_key + j is visible to query i when j <= i + Tk - Tq - first_key.
            key_index = gl.arange(0, KEYS, layout=key_layout)
            visible = key_index[None, :] <= (queries + key_offset)[:, None]
            scores = gl.where(visible, scores, float("-inf"))
        p = gl.exp2(scores * qk_scale - lse[:, None])
        dp = warpgroup_mma_wait(0, deps=(dp_token,))  # (BLOCK_M, KEYS)
        ds = p * (dp - delta[:, None])
        p_tile = p_smem.index(own)
        ds_tile = ds_smem.index(own)
        p_tile.store(p.to(dtype))
        if SPLIT_DQ:
            # The other warpgroup's dQ product of the previous step reads this dS buffer: wait until
            # it has (a fresh mbarrier passes parity 1).
            mbarrier.wait(ds_free, (step & 1) ^ 1)
        ds_tile.store(ds.to(dtype))
        fence_async_shared()
        if SPLIT_DQ:
            mbarrier.arrive(ds_full, count=1)
        dv_token = warpgroup_mma(p_tile.permute((1, 0)), do_block, dv, is_async=True)
        dk_token = warpgroup_mma(ds_tile.permute((1, 0)), q_block, dk, is_async=True)
        dv, dk = warpgroup_mma_wait(0, deps=(dv_token, dk_token))
        mbarrier.arrive(slot_empty.index(slot), count=1)  # Q and dO are read: the slot is free
        if SPLIT_DQ:
            # Columns [CONSUMER * DQ_COLUMNS, +DQ_COLUMNS) of dS K over all BLOCK_N keys: both
            # warpgroups' dS (64 keys each) times the matching rows of K, sliced to those columns.
            first_half = k_smem.index(zero).reshape([KEYS, HEAD_DIM])
            second_half = k_smem.index(zero + 1).reshape([KEYS, HEAD_DIM])
            columns: gl.constexpr = CONSUMER * DQ_COLUMNS
            mbarrier.wait(ds_full, step & 1)
            dq_token = warpgroup_mma(
                ds_smem.index(zero),
                first_half.slice(columns, DQ_COLUMNS, dim=1),
                zero_dq,
                use_acc=False,
                is_async=True,
            )
            dq_token = warpgroup_mma(
                ds_smem.index(zero + 1),
                second_half.slice(columns, DQ_COLUMNS, dim=1),
                dq_token,
                is_async=True,
            )
            dq = warpgroup_mma_wait(0, deps=(dq_token,))  # (BLOCK_M, DQ_COLUMNS), unscaled
            mbarrier.arrive(ds_free, count=1)
        else:
            # This warpgroup's keys' share of dQ, dS K.
            dq_token = warpgroup_mma(ds_tile, k_rows, zero_dq, use_acc=False, is_async=True)
            dq = warpgroup_mma_wait(0, deps=(dq_token,))  # (BLOCK_M, D), unscaled
        # Added to the accumulator through shared memory, a column chunk at a time: atomics from
        # the wgmma layout would hold an address per element beside dK and dV.
        dq_smem.store(dq)
        for chunk in gl.static_range(DQ_COLUMNS // DQ_CHUNK):
            dq_part = dq_smem.slice(chunk * DQ_CHUNK, DQ_CHUNK, dim=1).load(chunk_layout)
            gl.atomic_add(
                dq_block + (CONSUMER * DQ_COLUMNS if SPLIT_DQ else 0) + chunk * DQ_CHUNK + chunk_offsets,
                dq_part,
                mask=(start_m + chunk_rows < q_len)[:, None],
                sem="relaxed",
            )

    if SPLIT_DQ:
        # The other warpgroup's last dQ product reads this warpgroup's K too: wait for it to end.
        mbarrier.wait(ds_free, (group * blocks_per_head - 1) & 1)
    # K and V of this warpgroup's keys are read for the last time: their buffers stage dK and dV for
    # the producer's TMA stores (which hold the descriptors, so these registers stay free in the loop).
    own_keys = k_smem.index(CONSUMER).reshape([KEYS, HEAD_DIM])
    own_values = v_smem.index(CONSUMER).reshape([KEYS, HEAD_DIM])
    own_keys.store((dk * softmax_scale).to(dtype))  # d(scores)/dk = softmax_scale * q
    own_values.store(dv.to(dtype))
    fence_async_shared()
    mbarrier.arrive(dkv_ready, count=1)


@gluon.jit
def _gluon_attention_backward_kernel(
    Q,
    K,
    V,
    dOut,  # descriptors of q (B, H, Tq, D), k, v (B, Hkv, Tk, D), dout (B, H, Tq, D): blocks
    # (1, 1, BLOCK_M, D) for q and dout, (1, 1, BLOCK_N // 2, D) for k, v, dk and dv
    dK,
    dV,  # descriptors of the outputs dk, dv (B, Hkv, Tk, D) in k's dtype
    dQacc,  # (B, H, Tq, D) float32, contiguous, zeroed: the unscaled dQ, summed over key blocks by atomics
    Lse,
    Delta,  # (B, H, Tq) float32, contiguous: forward logsumexp (natural log), rowsum(dO * O)
    softmax_scale,
    qk_scale,  # softmax_scale * log2(e)
    batch_kv_heads,  # B * Hkv
    heads,  # H
    group,  # H // Hkv
    q_len,
    kv_len,  # Tq <= Tk
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
    DQ_COLUMNS: gl.constexpr,
):
    dtype: gl.constexpr = Q.dtype
    k_smem = gl.allocate_shared_memory(dtype, [2] + K.block_type.shape, K.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2] + V.block_type.shape, V.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES] + Q.block_type.shape, Q.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES] + dOut.block_type.shape, dOut.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N // 2], dtype)
    p_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, BLOCK_N // 2], ds_layout)  # one per consumer
    ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, BLOCK_N // 2], ds_layout)
    dq_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    dq_smem0 = gl.allocate_shared_memory(gl.float32, [BLOCK_M, DQ_COLUMNS], dq_layout)
    dq_smem1 = gl.allocate_shared_memory(gl.float32, [BLOCK_M, DQ_COLUMNS], dq_layout)
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    slot_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    slot_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_full = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    dkv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ds_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    # Arrivals that complete each phase: the TMA transaction count (one expect) for "ready", one per
    # consumer for "empty", "ds_full" and "ds_free".
    mbarrier.init(kv_ready, count=1)
    for slot in gl.static_range(STAGES):
        mbarrier.init(slot_ready.index(slot), count=1)
        mbarrier.init(slot_empty.index(slot), count=2)
    mbarrier.init(ds_full, count=2)
    mbarrier.init(ds_free, count=2)
    mbarrier.init(dkv_ready, count=2)
    fence_async_shared()  # the barriers visible to the async proxy first, as in the forward

    gl.warp_specialize(
        [
            (
                _backward_consumer_partition,
                (
                    dQacc,
                    Lse,
                    Delta,
                    k_smem,
                    v_smem,
                    q_smem,
                    do_smem,
                    p_smem,
                    ds_smem,
                    dq_smem0,
                    kv_ready,
                    slot_ready,
                    slot_empty,
                    ds_full,
                    ds_free,
                    dkv_ready,
                    softmax_scale,
                    qk_scale,
                    batch_kv_heads,
                    heads,
                    group,
                    q_len,
                    kv_len,
                    0,
                    HEAD_DIM,
                    BLOCK_M,
                    BLOCK_N,
                    STAGES,
                    DQ_COLUMNS,
                ),
            ),
            (
                _backward_consumer_partition,
                (
                    dQacc,
                    Lse,
                    Delta,
                    k_smem,
                    v_smem,
                    q_smem,
                    do_smem,
                    p_smem,
                    ds_smem,
                    dq_smem1,
                    kv_ready,
                    slot_ready,
                    slot_empty,
                    ds_full,
                    ds_free,
                    dkv_ready,
                    softmax_scale,
                    qk_scale,
                    batch_kv_heads,
                    heads,
                    group,
                    q_len,
                    kv_len,
                    1,
                    HEAD_DIM,
                    BLOCK_M,
                    BLOCK_N,
                    STAGES,
                    DQ_COLUMNS,
                ),
            ),
            (
                _backward_producer_partition,
                (
                    Q,
                    K,
                    V,
                    dOut,
                    dK,
                    dV,
                    k_smem,
                    v_smem,
                    q_smem,
                    do_smem,
                    kv_ready,
                    slot_ready,
                    slot_empty,
                    dkv_ready,
                    batch_kv_heads,
                    heads,
                    group,
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


def _qk_scale(softmax_scale):
    """The kernels' qk_scale, softmax_scale * log2(e), as a Python float. (LOG2E is a tl.constexpr, and
    so is its product with a float: passed as it is, the launch would compile the value into the kernel,
    one compilation per softmax_scale, instead of taking the fp32 argument the compile checks build.)"""
    return softmax_scale * LOG2E.value


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
        _qk_scale(softmax_scale),
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


def supports_backward(q, k, v, dout):
    """Whether the Gluon backward serves attention_backward(dout, q, k, v, ...): where the forward is
    served (supports), at a head_dim in BACKWARD_HEAD_DIMS, with dout, too, describable by TMA."""
    return q.shape[-1] in BACKWARD_HEAD_DIMS and supports(q, k, v) and tma_strides(dout) is not None


def attention_backward(dout, q, k, v, lse, delta, dq_acc, dk, dv, softmax_scale):
    """dk, dv (B, Hkv, Tk, D), contiguous in k's dtype, written; the unscaled dQ added into dq_acc
    (B, H, Tq, D) float32, contiguous, zeroed (triton_attention.py's preprocess, which also forms
    delta (B, H, Tq) = rowsum(dout * out), and its cast kernel, which scales dq_acc into dq, run before
    and after). lse (B, H, Tq) float32 is attention_forward's. Arguments are assumed validated and
    supported (supports_backward)."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    keys = BACKWARD_BLOCK_N // 2  # per consumer: the blocks of K, V, dK and dV descriptors
    grid = (_cdiv(kv_len, BACKWARD_BLOCK_N) * batch * kv_heads,)
    _gluon_attention_backward_kernel[grid](
        _descriptor(q, BACKWARD_BLOCK_M),
        _descriptor(k, keys),
        _descriptor(v, keys),
        _descriptor(dout, BACKWARD_BLOCK_M),
        _descriptor(dk, keys),
        _descriptor(dv, keys),
        dq_acc,
        lse,
        delta,
        softmax_scale,
        _qk_scale(softmax_scale),
        batch * kv_heads,
        heads,
        heads // kv_heads,
        q_len,
        kv_len,
        HEAD_DIM=head_dim,
        BLOCK_M=BACKWARD_BLOCK_M,
        BLOCK_N=BACKWARD_BLOCK_N,
        STAGES=BACKWARD_STAGES[head_dim],
        DQ_COLUMNS=BACKWARD_DQ_COLUMNS[head_dim],
        num_warps=NUM_WARPS,
        maxnreg=MAX_REGISTERS,
    )


# ----------------------------------------------------------------------------------------------
# GPU compile check (fastgpt.ops.triton_compile)


def _compile_signature(kernel, dtype, head_dim, blocks, scalars):
    """A launch's argument types of `kernel`: descriptors named in `blocks` (name -> rows) typed with
    their block shapes and shared-memory layouts, the others from `scalars` (name -> type), "i32"
    where not named."""
    signature = {}
    for name in kernel.arg_names:
        if name in blocks:
            block = [1, 1, blocks[name], head_dim]
            layout = gl.NVMMASharedLayout.get_default_for(block, GLUON_DTYPES[dtype])
            block_text = ",".join(str(size) for size in block)
            signature[name] = f"tensordesc<{TRITON_TYPES[dtype]}[{block_text}],{layout!r}>"
        else:
            signature[name] = scalars.get(name, "i32")
    return signature


def _compile_case(name, kernel, signature, constexprs):
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    return CompileCase(
        name=name,
        kernel=kernel,
        signature=signature,
        constexprs=constexprs,
        num_warps=NUM_WARPS,
        num_stages=constexprs["STAGES"],
        tensor_cores=True,
        unaligned=frozenset({"group"}),  # often 1 or a small power of two
        tma=True,
        max_registers=MAX_REGISTERS,
    )


def gpu_compile_cases(capability):
    """The kernels as a launch on sm_90 compiles them, in bf16 and fp16: the forward at head_dim 64
    and 128, the backward at BACKWARD_HEAD_DIMS (nothing on other capabilities: they are never
    launched there). Descriptor arguments are typed as a launch types them, with their block shapes
    and shared-memory layouts."""
    if capability != CAPABILITY:
        return []
    cases = []
    for dtype in SUPPORTED_DTYPES:
        for head_dim in HEAD_DIMS:
            blocks = {"Q": BLOCK_M, "K": BLOCK_N, "V": BLOCK_N, "Out": CONSUMER_ROWS}
            signature = _compile_signature(
                _gluon_attention_forward_kernel, dtype, head_dim, blocks, {"Lse": "*fp32", "qk_scale": "fp32"}
            )
            constexprs = {
                "HEAD_DIM": head_dim,
                "BLOCK_M": BLOCK_M,
                "BLOCK_N": BLOCK_N,
                "STAGES": STAGES[head_dim],
            }
            name = (
                f"gluon_attention_forward {TRITON_TYPES[dtype]} D={head_dim} "
                f"{BLOCK_M}x{BLOCK_N} s{STAGES[head_dim]}"
            )
            cases.append(_compile_case(name, _gluon_attention_forward_kernel, signature, constexprs))
    keys = BACKWARD_BLOCK_N // 2
    for dtype, head_dim in itertools.product(SUPPORTED_DTYPES, BACKWARD_HEAD_DIMS):
        blocks = {
            "Q": BACKWARD_BLOCK_M,
            "dOut": BACKWARD_BLOCK_M,
            "K": keys,
            "V": keys,
            "dK": keys,
            "dV": keys,
        }
        scalars = {
            "dQacc": "*fp32",
            "Lse": "*fp32",
            "Delta": "*fp32",
            "softmax_scale": "fp32",
            "qk_scale": "fp32",
        }
        signature = _compile_signature(_gluon_attention_backward_kernel, dtype, head_dim, blocks, scalars)
        stages = BACKWARD_STAGES[head_dim]
        constexprs = {
            "HEAD_DIM": head_dim,
            "BLOCK_M": BACKWARD_BLOCK_M,
            "BLOCK_N": BACKWARD_BLOCK_N,
            "STAGES": stages,
            "DQ_COLUMNS": BACKWARD_DQ_COLUMNS[head_dim],
        }
        name = (
            f"gluon_attention_backward {TRITON_TYPES[dtype]} D={head_dim} "
            f"{BACKWARD_BLOCK_M}x{BACKWARD_BLOCK_N} s{stages}"
        )
        cases.append(_compile_case(name, _gluon_attention_backward_kernel, signature, constexprs))
    return cases
