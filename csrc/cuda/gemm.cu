// Tensor-core GEMM with the FFN's fused epilogues: out = epilogue(a @ b^T), a (M, K), b (N, K).
//
// Each operand is read either with K contiguous (col_stride 1: x, W) or transposed with M/N contiguous
// (row_stride 1: W^T, dY^T, act(h)^T in the FFN backward); the two layouts differ only in how the
// shared tile is stored ([mn][k] or [k][mn]) and in ldmatrix's .trans, so one kernel template covers
// the four combinations. Operands that are not 16-byte aligned take an element-wise load path.
// The epilogue (launch.h) goes through shared memory so that every global access is a full row.
#include <cuda_runtime.h>

#include "activations.cuh"
#include "device.cuh"
#include "gemm.cuh"
#include "launch.h"

namespace fastgpt::cuda {

namespace {

using namespace gemm_config;

// Whether an operand can take the 16-byte cp.async path: its contiguous dimension is whole 8-element
// chunks and every chunk starts 16-byte aligned.
template <bool kTransposed>
__host__ __device__ inline bool operand_vectorizable(const Matrix& x, int mn, int k) {
  if (!is_aligned(x.data, 16)) return false;
  return kTransposed ? x.row_stride == 1 && x.col_stride % 8 == 0 && mn % 8 == 0
                     : x.col_stride == 1 && x.row_stride % 8 == 0 && k % 8 == 0;
}

// The slow path: the same tile as copy_tile_async, gathered element by element (any strides).
template <class Tile, typename T>
__device__ inline void copy_tile_elementwise(uint8_t* tile, const T* src, int64_t row_stride, int64_t col_stride,
                                             int valid_rows, int valid_cols, int tid) {
  constexpr int kChunks = Tile::kRows * Tile::kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "every thread gathers the same number of chunks");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int index = tid + i * kThreads;
    const int row = index / Tile::kChunksPerRow;
    const int chunk = index % Tile::kChunksPerRow;
    uint4 value;
    T* elements = reinterpret_cast<T*>(&value);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int col = chunk * 8 + j;
      elements[j] = row < valid_rows && col < valid_cols ? src[row * row_stride + col * col_stride] : from_float<T>(0.0f);
    }
    *reinterpret_cast<uint4*>(tile + Tile::chunk_offset(row, chunk)) = value;
  }
}

// Loads the k0.. slice of the operand rows mn0.. (of mn rows and k columns in all) into one stage's
// tile. Tile rows run along the operand's strided dimension, tile chunks along its contiguous one.
template <typename T, bool kTransposed>
__device__ inline void load_operand_tile(uint8_t* tile, const Matrix& x, int mn0, int mn, int k0, int k, bool vector,
                                         int tid) {
  using Tile = OperandTile<kTransposed>;
  const int64_t tile_row_stride = kTransposed ? x.col_stride : x.row_stride;
  const int64_t tile_col_stride = kTransposed ? x.row_stride : x.col_stride;
  const int row0 = kTransposed ? k0 : mn0;
  const int col0 = kTransposed ? mn0 : k0;
  const int valid_rows = (kTransposed ? k : mn) - row0;
  const int valid_cols = (kTransposed ? mn : k) - col0;
  const T* src = static_cast<const T*>(x.data) + row0 * tile_row_stride + col0 * tile_col_stride;
  if (vector) {
    copy_tile_async<Tile, kThreads>(shared_address(tile), src, tile_row_stride, valid_rows, valid_cols / 8, tid);
  } else {
    copy_tile_elementwise<Tile>(tile, src, tile_row_stride, tile_col_stride, valid_rows, valid_cols, tid);
  }
}

// Four consecutive elements (m, n..n+3) of an epilogue matrix (col_stride 1), as floats; columns at or
// past N read as 0. `vector`: one 8-byte access (all four in range, 8-byte aligned).
template <typename T>
__device__ inline void load_four(const Matrix& x, int m, int n, int N, bool vector, float (&v)[4]) {
  const T* row = static_cast<const T*>(x.data) + m * x.row_stride + n;
  if (vector) {
    const uint2 raw = *reinterpret_cast<const uint2*>(row);
    unpack_pair<T>(raw.x, v[0], v[1]);
    unpack_pair<T>(raw.y, v[2], v[3]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = n + j < N ? to_float(row[j]) : 0.0f;
  }
}

template <typename T>
__device__ inline void store_four(const Matrix& x, int m, int n, int N, bool vector, const float (&v)[4]) {
  T* row = static_cast<T*>(x.data) + m * x.row_stride + n;
  if (vector) {
    *reinterpret_cast<uint2*>(row) = make_uint2(pack_pair<T>(v[0], v[1]), pack_pair<T>(v[2], v[3]));
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (n + j < N) row[j] = from_float<T>(v[j]);
    }
  }
}

__device__ inline bool epilogue_matrix_vectorizable(const Matrix& x) {
  return x.data == nullptr || (is_aligned(x.data, 8) && x.row_stride % 4 == 0);
}

template <typename T, bool kATransposed, bool kBTransposed>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const GemmParams p) {
  using ATile = OperandTile<kATransposed>;
  using BTile = OperandTile<kBTransposed>;
  extern __shared__ __align__(128) uint8_t shared[];

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int warp_m0 = (warp / kWarpsN) * kWarpM;
  const int warp_n0 = (warp % kWarpsN) * kWarpN;

  // Grouped raster: kGroupM block rows advance together along N.
  const int blocks_m = ceil_div(p.M, kBlockM);
  const int blocks_n = ceil_div(p.N, kBlockN);
  const int per_group = kGroupM * blocks_n;
  const int first_block_m = (blockIdx.x / per_group) * kGroupM;
  const int group_rows = min(blocks_m - first_block_m, kGroupM);
  const int block_m = first_block_m + (blockIdx.x % per_group) % group_rows;
  const int block_n = (blockIdx.x % per_group) / group_rows;
  const int m0 = block_m * kBlockM;
  const int n0 = block_n * kBlockN;

  const bool a_vector = operand_vectorizable<kATransposed>(p.a, p.M, p.K);
  const bool b_vector = operand_vectorizable<kBTransposed>(p.b, p.N, p.K);
  const int num_k_tiles = ceil_div(p.K, kBlockK);
  auto load_stage = [&](int kt) {
    if (kt < num_k_tiles) {
      uint8_t* stage = shared + (kt % kStages) * kStageBytes;
      load_operand_tile<T, kATransposed>(stage, p.a, m0, p.M, kt * kBlockK, p.K, a_vector, tid);
      load_operand_tile<T, kBTransposed>(stage + kTileBytes, p.b, n0, p.N, kt * kBlockK, p.K, b_vector, tid);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int kt = 0; kt < kStages - 1; ++kt) load_stage(kt);

  float acc[kMTiles][kNTiles][4] = {};
  for (int kt = 0; kt < num_k_tiles; ++kt) {
    // Tile kt has landed; every warp is done with the stage the next load overwrites (tile kt - 1's).
    cp_async_wait<kStages - 2>();
    __syncthreads();
    load_stage(kt + kStages - 1);
    const uint32_t a_tile = shared_address(shared + (kt % kStages) * kStageBytes);
    const uint32_t b_tile = a_tile + kTileBytes;
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += 16) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        if constexpr (kATransposed) {
          load_a_transposed<ATile>(a[mt], a_tile, warp_m0 + mt * 16, kk, lane);
        } else {
          load_a<ATile>(a[mt], a_tile, warp_m0 + mt * 16, kk, lane);
        }
      }
      uint32_t b[kNTiles / 2][4];
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        if constexpr (kBTransposed) {
          load_b_pair_transposed<BTile>(b[np], b_tile, warp_n0 + np * 16, kk, lane);
        } else {
          load_b_pair<BTile>(b[np], b_tile, warp_n0 + np * 16, kk, lane);
        }
      }
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
          mma_16x8x16<T>(acc[mt][2 * np], a[mt], b[np][0], b[np][1]);
          mma_16x8x16<T>(acc[mt][2 * np + 1], a[mt], b[np][2], b[np][3]);
        }
      }
    }
  }

  // Epilogue, 1: the float32 tile goes to shared memory (the pipeline buffers are free once every
  // copy has landed and every warp is past its last mma).
  cp_async_wait<0>();
  __syncthreads();
  float* staging = reinterpret_cast<float*>(shared);
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      const int row = warp_m0 + mt * 16 + accumulator_row(lane, 0);
      const int col = warp_n0 + nt * 8 + accumulator_col(lane, 0);
      *reinterpret_cast<float2*>(staging + row * kStagingStride + col) = make_float2(acc[mt][nt][0], acc[mt][nt][1]);
      *reinterpret_cast<float2*>(staging + (row + 8) * kStagingStride + col) =
          make_float2(acc[mt][nt][2], acc[mt][nt][3]);
    }
  }
  __syncthreads();

  // Epilogue, 2: each warp takes rows warp, warp + 4, ...; lane l owns columns 4l..4l+3, so a warp
  // reads and writes whole 128-column rows.
  const int col = 4 * lane;
  const int n = n0 + col;
  const bool vector = n + 3 < p.N && epilogue_matrix_vectorizable(p.out) &&
                      epilogue_matrix_vectorizable(p.activation_out) && epilogue_matrix_vectorizable(p.residual) &&
                      epilogue_matrix_vectorizable(p.activation_grad_input);
  float bias[4] = {};
  if (p.bias != nullptr) {
#pragma unroll
    for (int j = 0; j < 4; ++j) bias[j] = n + j < p.N ? to_float(static_cast<const T*>(p.bias)[n + j]) : 0.0f;
  }
  const bool backward = p.activation_grad_input.data != nullptr;
  float column_sum[4] = {};
  for (int row = warp; row < kBlockM && m0 + row < p.M; row += kWarps) {
    const int m = m0 + row;
    const float4 staged = *reinterpret_cast<const float4*>(staging + row * kStagingStride + col);
    float v[4] = {staged.x + bias[0], staged.y + bias[1], staged.z + bias[2], staged.w + bias[3]};
    if (backward) {
      float h[4], activated[4];
      load_four<T>(p.activation_grad_input, m, n, p.N, vector, h);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float derivative;
        activation_and_derivative(p.activation, h[j], activated[j], derivative);
        v[j] *= derivative;
      }
      if (p.activation_out.data != nullptr) store_four<T>(p.activation_out, m, n, p.N, vector, activated);
    } else if (p.activation_out.data != nullptr) {
      float activated[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) activated[j] = activation_forward(p.activation, v[j]);
      store_four<T>(p.activation_out, m, n, p.N, vector, activated);
    } else if (p.residual.data != nullptr) {
      float r[4];
      load_four<T>(p.residual, m, n, p.N, vector, r);
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] += r[j];
    }
    store_four<T>(p.out, m, n, p.N, vector, v);
#pragma unroll
    for (int j = 0; j < 4; ++j) column_sum[j] += v[j];
  }

  // Bias gradient: this block's column sums, warps added in a fixed order (deterministic).
  if (p.bias_grad_partial != nullptr) {
    float* warp_sums = reinterpret_cast<float*>(shared + kSharedBytes - kColumnSumBytes);
#pragma unroll
    for (int j = 0; j < 4; ++j) warp_sums[warp * kBlockN + col + j] = column_sum[j];
    __syncthreads();
    if (tid < kBlockN && n0 + tid < p.N) {
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += warp_sums[w * kBlockN + tid];
      p.bias_grad_partial[static_cast<int64_t>(block_m) * p.N + n0 + tid] = sum;
    }
  }
}

template <typename T, bool kATransposed, bool kBTransposed>
cudaError_t launch_gemm(GemmParams p, cudaStream_t stream) {
  p.num_threads = kThreads;
  p.shared_bytes = kSharedBytes;
  auto kernel = gemm_kernel<T, kATransposed, kBTransposed>;
  const cudaError_t error = allow_shared_memory(kernel, p.shared_bytes);
  if (error != cudaSuccess) return error;
  const int blocks = ceil_div(p.M, kBlockM) * ceil_div(p.N, kBlockN);
  kernel<<<blocks, p.num_threads, p.shared_bytes, stream>>>(p);
  return cudaGetLastError();
}

// A transposed view (M or N contiguous) is read with the [k][mn] tiles; anything else as K-major.
inline bool is_transposed(const Matrix& x) { return x.row_stride == 1 && x.col_stride != 1; }

template <typename T>
cudaError_t launch_gemm_for_layout(const GemmParams& p, cudaStream_t stream) {
  const bool a_transposed = is_transposed(p.a);
  const bool b_transposed = is_transposed(p.b);
  if (a_transposed) {
    return b_transposed ? launch_gemm<T, true, true>(p, stream) : launch_gemm<T, true, false>(p, stream);
  }
  return b_transposed ? launch_gemm<T, false, true>(p, stream) : launch_gemm<T, false, false>(p, stream);
}

bool epilogue_matrix_ok(const Matrix& x) { return x.data == nullptr || x.col_stride == 1; }

}  // namespace

const char* gemm_unsupported_reason(DType dtype) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) {
    return "the CUDA GEMM runs bfloat16 and float16 on tensor cores; float32 runs on Triton";
  }
  return nullptr;
}

cudaError_t gemm(const GemmParams& p, cudaStream_t stream) {
  const bool forward_activation = p.activation_out.data != nullptr && p.activation_grad_input.data == nullptr;
  if (gemm_unsupported_reason(p.dtype) != nullptr || p.M < 0 || p.N < 0 || p.K < 0) return cudaErrorInvalidValue;
  // Nothing to write; the data pointers of empty tensors may be null, so they are checked after this.
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (p.out.data == nullptr || !epilogue_matrix_ok(p.out) || !epilogue_matrix_ok(p.activation_out) ||
      !epilogue_matrix_ok(p.residual) || !epilogue_matrix_ok(p.activation_grad_input) ||
      (p.residual.data != nullptr && (forward_activation || p.activation_grad_input.data != nullptr)) ||
      (p.bias_grad_partial != nullptr && p.bias_grad_block_m != kBlockM)) {
    return cudaErrorInvalidValue;
  }
  // Every device from sm_80 on runs this mma.sync kernel; an sm_90a wgmma/TMA kernel would be chosen here.
  const cudaError_t error = require_sm80();
  if (error != cudaSuccess) return error;
  return p.dtype == DType::kBFloat16 ? launch_gemm_for_layout<__nv_bfloat16>(p, stream)
                                     : launch_gemm_for_layout<__half>(p, stream);
}

}  // namespace fastgpt::cuda
