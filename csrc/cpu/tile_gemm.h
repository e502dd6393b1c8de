// Small float32 GEMMs on cache-resident tiles, for the attention kernels.
//
// Included inside namespace fastgpt::cpu::FASTGPT_ISA after simd.h (no include guard: one copy per
// instruction set). A register-blocked micro-kernel keeps a kMicroRows x (kMicroVecs * kWidth) block
// of C in vector registers for the whole contraction: each step loads kMicroVecs vectors of a row of
// B, broadcasts one element of A per row of C, and issues kMicroRows * kMicroVecs multiply-adds (fused
// where the instruction set has FMA).
//
// The product is always summed from 0 in the registers and added to C (when accumulating) once at the
// end, never continued from C's value: a caller that accumulates many products into C, or splits a long
// depth into several calls, so adds short float32 sums instead of extending one long float32 chain,
// whose rounding error grows with its length. C is float32, or float64 for accumulators that sum very
// many products.

// 6 x 4 accumulators + 4 B vectors + 1 broadcast = 29 of AVX-512's 32 registers; 6 x 2 + 2 + 1 = 15
// of the 16 that AVX2, SSE and NEON-as-baseline are given.
constexpr int kMicroRows = 6;
constexpr int kMicroVecs = FASTGPT_SIMD_REGISTERS >= 32 ? 4 : 2;

// c[kRows x kVecs*kWidth] (+)= a[kRows x depth] @ b[depth x kVecs*kWidth].
// a's element (i, k) is a[i * lda + k], or a[k * lda + i] when kTransposedA (a is stored as a^T).
template <int kRows, int kVecs, bool kTransposedA, typename C>
__attribute__((noinline)) void gemm_micro(int64_t depth, const float* a, int64_t lda, const float* b, int64_t ldb,
                                          C* c, int64_t ldc, bool accumulate) {
  Vec acc[kRows][kVecs];
  for (int i = 0; i < kRows; ++i) {
    for (int v = 0; v < kVecs; ++v) acc[i][v] = splat(0.0f);
  }
  for (int64_t k = 0; k < depth; ++k) {
    Vec b_row[kVecs];
    for (int v = 0; v < kVecs; ++v) b_row[v] = load(b + k * ldb + v * kWidth);
    for (int i = 0; i < kRows; ++i) {
      Vec a_element = splat(kTransposedA ? a[k * lda + i] : a[i * lda + k]);
      for (int v = 0; v < kVecs; ++v) acc[i][v] += a_element * b_row[v];
    }
  }
  for (int i = 0; i < kRows; ++i) {
    for (int v = 0; v < kVecs; ++v) {
      C* out = c + i * ldc + v * kWidth;
      if constexpr (sizeof(C) == sizeof(double)) {
        VecDouble sum = __builtin_convertvector(acc[i][v], VecDouble);
        if (accumulate) {
          VecDouble previous;
          __builtin_memcpy(&previous, out, sizeof previous);
          sum += previous;
        }
        __builtin_memcpy(out, &sum, sizeof sum);
      } else {
        store(out, accumulate ? load(out) + acc[i][v] : acc[i][v]);
      }
    }
  }
}

// Picks the micro-kernel instantiation for a (rows <= kMicroRows, vecs <= kMicroVecs) edge block.
template <bool kTransposedA, int kRows, int kVecs, typename C>
inline void gemm_micro_vecs(int vecs, int64_t depth, const float* a, int64_t lda, const float* b, int64_t ldb,
                            C* c, int64_t ldc, bool accumulate) {
  if constexpr (kVecs > 1) {
    if (vecs < kVecs) {
      gemm_micro_vecs<kTransposedA, kRows, kVecs - 1>(vecs, depth, a, lda, b, ldb, c, ldc, accumulate);
      return;
    }
  }
  gemm_micro<kRows, kVecs, kTransposedA>(depth, a, lda, b, ldb, c, ldc, accumulate);
}

template <bool kTransposedA, int kRows, typename C>
inline void gemm_micro_rows(int rows, int vecs, int64_t depth, const float* a, int64_t lda, const float* b,
                            int64_t ldb, C* c, int64_t ldc, bool accumulate) {
  if constexpr (kRows > 1) {
    if (rows < kRows) {
      gemm_micro_rows<kTransposedA, kRows - 1>(rows, vecs, depth, a, lda, b, ldb, c, ldc, accumulate);
      return;
    }
  }
  gemm_micro_vecs<kTransposedA, kRows, kMicroVecs>(vecs, depth, a, lda, b, ldb, c, ldc, accumulate);
}

// c[rows x cols] (+)= a[rows x depth] @ b[depth x cols], row-major with the given leading dimensions,
// a and b float32, c float32 or float64; a is read transposed (stored depth x rows) when transposed_a.
// cols must be a multiple of kWidth; rows and depth are free (depth 0 leaves c, or zeros it without
// accumulate).
template <bool kTransposedA, typename C>
inline void gemm(int64_t rows, int64_t cols, int64_t depth, const float* a, int64_t lda, const float* b, int64_t ldb,
                 C* c, int64_t ldc, bool accumulate) {
  constexpr int64_t kBlockCols = kMicroVecs * kWidth;
  for (int64_t n = 0; n < cols; n += kBlockCols) {
    int vecs = static_cast<int>((cols - n < kBlockCols ? cols - n : kBlockCols) / kWidth);
    for (int64_t m = 0; m < rows; m += kMicroRows) {
      int block_rows = static_cast<int>(rows - m < kMicroRows ? rows - m : kMicroRows);
      const float* a_block = kTransposedA ? a + m : a + m * lda;
      gemm_micro_rows<kTransposedA, kMicroRows>(block_rows, vecs, depth, a_block, lda, b + n, ldb, c + m * ldc + n,
                                                ldc, accumulate);
    }
  }
}
