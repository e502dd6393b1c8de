// LayerNorm over the last dimension with a fused residual add, forward and backward.
//
// A row is held in registers by `threads_per_row` threads (a power of two from 32 to 512), each with up
// to 32 elements as four 16-byte chunks (vectorised path: cols % 8 == 0 and 16-byte aligned rows) or up
// to 8 single elements (scalar path); statistics are float32, the variance two-pass from the
// registers. Small rows share a block (several rows per block), large rows span several warps.
// The backward writes dx in one pass over x and dy and per-block partial sums of dweight and dbias,
// which column_sums (column_sums.cu) reduces in a fixed order: no atomics, deterministic.
#include <cuda_runtime.h>

#include <type_traits>

#include "device.cuh"
#include "launch.h"
#include "mma.cuh"

namespace fastgpt::cuda {

namespace {

constexpr int kMaxCols = 16384;
constexpr int kMaxScalarCols = 4096;
constexpr int kMinBlockThreads = 256;  // small rows: 8 rows of 32 threads a block
// At most 512 threads a row (and a block), so that __launch_bounds__ leaves 128 registers a thread:
// the backward holds 64 float32 partial sums plus the packed row.
constexpr int kMaxThreadsPerRow = 512;
constexpr int kVectorChunksPerThread = 4;    // 512 x 4 x 8 = 16384 columns
constexpr int kScalarElementsPerThread = 8;   // 512 x 8 = 4096 columns

template <typename T, bool kVector>
struct RowLayout {
  static constexpr int kWidth = kVector ? 8 : 1;  // elements per unit (a 16-byte chunk or one element)
  static constexpr int kUnits = kVector ? kVectorChunksPerThread : kScalarElementsPerThread;  // units a thread holds
  using Raw = std::conditional_t<kVector, uint4, T>;  // a unit as stored in memory
};

__host__ __device__ inline int threads_per_row(int cols, bool vector) {
  const int per_thread = vector ? 8 * kVectorChunksPerThread : kScalarElementsPerThread;
  const int needed = (cols + per_thread - 1) / per_thread;
  int threads = 32;
  while (threads < needed && threads < kMaxThreadsPerRow) threads *= 2;
  return threads;
}

__host__ __device__ inline int block_threads(int cols, bool vector) {
  const int per_row = threads_per_row(cols, vector);
  return per_row > kMinBlockThreads ? per_row : kMinBlockThreads;
}

template <typename T, bool kVector>
__device__ inline typename RowLayout<T, kVector>::Raw load_raw(const T* row, int u) {
  if constexpr (kVector) {
    return *reinterpret_cast<const uint4*>(row + 8 * u);
  } else {
    return row[u];
  }
}

template <typename T, bool kVector>
__device__ inline void raw_to_floats(const typename RowLayout<T, kVector>::Raw& raw, float (&v)[RowLayout<T, kVector>::kWidth]) {
  if constexpr (kVector) {
    unpack_pair<T>(raw.x, v[0], v[1]);
    unpack_pair<T>(raw.y, v[2], v[3]);
    unpack_pair<T>(raw.z, v[4], v[5]);
    unpack_pair<T>(raw.w, v[6], v[7]);
  } else {
    v[0] = to_float(raw);
  }
}

// Loads unit `u` (a 16-byte chunk or one element) of a row as floats.
template <typename T, bool kVector>
__device__ inline void load_unit(const T* row, int u, float (&v)[RowLayout<T, kVector>::kWidth]) {
  raw_to_floats<T, kVector>(load_raw<T, kVector>(row, u), v);
}

template <typename T, bool kVector>
__device__ inline void store_unit(T* row, int u, const float (&v)[RowLayout<T, kVector>::kWidth]) {
  if constexpr (kVector) {
    uint4 raw;
    raw.x = pack_pair<T>(v[0], v[1]);
    raw.y = pack_pair<T>(v[2], v[3]);
    raw.z = pack_pair<T>(v[4], v[5]);
    raw.w = pack_pair<T>(v[6], v[7]);
    *reinterpret_cast<uint4*>(row + 8 * u) = raw;
  } else {
    row[u] = from_float<T>(v[0]);
  }
}

// Unit u of an optional (cols) vector, or `fill` when it is absent.
template <typename T, bool kVector>
__device__ inline void load_parameter(const void* vector, int u, float fill, float (&v)[RowLayout<T, kVector>::kWidth]) {
  if (vector == nullptr) {
#pragma unroll
    for (int j = 0; j < RowLayout<T, kVector>::kWidth; ++j) v[j] = fill;
  } else {
    load_unit<T, kVector>(static_cast<const T*>(vector), u, v);
  }
}

__device__ inline float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the threads of a row (a power of two >= 32 threads, so rows never split a warp). Every
// thread of the block must call it; rows wider than a warp add their warps' sums in a fixed order.
__device__ inline float row_sum(float v, int per_row, float* scratch) {
  v = warp_sum(v);
  if (per_row <= 32) return v;
  const int warp = threadIdx.x / 32;
  const int warps_per_row = per_row / 32;
  __syncthreads();  // the previous reduction's readers are done with scratch
  if (threadIdx.x % 32 == 0) scratch[warp] = v;
  __syncthreads();
  const int first = warp - warp % warps_per_row;
  float total = 0.0f;
  for (int w = 0; w < warps_per_row; ++w) total += scratch[first + w];
  return total;
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kMaxThreadsPerRow) layer_norm_forward_kernel(const LayerNormParams p) {
  using Layout = RowLayout<T, kVector>;
  constexpr int kWidth = Layout::kWidth;
  __shared__ float scratch[32];
  const int per_row = threads_per_row(p.cols, kVector);
  const int rows_per_block = blockDim.x / per_row;
  const int index = threadIdx.x % per_row;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / per_row;
  const bool active = row < p.rows;
  const int units = p.cols / kWidth;

  const T* x = static_cast<const T*>(p.x.data) + row * p.x.row_stride;
  float values[Layout::kUnits][kWidth];
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < Layout::kUnits; ++i) {
    const int u = index + i * per_row;
    if (active && u < units) {
      load_unit<T, kVector>(x, u, values[i]);
      if (p.residual.data != nullptr) {
        float r[kWidth];
        load_unit<T, kVector>(static_cast<const T*>(p.residual.data) + row * p.residual.row_stride, u, r);
        // x + residual rounded to T, as stored in residual_out, is what gets normalised.
#pragma unroll
        for (int j = 0; j < kWidth; ++j) values[i][j] = to_float(from_float<T>(values[i][j] + r[j]));
        store_unit<T, kVector>(static_cast<T*>(p.residual_out.data) + row * p.residual_out.row_stride, u, values[i]);
      }
#pragma unroll
      for (int j = 0; j < kWidth; ++j) sum += values[i][j];
    } else {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) values[i][j] = 0.0f;
    }
  }
  const float mean = row_sum(sum, per_row, scratch) / p.cols;
  float squares = 0.0f;
#pragma unroll
  for (int i = 0; i < Layout::kUnits; ++i) {
    if (index + i * per_row < units) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const float centred = values[i][j] - mean;
        squares += centred * centred;
      }
    }
  }
  const float rstd = rsqrtf(row_sum(squares, per_row, scratch) / p.cols + p.eps);

  if (!active) return;  // no block-wide synchronisation follows
  T* out = static_cast<T*>(p.out.data) + row * p.out.row_stride;
#pragma unroll
  for (int i = 0; i < Layout::kUnits; ++i) {
    const int u = index + i * per_row;
    if (u < units) {
      float w[kWidth], b[kWidth], y[kWidth];
      load_parameter<T, kVector>(p.weight, u, 1.0f, w);
      load_parameter<T, kVector>(p.bias, u, 0.0f, b);
#pragma unroll
      for (int j = 0; j < kWidth; ++j) y[j] = (values[i][j] - mean) * rstd * w[j] + b[j];
      store_unit<T, kVector>(out, u, y);
    }
  }
  if (index == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
}

// dx = rstd * (w dy - mean(w dy) - xhat * mean(w dy xhat)) (+ dresidual_out); per block, the column
// sums of dy * xhat and dy over the rows it handled go to row blockIdx.x of the partial buffers. The
// row stays packed in registers between the reduction and dx; xhat and w dy are recomputed.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kMaxThreadsPerRow) layer_norm_backward_kernel(const LayerNormParams p) {
  using Layout = RowLayout<T, kVector>;
  using Raw = typename Layout::Raw;
  constexpr int kWidth = Layout::kWidth;
  __shared__ float scratch[32];
  extern __shared__ float column_sums_shared[];  // (2, cols) when several rows share a block
  const int per_row = threads_per_row(p.cols, kVector);
  const int rows_per_block = blockDim.x / per_row;
  const int group = threadIdx.x / per_row;
  const int index = threadIdx.x % per_row;
  const int units = p.cols / kWidth;

  float dweight[Layout::kUnits][kWidth] = {};
  float dbias[Layout::kUnits][kWidth] = {};
  // Every thread runs the same number of iterations (the reductions synchronise the block).
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block; first < p.rows;
       first += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t row = first + group;
    const bool active = row < p.rows;
    const float mean = active ? p.mean[row] : 0.0f;
    const float rstd = active ? p.rstd[row] : 0.0f;
    Raw x_raw[Layout::kUnits], dy_raw[Layout::kUnits];
    float sum_wdy = 0.0f, sum_wdy_xhat = 0.0f;
#pragma unroll
    for (int i = 0; i < Layout::kUnits; ++i) {
      const int u = index + i * per_row;
      if (active && u < units) {
        x_raw[i] = load_raw<T, kVector>(static_cast<const T*>(p.x.data) + row * p.x.row_stride, u);
        dy_raw[i] = load_raw<T, kVector>(static_cast<const T*>(p.dout.data) + row * p.dout.row_stride, u);
        float x[kWidth], dy[kWidth], w[kWidth];
        raw_to_floats<T, kVector>(x_raw[i], x);
        raw_to_floats<T, kVector>(dy_raw[i], dy);
        load_parameter<T, kVector>(p.weight, u, 1.0f, w);
#pragma unroll
        for (int j = 0; j < kWidth; ++j) {
          const float xhat = (x[j] - mean) * rstd;
          const float wdy = w[j] * dy[j];
          sum_wdy += wdy;
          sum_wdy_xhat += wdy * xhat;
          dweight[i][j] += dy[j] * xhat;
          dbias[i][j] += dy[j];
        }
      }
    }
    const float mean_wdy = row_sum(sum_wdy, per_row, scratch) / p.cols;
    const float mean_wdy_xhat = row_sum(sum_wdy_xhat, per_row, scratch) / p.cols;
    if (active) {
#pragma unroll
      for (int i = 0; i < Layout::kUnits; ++i) {
        const int u = index + i * per_row;
        if (u < units) {
          float x[kWidth], dy[kWidth], w[kWidth], dx[kWidth];
          raw_to_floats<T, kVector>(x_raw[i], x);
          raw_to_floats<T, kVector>(dy_raw[i], dy);
          load_parameter<T, kVector>(p.weight, u, 1.0f, w);
#pragma unroll
          for (int j = 0; j < kWidth; ++j) {
            const float xhat = (x[j] - mean) * rstd;
            dx[j] = rstd * (w[j] * dy[j] - mean_wdy - xhat * mean_wdy_xhat);
          }
          if (p.dresidual_out.data != nullptr) {
            float extra[kWidth];
            load_unit<T, kVector>(static_cast<const T*>(p.dresidual_out.data) + row * p.dresidual_out.row_stride, u,
                                  extra);
#pragma unroll
            for (int j = 0; j < kWidth; ++j) dx[j] += extra[j];
          }
          store_unit<T, kVector>(static_cast<T*>(p.dx.data) + row * p.dx.row_stride, u, dx);
        }
      }
    }
  }

  // Partial sums: with one row per block straight from registers; otherwise the row groups add into
  // shared memory one after another (a fixed order), then the block writes the sums out.
  float* dweight_out = p.dweight_partial == nullptr ? nullptr : p.dweight_partial + static_cast<int64_t>(blockIdx.x) * p.cols;
  float* dbias_out = p.dbias_partial == nullptr ? nullptr : p.dbias_partial + static_cast<int64_t>(blockIdx.x) * p.cols;
  if (rows_per_block == 1) {
#pragma unroll
    for (int i = 0; i < Layout::kUnits; ++i) {
      const int u = index + i * per_row;
      if (u < units) {
#pragma unroll
        for (int j = 0; j < kWidth; ++j) {
          if (dweight_out != nullptr) dweight_out[u * kWidth + j] = dweight[i][j];
          if (dbias_out != nullptr) dbias_out[u * kWidth + j] = dbias[i][j];
        }
      }
    }
    return;
  }
  float* dweight_shared = column_sums_shared;
  float* dbias_shared = column_sums_shared + p.cols;
  for (int g = 0; g < rows_per_block; ++g) {
    if (group == g) {
#pragma unroll
      for (int i = 0; i < Layout::kUnits; ++i) {
        const int u = index + i * per_row;
        if (u < units) {
#pragma unroll
          for (int j = 0; j < kWidth; ++j) {
            const int c = u * kWidth + j;
            dweight_shared[c] = g == 0 ? dweight[i][j] : dweight_shared[c] + dweight[i][j];
            dbias_shared[c] = g == 0 ? dbias[i][j] : dbias_shared[c] + dbias[i][j];
          }
        }
      }
    }
    __syncthreads();
  }
  for (int c = threadIdx.x; c < p.cols; c += blockDim.x) {
    if (dweight_out != nullptr) dweight_out[c] = dweight_shared[c];
    if (dbias_out != nullptr) dbias_out[c] = dbias_shared[c];
  }
}

bool rows_vectorizable(const Matrix& m) {
  return m.data == nullptr || (is_aligned(m.data, 16) && m.row_stride % 8 == 0);
}

bool rows_ok(const Matrix& m) { return m.data == nullptr || m.col_stride == 1; }

template <typename T, bool kVector>
cudaError_t launch_forward(LayerNormParams p, cudaStream_t stream) {
  p.num_threads = block_threads(p.cols, kVector);
  const int64_t rows_per_block = p.num_threads / threads_per_row(p.cols, kVector);
  const int64_t blocks = (p.rows + rows_per_block - 1) / rows_per_block;
  layer_norm_forward_kernel<T, kVector><<<static_cast<unsigned>(blocks), p.num_threads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, bool kVector>
cudaError_t launch_backward(LayerNormParams p, cudaStream_t stream) {
  p.num_threads = block_threads(p.cols, kVector);
  const int rows_per_block = p.num_threads / threads_per_row(p.cols, kVector);
  const int shared_bytes = rows_per_block > 1 ? 2 * p.cols * static_cast<int>(sizeof(float)) : 0;
  layer_norm_backward_kernel<T, kVector><<<p.num_partials, p.num_threads, shared_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(const LayerNormParams& p, bool backward, cudaStream_t stream) {
  const bool vector = p.cols % 8 == 0 && rows_vectorizable(p.x) && rows_vectorizable(p.residual) &&
                      rows_vectorizable(p.residual_out) && rows_vectorizable(p.out) && rows_vectorizable(p.dout) &&
                      rows_vectorizable(p.dresidual_out) && rows_vectorizable(p.dx) && is_aligned(p.weight, 16) &&
                      is_aligned(p.bias, 16);
  if (!vector && p.cols > kMaxScalarCols) return cudaErrorInvalidValue;  // the scalar path covers 4096 columns
  if (backward) return vector ? launch_backward<T, true>(p, stream) : launch_backward<T, false>(p, stream);
  return vector ? launch_forward<T, true>(p, stream) : launch_forward<T, false>(p, stream);
}

bool params_ok(const LayerNormParams& p) {
  return layer_norm_unsupported_reason(p.cols, p.dtype) == nullptr && p.rows >= 0 && rows_ok(p.x) &&
         rows_ok(p.residual) && rows_ok(p.residual_out) && rows_ok(p.out) && rows_ok(p.dout) &&
         rows_ok(p.dresidual_out) && rows_ok(p.dx) && (p.residual.data == nullptr) == (p.residual_out.data == nullptr);
}

}  // namespace

const char* layer_norm_unsupported_reason(int cols, DType dtype) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) {
    return "the CUDA LayerNorm kernels run bfloat16 and float16; float32 runs on Triton";
  }
  if (cols > kMaxCols) return "the CUDA LayerNorm kernels hold a row in registers: at most 16384 columns";
  if (cols > kMaxScalarCols && cols % 8 != 0) {
    return "the CUDA LayerNorm kernels need a multiple of 8 columns above 4096 (16-byte chunks)";
  }
  return nullptr;
}

cudaError_t layer_norm_forward(const LayerNormParams& p, cudaStream_t stream) {
  if (!params_ok(p)) return cudaErrorInvalidValue;
  // Nothing to write; the data pointers of empty tensors may be null, so they are checked after this.
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  if (p.x.data == nullptr || p.out.data == nullptr || p.mean == nullptr || p.rstd == nullptr) {
    return cudaErrorInvalidValue;
  }
  return p.dtype == DType::kBFloat16 ? dispatch<__nv_bfloat16>(p, false, stream) : dispatch<__half>(p, false, stream);
}

int layer_norm_backward_num_partials(int64_t rows) {
  // About 2 blocks an SM keep enough loads in flight; at least 32 rows a block keep the partial
  // sums (num_partials x cols float32) small next to the rows themselves.
  const int64_t by_rows = (rows + 31) / 32;
  const int64_t by_device = 2 * static_cast<int64_t>(current_device_sm_count());
  return static_cast<int>(by_rows < by_device ? by_rows : by_device);
}

cudaError_t layer_norm_backward(const LayerNormParams& p, cudaStream_t stream) {
  if (!params_ok(p) || p.num_partials < 0 || (p.rows > 0 && p.num_partials == 0)) return cudaErrorInvalidValue;
  // Nothing to write; the data pointers of empty tensors may be null, so they are checked after this.
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  if (p.x.data == nullptr || p.dout.data == nullptr || p.dx.data == nullptr || p.mean == nullptr || p.rstd == nullptr) {
    return cudaErrorInvalidValue;
  }
  return p.dtype == DType::kBFloat16 ? dispatch<__nv_bfloat16>(p, true, stream) : dispatch<__half>(p, true, stream);
}

}  // namespace fastgpt::cuda
