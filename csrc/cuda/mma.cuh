// Thin wrappers over the PTX instructions the tensor-core kernels are built from (sm_80+):
//   cp.async (16-byte, L2-only, with zero fill), commit/wait groups;
//   ldmatrix (x4, plain and .trans);
//   mma.sync.aligned.m16n8k16 with float32 accumulators, for bfloat16 and float16;
//   ex2.approx, and packing float pairs into 16-bit pairs.
// Fragment layouts and shared-memory tiles are in tile.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "../params.h"

namespace fastgpt::cuda {

// The element type of each 16-bit DType, and the DType of each element type.
template <DType kDType>
struct ElementType;
template <>
struct ElementType<DType::kBFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct ElementType<DType::kFloat16> {
  using type = __half;
};

template <typename T>
constexpr bool is_16bit_float = std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// log2(e): exp(x) == exp2(x * kLog2e), how the softmax kernels reach the special-function unit's ex2.
constexpr float kLog2e = 1.4426950408889634f;

__host__ __device__ inline bool is_aligned(const void* pointer, int bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % bytes == 0;
}

// ---------------------------------------------------------------------------------------------
// Conversions

template <typename T>
__host__ __device__ inline float to_float(T x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else {
    return __half2float(x);
  }
}

template <typename T>
__host__ __device__ inline T from_float(float x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return __float2half_rn(x);
  }
}

// Two floats rounded to 16 bits each, `lo` in the low half: the element order of mma fragments.
template <typename T>
__host__ __device__ inline uint32_t pack_pair(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

// The two 16-bit values of a packed pair, as floats (low half first).
template <typename T>
__host__ __device__ inline void unpack_pair(uint32_t v, float& lo, float& hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 p = *reinterpret_cast<__nv_bfloat162*>(&v);
    lo = __low2float(p);
    hi = __high2float(p);
  } else {
    __half2 p = *reinterpret_cast<__half2*>(&v);
    lo = __low2float(p);
    hi = __high2float(p);
  }
}

#if defined(__CUDACC__)

// ---------------------------------------------------------------------------------------------
// Asynchronous copies (sm_80+)

__device__ inline uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Copies 16 bytes from global to shared memory through L2 only (.cg: the tiles are reused from shared
// memory, not L1). When `valid` is false nothing is read and the 16 bytes are zero-filled (src-size 0);
// callers still pass an address inside the tensor, so that no out-of-range address is ever formed.
__device__ inline void cp_async_16(uint32_t shared_dst, const void* global_src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_dst), "l"(global_src), "r"(src_bytes)
               : "memory");
}

// Copies 4 bytes (one float statistic), zero-filling when `valid` is false.
__device__ inline void cp_async_4(uint32_t shared_dst, const void* global_src, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared_dst), "l"(global_src), "r"(src_bytes)
               : "memory");
}

// Closes the group of copies issued since the last commit. Every thread commits once per pipeline
// step, also when it issued no copy, so that group counts agree across threads and steps.
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `kPending` of this thread's most recent groups are still in flight. Other
// threads' copies are visible only after a following __syncthreads().
template <int kPending>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// ---------------------------------------------------------------------------------------------
// ldmatrix: four 8x8 matrices of 16-bit elements. Lanes 8i..8i+7 give the addresses of the eight
// 16-byte rows of matrix i; register i of lane l receives matrix i's elements
//   plain:  (row l/4, cols 2(l%4), 2(l%4)+1)
//   .trans: (rows 2(l%4), 2(l%4)+1, col l/4)
// with the lower-indexed element in the low half.

__device__ inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t shared_src) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_src));
}

__device__ inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t shared_src) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_src));
}

// ---------------------------------------------------------------------------------------------
// d += a @ b for one warp: a is 16x16 (row-major fragment, 4 registers), b is 16x8 (column-major
// fragment, 2 registers), d is 16x8 float32 (4 registers). Layouts: tile.cuh.

template <typename T>
__device__ inline void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(is_16bit_float<T>, "mma.sync m16n8k16 takes bfloat16 or float16 operands");
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// 2^x on the special-function unit (flushes subnormals; ex2.approx(-inf) = +0).
__device__ inline float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

#endif  // __CUDACC__

}  // namespace fastgpt::cuda
