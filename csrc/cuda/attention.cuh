// Pieces shared by the causal attention forward (attention_fwd.cu) and backward (attention_bwd.cu):
// tile shapes per head dim, the bottom-right causal block ranges, strided head pointers, and the
// host-side checks every launcher makes.
//
// Causal mask, bottom-right aligned: query i sees keys j <= i + diagonal, diagonal = kv_len - q_len >= 0.
// For every stored query row (i < q_len) that limit is at most kv_len - 1, so the causal test alone
// also keeps the zero-filled keys past kv_len out.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../params.h"
#include "device.cuh"
#include "tile.cuh"

namespace fastgpt::cuda {

// Head dims with a kernel; any head_dim that is a multiple of 8 up to 128 runs in the next one up,
// its missing 16-byte chunks zero-filled on load and skipped on store.
__host__ __device__ constexpr int padded_head_dim(int head_dim) {
  return head_dim <= 32 ? 32 : head_dim <= 64 ? 64 : head_dim <= 96 ? 96 : head_dim <= 128 ? 128 : 0;
}

// Forward: 128 query rows a block, 4 warps of 32 rows (two m16 tiles each, so that every K/V fragment
// read from shared memory feeds two mma), KV blocks of 64 keys (FlashAttention-2's sm80 causal
// shape). The K and V tiles stream through a ring of `kSlots` tile buffers in the order K0 V0 K1 V1
// ..., kSlots - 1 tiles ahead of the one in use. kSlots is sized so two blocks fit on an A100 SM
// (2 x 80 KB at head_dim 128); smaller head dims prefetch deeper.
template <int kHeadDim>
struct ForwardTiles {
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 64;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMTiles = kBlockM / (16 * kWarps);
  static constexpr int kSlots = kHeadDim <= 64 ? 4 : 3;
  // Blocks per SM that __launch_bounds__ reserves registers for: 2 leaves 255 registers a thread (O
  // alone is 128 float32 at head_dim 128); head_dim 32 fits 3 (168 registers). Head_dim 64 spills at 3.
  static constexpr int kMinBlocksPerSM = kHeadDim <= 32 ? 3 : 2;
  using QTile = SmemTile<kBlockM, kHeadDim>;
  using KVTile = SmemTile<kBlockN, kHeadDim>;
  static constexpr int kSharedBytes = QTile::kBytes + kSlots * KVTile::kBytes;
};

// Backward, dK/dV: one block per 64 keys, each of its 4 warps owning 16 keys and their dK and dV rows
// (16 x head_dim float32 each: 128 registers at head_dim 128, which is why 16 and not 32 keys a
// warp). Query blocks of 64 rows stream in, two stages deep, each stage holding Q, dO, lse and delta.
// Every product is computed transposed (S^T = K Q^T, dP^T = V dO^T) so that P^T and dS^T, held in
// accumulator registers, are directly the A operands of dV += P^T dO and dK += dS^T Q.
template <int kHeadDim>
struct BackwardKVTiles {
  static constexpr int kBlockN = 64;
  static constexpr int kBlockM = 64;
  // Queries per sub-step: a stage's query block is processed in pieces so that S^T and dP^T of one
  // piece (kSubM / 2 float32 registers each) fit beside dK and dV; at head_dim 128 whole blocks spill.
  static constexpr int kSubM = kHeadDim > 96 ? 32 : 64;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kStages = 2;
  using KVTile = SmemTile<kBlockN, kHeadDim>;
  using QTile = SmemTile<kBlockM, kHeadDim>;
  static constexpr int kStatsBytes = kBlockM * 4;  // lse or delta of one query block, float32
  static constexpr int kStageBytes = 2 * QTile::kBytes + 2 * kStatsBytes;
  static constexpr int kSharedBytes = 2 * KVTile::kBytes + kStages * kStageBytes;
  static_assert(kThreads == 2 * kBlockM, "one thread per lse and per delta value of a stage");
};

// Backward, dQ: one block per 64 query rows, 4 warps of 16 rows (the dQ accumulator plus S and dP
// stay in registers), KV blocks of 64 keys two stages deep. Q and dO stay in shared memory for the
// whole block. No atomics: dQ is summed in registers in a fixed order, so the backward is
// deterministic; the price is recomputing S and dP here (7 GEMMs instead of FlashAttention-2's 5).
template <int kHeadDim>
struct BackwardQTiles {
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 64;
  // Keys per sub-step, for the same reason as BackwardKVTiles::kSubM.
  static constexpr int kSubN = kHeadDim > 96 ? 32 : 64;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kStages = 2;
  using QTile = SmemTile<kBlockM, kHeadDim>;
  using KVTile = SmemTile<kBlockN, kHeadDim>;
  static constexpr int kSharedBytes = 2 * QTile::kBytes + kStages * 2 * KVTile::kBytes;
};

// Row 0 of head `head` of batch `batch`.
template <typename T>
__host__ __device__ inline T* head_rows(const HeadTensor& t, int batch, int head) {
  return static_cast<T*>(t.data) + batch * t.batch_stride + head * t.head_stride;
}

// Number of KV blocks that a query block [q0, q0 + block_m) attends to: keys below
// min(kv_len, q0 + block_m + diagonal).
__host__ __device__ inline int causal_kv_blocks(int q0, int block_m, int block_n, int kv_len, int diagonal) {
  const int reach = q0 + block_m + diagonal;
  return ceil_div(kv_len < reach ? kv_len : reach, block_n);
}

// Leading KV blocks that every row of the query block sees whole (no mask needed): the keys of block
// b end at (b + 1) * block_n - 1 <= q0 + diagonal, the first row's limit.
__host__ __device__ inline int causal_unmasked_blocks(int q0, int block_n, int num_blocks, int diagonal) {
  const int whole = (q0 + diagonal + 1) / block_n;
  return whole < num_blocks ? whole : num_blocks;
}

// First query block (of block_m rows) with a row that sees key k0: rows i >= k0 - diagonal.
__host__ __device__ inline int causal_first_q_block(int k0, int block_m, int diagonal) {
  return k0 > diagonal ? (k0 - diagonal) / block_m : 0;
}

// Whether the (query block q0, key block k0) tile of the dK/dV kernel holds any pair to mask: a query
// row past q_len, a key past kv_len, or a key past the first row's causal limit.
__host__ __device__ inline bool causal_tile_needs_mask(int q0, int block_m, int k0, int block_n, int q_len, int kv_len,
                                                       int diagonal) {
  return q0 + block_m > q_len || k0 + block_n > kv_len || k0 + block_n - 1 > q0 + diagonal;
}

// 16-byte alignment of every row that cp.async and the vector stores touch.
inline bool heads_aligned(const HeadTensor& t) {
  return is_aligned(t.data, 16) && t.batch_stride % 8 == 0 && t.head_stride % 8 == 0 && t.row_stride % 8 == 0;
}

inline bool attention_shape_ok(const AttentionParams& p) {
  return (p.dtype == DType::kBFloat16 || p.dtype == DType::kFloat16) && p.head_dim % 8 == 0 &&
         padded_head_dim(p.head_dim) != 0 && p.kv_heads > 0 && p.heads % p.kv_heads == 0 && p.q_len <= p.kv_len;
}

}  // namespace fastgpt::cuda
