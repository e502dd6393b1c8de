// Causal attention forward on tensor cores, FlashAttention-2 style.
//
// One block computes 128 query rows of one (batch, head): Q stays in shared memory, K and V tiles of 64
// keys stream through a cp.async ring (attention.cuh), S = Q K^T and O += P V run on mma.sync
// m16n8k16 with float32 accumulators, and the softmax is online: running row max and row sum in
// float32, exp2 with log2(e) folded into the scale. KV blocks past the diagonal are skipped; only
// blocks crossing it are masked. The logsumexp (natural log) is saved for the backward.
#include <cuda_runtime.h>

#include <cmath>

#include "attention.cuh"
#include "launch.h"

namespace fastgpt::cuda {

namespace {

constexpr float kLn2 = 0.6931471805599453f;

// Online softmax step for one KV block. s holds the raw scores of this block and leaves holding P
// (unnormalised, relative to the new row max); o is rescaled to the new max. Each row's 64 scores are
// spread over the 4 lanes of a quad, so row reductions are two xor-shuffles.
template <int kMTiles, int kNTiles, int kDTiles>
__device__ inline void online_softmax(float (&s)[kMTiles][kNTiles][4], float (&o)[kMTiles][kDTiles][4],
                                      float (&row_max)[kMTiles][2], float (&row_sum)[kMTiles][2], float scale_log2) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // rows g and g + 8 of the m16 tile
      float block_max = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        block_max = fmaxf(block_max, fmaxf(s[mt][nt][2 * half], s[mt][nt][2 * half + 1]));
      }
      block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 1));
      block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 2));
      const float new_max = fmaxf(row_max[mt][half], block_max * scale_log2);
      // A row with every score masked so far keeps max -inf; exponentiate against 0 so it gives 0, not NaN.
      const float base = new_max == -INFINITY ? 0.0f : new_max;
      const float correction = fast_exp2(row_max[mt][half] - base);
      row_max[mt][half] = new_max;
      float block_sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          s[mt][nt][e] = fast_exp2(fmaf(s[mt][nt][e], scale_log2, -base));
          block_sum += s[mt][nt][e];
        }
      }
      row_sum[mt][half] = row_sum[mt][half] * correction + block_sum;  // this lane's share of the row
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        o[mt][dt][2 * half] *= correction;
        o[mt][dt][2 * half + 1] *= correction;
      }
    }
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(ForwardTiles<kHeadDim>::kThreads, ForwardTiles<kHeadDim>::kMinBlocksPerSM)
    attention_forward_kernel(const AttentionParams p) {
  using Tiles = ForwardTiles<kHeadDim>;
  using QTile = typename Tiles::QTile;
  using KVTile = typename Tiles::KVTile;
  constexpr int kThreads = Tiles::kThreads;
  constexpr int kBlockM = Tiles::kBlockM;
  constexpr int kBlockN = Tiles::kBlockN;
  constexpr int kMTiles = Tiles::kMTiles;
  constexpr int kSlots = Tiles::kSlots;
  constexpr int kNTiles = kBlockN / 8;   // n8 tiles of S per m16 tile
  constexpr int kDTiles = kHeadDim / 8;  // n8 tiles of O per m16 tile

  extern __shared__ __align__(128) uint8_t shared[];
  const uint32_t q_tile = shared_address(shared);
  const uint32_t slots = q_tile + QTile::kBytes;

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
  const int warp_row0 = warp * kMTiles * 16;  // this warp's first row within the block

  const T* q = head_rows<const T>(p.q, batch, head) + q0 * p.q.row_stride;
  const T* k = head_rows<const T>(p.k, batch, kv_head);
  const T* v = head_rows<const T>(p.v, batch, kv_head);
  const int num_blocks = causal_kv_blocks(q0, kBlockM, kBlockN, p.kv_len, diagonal);
  const int num_unmasked = causal_unmasked_blocks(q0, kBlockN, num_blocks, diagonal);

  // Tile t of the stream K0 V0 K1 V1 ... goes to slot t % kSlots; one commit group per tile.
  auto load_kv_tile = [&](int t) {
    if (t < 2 * num_blocks) {
      const int block = t / 2;
      const bool is_v = t % 2 == 1;
      const int64_t row_stride = is_v ? p.v.row_stride : p.k.row_stride;
      const T* src = (is_v ? v : k) + block * kBlockN * row_stride;
      copy_tile_async<KVTile, kThreads>(slots + (t % kSlots) * KVTile::kBytes, src, row_stride,
                                        p.kv_len - block * kBlockN, valid_chunks, tid);
    }
    cp_async_commit();
  };

  copy_tile_async<QTile, kThreads>(q_tile, q, p.q.row_stride, p.q_len - q0, valid_chunks, tid);
  cp_async_commit();
#pragma unroll
  for (int t = 0; t < kSlots - 1; ++t) load_kv_tile(t);

  float o[kMTiles][kDTiles][4] = {};
  float row_max[kMTiles][2], row_sum[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
  }
  const float scale_log2 = p.softmax_scale * kLog2e;

  for (int block = 0; block < num_blocks; ++block) {
    // K of this block has landed (and Q, on the first block); every warp is done with the slot that
    // the next load overwrites, which held the previous block's V.
    cp_async_wait<kSlots - 2>();
    __syncthreads();
    load_kv_tile(2 * block + kSlots - 1);
    const uint32_t k_tile = slots + ((2 * block) % kSlots) * KVTile::kBytes;

    float s[kMTiles][kNTiles][4] = {};
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) load_a<QTile>(a[mt], q_tile, warp_row0 + mt * 16, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t b[4];
        load_b_pair<KVTile>(b, k_tile, np * 16, kk * 16, lane);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16x8x16<T>(s[mt][2 * np], a[mt], b[0], b[1]);
          mma_16x8x16<T>(s[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }

    if (block >= num_unmasked) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = q0 + warp_row0 + mt * 16 + accumulator_row(lane, e);
            const int key = block * kBlockN + nt * 8 + accumulator_col(lane, e);
            if (key > row + diagonal) s[mt][nt][e] = -INFINITY;
          }
        }
      }
    }
    online_softmax(s, o, row_max, row_sum, scale_log2);

    // V of this block has landed; every warp is done with K, whose slot the next load overwrites.
    cp_async_wait<kSlots - 2>();
    __syncthreads();
    load_kv_tile(2 * block + kSlots);
    const uint32_t v_tile = slots + ((2 * block + 1) % kSlots) * KVTile::kBytes;

#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) accumulators_to_a<T>(a[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < kHeadDim / 16; ++dp) {
        uint32_t b[4];
        load_b_pair_transposed<KVTile>(b, v_tile, dp * 16, kk * 16, lane);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16x8x16<T>(o[mt][2 * dp], a[mt], b[0], b[1]);
          mma_16x8x16<T>(o[mt][2 * dp + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }

  // Normalise, save the logsumexp, and write O through this warp's own rows of the Q tile (only this
  // warp ever read them), so that global stores are whole 16-byte chunks.
  float* lse = p.lse + (static_cast<int64_t>(batch) * p.heads + head) * p.q_len;
  __syncwarp();
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float sum = row_sum[mt][half];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const float inverse = 1.0f / sum;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        o[mt][dt][2 * half] *= inverse;
        o[mt][dt][2 * half + 1] *= inverse;
      }
      const int row = q0 + warp_row0 + mt * 16 + accumulator_row(lane, 2 * half);
      if (lane % 4 == 0 && row < p.q_len) lse[row] = row_max[mt][half] * kLn2 + logf(sum);
    }
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      store_accumulators<QTile, T>(shared, o[mt][dt], warp_row0 + mt * 16, dt * 8, lane);
    }
  }
  __syncwarp();
  T* out = head_rows<T>(p.out, batch, head) + (q0 + warp_row0) * p.out.row_stride;
  store_tile_rows<QTile, kMTiles * 16, 32>(out, p.out.row_stride, shared, warp_row0, p.q_len - q0 - warp_row0,
                                           valid_chunks, lane);
}

template <typename T, int kHeadDim>
cudaError_t launch_forward(AttentionParams p, cudaStream_t stream) {
  using Tiles = ForwardTiles<kHeadDim>;
  p.num_threads = Tiles::kThreads;
  p.shared_bytes = Tiles::kSharedBytes;
  auto kernel = attention_forward_kernel<T, kHeadDim>;
  const cudaError_t error = allow_shared_memory(kernel, p.shared_bytes);
  if (error != cudaSuccess) return error;
  const dim3 grid(ceil_div(p.q_len, Tiles::kBlockM), p.heads, p.batch);
  kernel<<<grid, p.num_threads, p.shared_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_forward_for_head_dim(const AttentionParams& p, cudaStream_t stream) {
  switch (padded_head_dim(p.head_dim)) {
    case 32:
      return launch_forward<T, 32>(p, stream);
    case 64:
      return launch_forward<T, 64>(p, stream);
    case 96:
      return launch_forward<T, 96>(p, stream);
    case 128:
      return launch_forward<T, 128>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

const char* attention_unsupported_reason(int head_dim, DType dtype) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) {
    return "the CUDA attention kernels run bfloat16 and float16 on tensor cores; float32 runs on Triton";
  }
  if (head_dim % 8 != 0) {
    return "the CUDA attention kernels need head_dim to be a multiple of 8 (rows of whole 16-byte chunks)";
  }
  if (padded_head_dim(head_dim) == 0) {
    return "the CUDA attention kernels support head_dim up to 128 (beyond it the backward's dK/dV "
           "accumulators no longer fit in registers)";
  }
  return nullptr;
}

cudaError_t attention_forward(const AttentionParams& p, cudaStream_t stream) {
  if (!attention_shape_ok(p)) return cudaErrorInvalidValue;
  // Nothing to write; the data pointers of empty tensors may be null, so they are checked after this.
  if (p.batch == 0 || p.heads == 0 || p.q_len == 0) return cudaSuccess;
  if (!heads_aligned(p.q) || !heads_aligned(p.k) || !heads_aligned(p.v) || !heads_aligned(p.out) || p.lse == nullptr) {
    return cudaErrorInvalidValue;
  }
  // Kernel choice by architecture: every device from sm_80 on runs the mma.sync kernel. sm_90a is
  // where a warpgroup-MMA (wgmma) kernel fed by TMA tile copies, FlashAttention-3's scheme, is to be
  // selected once it exists.
  const cudaError_t error = require_sm80();
  if (error != cudaSuccess) return error;
  return p.dtype == DType::kBFloat16 ? launch_forward_for_head_dim<__nv_bfloat16>(p, stream)
                                     : launch_forward_for_head_dim<__half>(p, stream);
}

}  // namespace fastgpt::cuda
