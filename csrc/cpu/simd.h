// Portable SIMD vectors (GCC/clang vector extensions) and the vector maths the CPU kernels share.
//
// Included by each kernel source inside namespace fastgpt::cpu::FASTGPT_ISA, once per instruction set
// (see foreach_isa.h), so it has no include guard: every pass gets its own copy, compiled for its
// target. A Vec holds FASTGPT_SIMD_WIDTH floats, one hardware register (zmm, ymm or xmm/NEON q).
// It needs <cstdint> and kernels.h (BFloat16) to be included first.

constexpr int kWidth = FASTGPT_SIMD_WIDTH;

typedef float Vec __attribute__((vector_size(4 * FASTGPT_SIMD_WIDTH)));
typedef int32_t VecInt __attribute__((vector_size(4 * FASTGPT_SIMD_WIDTH)));
typedef uint32_t VecBits __attribute__((vector_size(4 * FASTGPT_SIMD_WIDTH)));
typedef uint16_t VecHalfBits __attribute__((vector_size(2 * FASTGPT_SIMD_WIDTH)));
// kWidth doubles (two registers), for sums over many rows that float32 would round too often. Convert
// with __builtin_convertvector in place: passing it to or from a function would change the ABI.
typedef double VecDouble __attribute__((vector_size(8 * FASTGPT_SIMD_WIDTH)));

// x - 0 is exactly x (signed zeros included), so this compiles to a single broadcast.
inline Vec splat(float x) { return x - Vec{}; }

inline Vec vmax(Vec a, Vec b) { return a > b ? a : b; }

inline Vec vselect(VecInt mask, Vec if_true, Vec if_false) { return mask ? if_true : if_false; }

// Lane i holds i + start.
inline VecInt iota(int32_t start) {
  VecInt v;
  for (int i = 0; i < kWidth; ++i) v[i] = start + i;
  return v;
}

// ---------------------------------------------------------------------------------------------
// Loads and stores of float32 and bfloat16 (converted to and from float32 in registers).

inline float to_float(float x) { return x; }
inline float to_float(BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) {
  return x;
}
// Round to nearest even; NaN stays a (quiet) NaN.
template <>
inline BFloat16 from_float<BFloat16>(float x) {
  uint32_t bits;
  __builtin_memcpy(&bits, &x, sizeof bits);
  if (x != x) return BFloat16{static_cast<uint16_t>((bits >> 16) | 0x40)};
  bits += 0x7FFF + ((bits >> 16) & 1);
  return BFloat16{static_cast<uint16_t>(bits >> 16)};
}

inline Vec load(const float* p) {
  Vec v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline Vec load(const BFloat16* p) {
  VecHalfBits half;
  __builtin_memcpy(&half, p, sizeof half);
  VecBits bits = __builtin_convertvector(half, VecBits) << 16;
  return (Vec)bits;  // a same-size vector cast reinterprets the bits
}

inline void store(float* p, Vec v) { __builtin_memcpy(p, &v, sizeof v); }
inline void store(BFloat16* p, Vec v) {
  VecBits bits = (VecBits)v;
  VecBits rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
  VecBits quiet_nan = (bits >> 16) | 0x40;
  VecBits result = v != v ? quiet_nan : rounded;
  VecHalfBits half = __builtin_convertvector(result, VecHalfBits);
  __builtin_memcpy(p, &half, sizeof half);
}

// The first n (< kWidth) elements; the other lanes are 0.
template <typename T>
inline Vec load_partial(const T* p, int64_t n) {
  T buffer[kWidth] = {};
  __builtin_memcpy(buffer, p, n * sizeof(T));
  return load(buffer);
}
template <typename T>
inline void store_partial(T* p, Vec v, int64_t n) {
  T buffer[kWidth];
  store(buffer, v);
  __builtin_memcpy(p, buffer, n * sizeof(T));
}

// Columns [c, c + kWidth) of a row of `cols` elements: the last vector of a row whose length is not a
// multiple of kWidth holds only its remaining columns (the other lanes load as 0, and are not stored).
template <typename T>
inline Vec load_columns(const T* row, int64_t c, int64_t cols) {
  return c + kWidth <= cols ? load(row + c) : load_partial(row + c, cols - c);
}
template <typename T>
inline void store_columns(T* row, int64_t c, int64_t cols, Vec v) {
  if (c + kWidth <= cols) {
    store(row + c, v);
  } else {
    store_partial(row + c, v, cols - c);
  }
}

// Lanes summed in index order, so every instruction set adds a row the same way.
inline float reduce_sum(Vec v) {
  float sum = 0.0f;
  for (int i = 0; i < kWidth; ++i) sum += v[i];
  return sum;
}
// NaN in any lane gives NaN.
inline float reduce_max(Vec v) {
  float result = v[0];
  for (int i = 1; i < kWidth; ++i) result = (v[i] > result || v[i] != v[i]) ? v[i] : result;
  return result;
}

// ---------------------------------------------------------------------------------------------
// exp2 and exp. 2^x = 2^n * 2^f with n = round(x) and f in [-0.5, 0.5]; 2^f = e^(f ln 2) by its
// Taylor series to degree 7, whose truncation error (|f ln 2| <= 0.347) is below 5e-9, under float32's
// rounding. Results below 2^-126 flush to 0 (masked scores are -inf), above 2^128 give +inf; NaN stays
// NaN.

constexpr float kLn2 = 0.693147180559945309f;
constexpr float kLog2e = 1.442695040888963407f;

inline Vec exp2(Vec x) {
  Vec clamped = x < -126.0f ? splat(-126.0f) : x;
  clamped = clamped > 127.0f ? splat(127.0f) : clamped;
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (|clamped| < 2^22).
  const float round_shift = 12582912.0f;
  Vec n = (clamped + round_shift) - round_shift;
  Vec t = (clamped - n) * kLn2;
  Vec poly = splat(1.0f / 5040.0f);
  poly = poly * t + 1.0f / 720.0f;
  poly = poly * t + 1.0f / 120.0f;
  poly = poly * t + 1.0f / 24.0f;
  poly = poly * t + 1.0f / 6.0f;
  poly = poly * t + 0.5f;
  poly = poly * t + 1.0f;
  poly = poly * t + 1.0f;
  VecInt exponent = (__builtin_convertvector(n, VecInt) + 127) << 23;
  Vec result = poly * (Vec)exponent;
  result = x < -126.0f ? splat(0.0f) : result;
  return x >= 128.0f ? splat(__builtin_inff()) : result;
}

inline Vec exp(Vec x) { return exp2(x * kLog2e); }
