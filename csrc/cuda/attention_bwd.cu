// Causal attention backward on tensor cores, FlashAttention-2's scheme in three kernels:
//   1. delta = rowsum(dO * O), float32;
//   2. dK and dV per block of 64 keys, looping over the query blocks that see it and, for GQA, over
//      every query head of the group: S^T = K Q^T, P^T = exp(S^T * scale - lse), dV += P^T dO,
//      dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q;
//   3. dQ per block of 64 query rows, looping over its KV blocks: S, P and dP again, dQ += dS K.
// Nothing is accumulated atomically, so the result is deterministic. P is recomputed from the saved
// logsumexp; KV/query block pairs past the diagonal are skipped, those crossing it masked.
#include <cuda_runtime.h>

#include <cmath>

#include "attention.cuh"
#include "launch.h"

namespace fastgpt::cuda {

namespace {


// ---------------------------------------------------------------------------------------------
// 1. delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d]: 16 lanes a row, one 16-byte chunk each.

constexpr int kDeltaThreads = 256;
constexpr int kDeltaLanesPerRow = 16;  // 16 chunks of 8 elements cover head_dim 128

template <typename T>
__global__ void __launch_bounds__(kDeltaThreads) attention_backward_delta_kernel(const AttentionParams p) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.q_len;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kDeltaThreads / kDeltaLanesPerRow) +
                      threadIdx.x / kDeltaLanesPerRow;
  const int chunk = threadIdx.x % kDeltaLanesPerRow;
  float sum = 0.0f;
  if (row < rows && chunk < p.head_dim / 8) {
    const int i = static_cast<int>(row % p.q_len);
    const int64_t batch_head = row / p.q_len;
    const int head = static_cast<int>(batch_head % p.heads);
    const int batch = static_cast<int>(batch_head / p.heads);
    const uint4 o = *reinterpret_cast<const uint4*>(head_rows<const T>(p.out, batch, head) + i * p.out.row_stride + chunk * 8);
    const uint4 d = *reinterpret_cast<const uint4*>(head_rows<const T>(p.dout, batch, head) + i * p.dout.row_stride + chunk * 8);
    const uint32_t o_pairs[4] = {o.x, o.y, o.z, o.w};
    const uint32_t d_pairs[4] = {d.x, d.y, d.z, d.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float o_lo, o_hi, d_lo, d_hi;
      unpack_pair<T>(o_pairs[j], o_lo, o_hi);
      unpack_pair<T>(d_pairs[j], d_lo, d_hi);
      sum = fmaf(o_lo, d_lo, fmaf(o_hi, d_hi, sum));
    }
  }
#pragma unroll
  for (int offset = kDeltaLanesPerRow / 2; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);  // stays within each 16-lane half
  }
  if (chunk == 0 && row < rows) p.delta[row] = sum;
}

// ---------------------------------------------------------------------------------------------
// 2. dK, dV

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(BackwardKVTiles<kHeadDim>::kThreads)
    attention_backward_dkdv_kernel(const AttentionParams p) {
  using Tiles = BackwardKVTiles<kHeadDim>;
  using KVTile = typename Tiles::KVTile;
  using QTile = typename Tiles::QTile;
  constexpr int kThreads = Tiles::kThreads;
  constexpr int kBlockN = Tiles::kBlockN;
  constexpr int kBlockM = Tiles::kBlockM;
  constexpr int kStages = Tiles::kStages;
  constexpr int kSubM = Tiles::kSubM;
  constexpr int kQTiles = kSubM / 8;      // n8 tiles of S^T and dP^T (queries of a sub-step)
  constexpr int kDTiles = kHeadDim / 8;   // n8 tiles of dK and dV

  extern __shared__ __align__(128) uint8_t shared[];
  uint8_t* k_shared = shared;
  uint8_t* v_shared = shared + KVTile::kBytes;
  uint8_t* stages = shared + 2 * KVTile::kBytes;
  const uint32_t k_tile = shared_address(k_shared);
  const uint32_t v_tile = shared_address(v_shared);

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int kv_block = blockIdx.x;  // early KV blocks are seen by the most queries and start first
  const int kv_head = blockIdx.y;
  const int batch = blockIdx.z;
  const int group = p.heads / p.kv_heads;
  const int k0 = kv_block * kBlockN;
  const int diagonal = p.kv_len - p.q_len;
  const int valid_chunks = p.head_dim / 8;
  const int key_row0 = warp * 16;  // this warp's keys within the block

  // Steps: (query head of the group, query block) pairs, head-major, query blocks from the first one
  // that sees key k0. Counters instead of divisions keep the step decoding out of the registers.
  const int num_q_blocks = ceil_div(p.q_len, kBlockM);
  const int first_q_block = causal_first_q_block(k0, kBlockM, diagonal);
  const int num_steps = group * max(0, num_q_blocks - first_q_block);

  copy_tile_async<KVTile, kThreads>(k_tile, head_rows<const T>(p.k, batch, kv_head) + k0 * p.k.row_stride,
                                    p.k.row_stride, p.kv_len - k0, valid_chunks, tid);
  copy_tile_async<KVTile, kThreads>(v_tile, head_rows<const T>(p.v, batch, kv_head) + k0 * p.v.row_stride,
                                    p.v.row_stride, p.kv_len - k0, valid_chunks, tid);
  cp_async_commit();

  // Loads step `step` (steps are loaded in order, tracked by the counters) into stage step % kStages.
  // Stage layout: Q tile, dO tile, lse[kBlockM], delta[kBlockM].
  int load_head = kv_head * group;
  int load_q_block = first_q_block;
  auto load_step = [&](int step) {
    if (step < num_steps) {
      const int q0 = load_q_block * kBlockM;
      const uint32_t stage = shared_address(stages + (step % kStages) * Tiles::kStageBytes);
      copy_tile_async<QTile, kThreads>(stage, head_rows<const T>(p.q, batch, load_head) + q0 * p.q.row_stride,
                                       p.q.row_stride, p.q_len - q0, valid_chunks, tid);
      copy_tile_async<QTile, kThreads>(stage + QTile::kBytes,
                                       head_rows<const T>(p.dout, batch, load_head) + q0 * p.dout.row_stride,
                                       p.dout.row_stride, p.q_len - q0, valid_chunks, tid);
      const int i = tid % kBlockM;
      const bool is_delta = tid >= kBlockM;
      const float* stats =
          (is_delta ? p.delta : p.lse) + (static_cast<int64_t>(batch) * p.heads + load_head) * p.q_len + q0;
      const bool valid = q0 + i < p.q_len;
      cp_async_4(stage + 2 * QTile::kBytes + (is_delta ? Tiles::kStatsBytes : 0) + 4 * i, valid ? stats + i : stats,
                 valid);
      if (++load_q_block == num_q_blocks) {
        load_q_block = first_q_block;
        ++load_head;
      }
    }
    cp_async_commit();
  };
#pragma unroll
  for (int step = 0; step < kStages - 1; ++step) load_step(step);

  float dk[kDTiles][4] = {};
  float dv[kDTiles][4] = {};
  const float scale_log2 = p.softmax_scale * kLog2e;

  int q_block = first_q_block;  // of the current step
  for (int step = 0; step < num_steps; ++step) {
    // This step's stage (and K, V on the first step) has landed; every warp is done with the stage
    // that the next load overwrites.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    load_step(step + kStages - 1);
    const int q0 = q_block * kBlockM;
    const uint8_t* stage = stages + (step % kStages) * Tiles::kStageBytes;
    const uint32_t q_tile = shared_address(stage);
    const uint32_t do_tile = q_tile + QTile::kBytes;
    const float* lse = reinterpret_cast<const float*>(stage + 2 * QTile::kBytes);
    const float* delta = lse + kBlockM;
    const bool masked = causal_tile_needs_mask(q0, kBlockM, k0, kBlockN, p.q_len, p.kv_len, diagonal);

#pragma unroll 1
    for (int m0 = 0; m0 < kBlockM; m0 += kSubM) {  // queries [m0, m0 + kSubM) of the stage
      // Whether key row e of this lane sees query column nt (evaluated only where masking is needed).
      auto visible = [&](int nt, int e) {
        const int key = k0 + key_row0 + accumulator_row(lane, e);
        const int query = q0 + m0 + nt * 8 + accumulator_col(lane, e);
        return query < p.q_len && key < p.kv_len && key <= query + diagonal;
      };

      // S^T = K Q^T: 16 keys x kSubM queries per warp.
      float st[kQTiles][4] = {};
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        uint32_t a[4];
        load_a<KVTile>(a, k_tile, key_row0, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < kQTiles / 2; ++np) {
          uint32_t b[4];
          load_b_pair<QTile>(b, q_tile, m0 + np * 16, kk * 16, lane);
          mma_16x8x16<T>(st[2 * np], a, b[0], b[1]);
          mma_16x8x16<T>(st[2 * np + 1], a, b[2], b[3]);
        }
      }
      // P^T = exp2(S^T * scale * log2(e) - lse * log2(e)); a lane's columns are 2t, 2t + 1 of each n8 tile.
#pragma unroll
      for (int nt = 0; nt < kQTiles; ++nt) {
        const float2 l = *reinterpret_cast<const float2*>(lse + m0 + nt * 8 + accumulator_col(lane, 0));
        st[nt][0] = fast_exp2(fmaf(st[nt][0], scale_log2, -l.x * kLog2e));
        st[nt][1] = fast_exp2(fmaf(st[nt][1], scale_log2, -l.y * kLog2e));
        st[nt][2] = fast_exp2(fmaf(st[nt][2], scale_log2, -l.x * kLog2e));
        st[nt][3] = fast_exp2(fmaf(st[nt][3], scale_log2, -l.y * kLog2e));
      }
      if (masked) {
#pragma unroll
        for (int nt = 0; nt < kQTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (!visible(nt, e)) st[nt][e] = 0.0f;
          }
        }
      }

      // dP^T = V dO^T.
      float dpt[kQTiles][4] = {};
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        uint32_t a[4];
        load_a<KVTile>(a, v_tile, key_row0, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < kQTiles / 2; ++np) {
          uint32_t b[4];
          load_b_pair<QTile>(b, do_tile, m0 + np * 16, kk * 16, lane);
          mma_16x8x16<T>(dpt[2 * np], a, b[0], b[1]);
          mma_16x8x16<T>(dpt[2 * np + 1], a, b[2], b[3]);
        }
      }

      // dV += P^T dO: P^T is the A operand straight from registers, dO [query][dim] is B via ldmatrix.trans.
#pragma unroll
      for (int kk = 0; kk < kSubM / 16; ++kk) {
        uint32_t a[4];
        accumulators_to_a<T>(a, st[2 * kk], st[2 * kk + 1]);
#pragma unroll
        for (int dp = 0; dp < kHeadDim / 16; ++dp) {
          uint32_t b[4];
          load_b_pair_transposed<QTile>(b, do_tile, dp * 16, m0 + kk * 16, lane);
          mma_16x8x16<T>(dv[2 * dp], a, b[0], b[1]);
          mma_16x8x16<T>(dv[2 * dp + 1], a, b[2], b[3]);
        }
      }

      // dS^T = P^T (dP^T - delta), exactly 0 where masked (as masked_fill's gradient is, even for NaN dP).
#pragma unroll
      for (int nt = 0; nt < kQTiles; ++nt) {
        const float2 d = *reinterpret_cast<const float2*>(delta + m0 + nt * 8 + accumulator_col(lane, 0));
        dpt[nt][0] = st[nt][0] * (dpt[nt][0] - d.x);
        dpt[nt][1] = st[nt][1] * (dpt[nt][1] - d.y);
        dpt[nt][2] = st[nt][2] * (dpt[nt][2] - d.x);
        dpt[nt][3] = st[nt][3] * (dpt[nt][3] - d.y);
      }
      if (masked) {
#pragma unroll
        for (int nt = 0; nt < kQTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (!visible(nt, e)) dpt[nt][e] = 0.0f;
          }
        }
      }

      // dK += dS^T Q.
#pragma unroll
      for (int kk = 0; kk < kSubM / 16; ++kk) {
        uint32_t a[4];
        accumulators_to_a<T>(a, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
        for (int dp = 0; dp < kHeadDim / 16; ++dp) {
          uint32_t b[4];
          load_b_pair_transposed<QTile>(b, q_tile, dp * 16, m0 + kk * 16, lane);
          mma_16x8x16<T>(dk[2 * dp], a, b[0], b[1]);
          mma_16x8x16<T>(dk[2 * dp + 1], a, b[2], b[3]);
        }
      }
    }
    if (++q_block == num_q_blocks) q_block = first_q_block;
  }

  // Write dK (times the softmax scale) and dV through this warp's own K and V rows in shared memory.
  // The K/V copies are complete even when no query block was visited.
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] *= p.softmax_scale;
    store_accumulators<KVTile, T>(k_shared, dk[dt], key_row0, dt * 8, lane);
    store_accumulators<KVTile, T>(v_shared, dv[dt], key_row0, dt * 8, lane);
  }
  __syncwarp();
  const int valid_rows = p.kv_len - k0 - key_row0;
  store_tile_rows<KVTile, 16, 32>(head_rows<T>(p.dk, batch, kv_head) + (k0 + key_row0) * p.dk.row_stride,
                                  p.dk.row_stride, k_shared, key_row0, valid_rows, valid_chunks, lane);
  store_tile_rows<KVTile, 16, 32>(head_rows<T>(p.dv, batch, kv_head) + (k0 + key_row0) * p.dv.row_stride,
                                  p.dv.row_stride, v_shared, key_row0, valid_rows, valid_chunks, lane);
}

// ---------------------------------------------------------------------------------------------
// 3. dQ

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(BackwardQTiles<kHeadDim>::kThreads)
    attention_backward_dq_kernel(const AttentionParams p) {
  using Tiles = BackwardQTiles<kHeadDim>;
  using QTile = typename Tiles::QTile;
  using KVTile = typename Tiles::KVTile;
  constexpr int kThreads = Tiles::kThreads;
  constexpr int kBlockM = Tiles::kBlockM;
  constexpr int kBlockN = Tiles::kBlockN;
  constexpr int kStages = Tiles::kStages;
  constexpr int kSubN = Tiles::kSubN;
  constexpr int kNTiles = kSubN / 8;     // n8 tiles of S and dP (keys of a sub-step)
  constexpr int kDTiles = kHeadDim / 8;  // n8 tiles of dQ

  extern __shared__ __align__(128) uint8_t shared[];
  const uint32_t q_tile = shared_address(shared);
  const uint32_t do_tile = q_tile + QTile::kBytes;
  const uint32_t stages = do_tile + QTile::kBytes;  // stage s: K tile, V tile

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int q_block = gridDim.x - 1 - blockIdx.x;  // the longest (latest) query blocks start first
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int kv_head = head / (p.heads / p.kv_heads);
  const int q0 = q_block * kBlockM;
  const int diagonal = p.kv_len - p.q_len;
  const int valid_chunks = p.head_dim / 8;
  const int warp_row0 = warp * 16;

  const T* k = head_rows<const T>(p.k, batch, kv_head);
  const T* v = head_rows<const T>(p.v, batch, kv_head);
  const int num_blocks = causal_kv_blocks(q0, kBlockM, kBlockN, p.kv_len, diagonal);
  const int num_unmasked = causal_unmasked_blocks(q0, kBlockN, num_blocks, diagonal);

  copy_tile_async<QTile, kThreads>(q_tile, head_rows<const T>(p.q, batch, head) + q0 * p.q.row_stride, p.q.row_stride,
                                   p.q_len - q0, valid_chunks, tid);
  copy_tile_async<QTile, kThreads>(do_tile, head_rows<const T>(p.dout, batch, head) + q0 * p.dout.row_stride,
                                   p.dout.row_stride, p.q_len - q0, valid_chunks, tid);
  cp_async_commit();
  auto load_stage = [&](int block) {
    if (block < num_blocks) {
      const uint32_t stage = stages + (block % kStages) * 2 * KVTile::kBytes;
      const int rows = p.kv_len - block * kBlockN;
      copy_tile_async<KVTile, kThreads>(stage, k + block * kBlockN * p.k.row_stride, p.k.row_stride, rows,
                                        valid_chunks, tid);
      copy_tile_async<KVTile, kThreads>(stage + KVTile::kBytes, v + block * kBlockN * p.v.row_stride,
                                        p.v.row_stride, rows, valid_chunks, tid);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int block = 0; block < kStages - 1; ++block) load_stage(block);

  // Statistics of this lane's two rows (g and g + 8 of the warp's m16 tile), in registers throughout.
  const int64_t stats_row0 = (static_cast<int64_t>(batch) * p.heads + head) * p.q_len;
  float lse_log2[2], delta[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = q0 + warp_row0 + accumulator_row(lane, 2 * half);
    lse_log2[half] = row < p.q_len ? p.lse[stats_row0 + row] * kLog2e : 0.0f;
    delta[half] = row < p.q_len ? p.delta[stats_row0 + row] : 0.0f;
  }

  float dq[kDTiles][4] = {};
  const float scale_log2 = p.softmax_scale * kLog2e;

  for (int block = 0; block < num_blocks; ++block) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    load_stage(block + kStages - 1);
    const uint32_t k_tile = stages + (block % kStages) * 2 * KVTile::kBytes;
    const uint32_t v_tile = k_tile + KVTile::kBytes;
    const bool masked = block >= num_unmasked;

#pragma unroll 1
    for (int n0 = 0; n0 < kBlockN; n0 += kSubN) {  // keys [n0, n0 + kSubN) of the block
      auto visible = [&](int nt, int e) {
        const int row = q0 + warp_row0 + accumulator_row(lane, e);
        const int key = block * kBlockN + n0 + nt * 8 + accumulator_col(lane, e);
        return key <= row + diagonal;
      };

      // P = exp2(Q K^T * scale * log2(e) - lse * log2(e)).
      float s[kNTiles][4] = {};
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        uint32_t a[4];
        load_a<QTile>(a, q_tile, warp_row0, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
          uint32_t b[4];
          load_b_pair<KVTile>(b, k_tile, n0 + np * 16, kk * 16, lane);
          mma_16x8x16<T>(s[2 * np], a, b[0], b[1]);
          mma_16x8x16<T>(s[2 * np + 1], a, b[2], b[3]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = fast_exp2(fmaf(s[nt][e], scale_log2, -lse_log2[e / 2]));
      }
      if (masked) {
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (!visible(nt, e)) s[nt][e] = 0.0f;
          }
        }
      }

      // dS = P (dO V^T - delta), exactly 0 where masked.
      float ds[kNTiles][4] = {};
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        uint32_t a[4];
        load_a<QTile>(a, do_tile, warp_row0, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
          uint32_t b[4];
          load_b_pair<KVTile>(b, v_tile, n0 + np * 16, kk * 16, lane);
          mma_16x8x16<T>(ds[2 * np], a, b[0], b[1]);
          mma_16x8x16<T>(ds[2 * np + 1], a, b[2], b[3]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) ds[nt][e] = s[nt][e] * (ds[nt][e] - delta[e / 2]);
      }
      if (masked) {
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (!visible(nt, e)) ds[nt][e] = 0.0f;
          }
        }
      }

      // dQ += dS K: dS from registers, K [key][dim] as B via ldmatrix.trans.
#pragma unroll
      for (int kk = 0; kk < kSubN / 16; ++kk) {
        uint32_t a[4];
        accumulators_to_a<T>(a, ds[2 * kk], ds[2 * kk + 1]);
#pragma unroll
        for (int dp = 0; dp < kHeadDim / 16; ++dp) {
          uint32_t b[4];
          load_b_pair_transposed<KVTile>(b, k_tile, dp * 16, n0 + kk * 16, lane);
          mma_16x8x16<T>(dq[2 * dp], a, b[0], b[1]);
          mma_16x8x16<T>(dq[2 * dp + 1], a, b[2], b[3]);
        }
      }
    }
  }

  // Write dQ (times the softmax scale) through this warp's own rows of the Q tile.
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[dt][e] *= p.softmax_scale;
    store_accumulators<QTile, T>(shared, dq[dt], warp_row0, dt * 8, lane);
  }
  __syncwarp();
  store_tile_rows<QTile, 16, 32>(head_rows<T>(p.dq, batch, head) + (q0 + warp_row0) * p.dq.row_stride,
                                 p.dq.row_stride, shared, warp_row0, p.q_len - q0 - warp_row0, valid_chunks, lane);
}

// ---------------------------------------------------------------------------------------------
// Launchers

template <typename T, int kHeadDim>
cudaError_t launch_backward(AttentionParams p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.q_len;
  if (rows > 0) {
    const int64_t blocks = (rows + kDeltaThreads / kDeltaLanesPerRow - 1) / (kDeltaThreads / kDeltaLanesPerRow);
    attention_backward_delta_kernel<T><<<static_cast<unsigned>(blocks), kDeltaThreads, 0, stream>>>(p);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  {
    using Tiles = BackwardKVTiles<kHeadDim>;
    AttentionParams launch = p;
    launch.num_threads = Tiles::kThreads;
    launch.shared_bytes = Tiles::kSharedBytes;
    auto kernel = attention_backward_dkdv_kernel<T, kHeadDim>;
    cudaError_t error = allow_shared_memory(kernel, launch.shared_bytes);
    if (error != cudaSuccess) return error;
    const dim3 grid(ceil_div(p.kv_len, Tiles::kBlockN), p.kv_heads, p.batch);
    kernel<<<grid, launch.num_threads, launch.shared_bytes, stream>>>(launch);
    error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  if (p.q_len > 0) {
    using Tiles = BackwardQTiles<kHeadDim>;
    AttentionParams launch = p;
    launch.num_threads = Tiles::kThreads;
    launch.shared_bytes = Tiles::kSharedBytes;
    auto kernel = attention_backward_dq_kernel<T, kHeadDim>;
    cudaError_t error = allow_shared_memory(kernel, launch.shared_bytes);
    if (error != cudaSuccess) return error;
    const dim3 grid(ceil_div(p.q_len, Tiles::kBlockM), p.heads, p.batch);
    kernel<<<grid, launch.num_threads, launch.shared_bytes, stream>>>(launch);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_backward_for_head_dim(const AttentionParams& p, cudaStream_t stream) {
  switch (padded_head_dim(p.head_dim)) {
    case 32:
      return launch_backward<T, 32>(p, stream);
    case 64:
      return launch_backward<T, 64>(p, stream);
    case 96:
      return launch_backward<T, 96>(p, stream);
    case 128:
      return launch_backward<T, 128>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t attention_backward(const AttentionParams& p, cudaStream_t stream) {
  if (!attention_shape_ok(p)) return cudaErrorInvalidValue;
  // Nothing to write; the data pointers of empty tensors may be null, so they are checked after this.
  if (p.batch == 0 || p.kv_heads == 0 || p.kv_len == 0) return cudaSuccess;
  if (!heads_aligned(p.q) || !heads_aligned(p.k) || !heads_aligned(p.v) || !heads_aligned(p.out) ||
      !heads_aligned(p.dout) || !heads_aligned(p.dq) || !heads_aligned(p.dk) || !heads_aligned(p.dv) ||
      p.lse == nullptr || p.delta == nullptr) {
    return cudaErrorInvalidValue;
  }
  // The mma.sync kernels run on every device from sm_80 on (api_cuda.inc routes calls to the opt-in
  // sm_90a backward, attention_bwd_sm90.cu, before they get here).
  const cudaError_t error = require_sm80();
  if (error != cudaSuccess) return error;
  return p.dtype == DType::kBFloat16 ? launch_backward_for_head_dim<__nv_bfloat16>(p, stream)
                                     : launch_backward_for_head_dim<__half>(p, stream);
}

}  // namespace fastgpt::cuda
