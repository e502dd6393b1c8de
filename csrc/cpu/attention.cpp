// Causal attention on the CPU, forward and backward, FlashAttention-2 style.
//
// Forward: each (batch, head, query tile) task keeps the query tile, its running row maxima and sums
// and its output accumulator in float32 scratch, and streams the key/value tiles the causal mask lets
// it see (tiles entirely above the diagonal are skipped, not masked): S = Q K^T (computed transposed,
// with the softmax scale folded into Q), online softmax, O += P V. Memory is O(tile) per thread; the
// output and the logsumexp are the only things written. Scores stay in natural-log units and exp(s - max) is taken as
// exp2((s - max) * log2 e): the base change multiplies the small difference, not the score, so large
// scores lose no precision to it.
//
// Backward: delta = rowsum(dO * O), then for each (query tile, key tile) pair P is recomputed from the
// saved logsumexp (S summed exactly as the forward summed it: see backward_pair) and
//   dP = dO V^T,  dS = P * (dP - delta),  dV += P^T dO,  dK += dS^T Q,  dQ += dS K.
// Each pair's products are float32 sums of 64 terms, added to float64 accumulators (see backward_pair).
// No two threads ever add into the same accumulator, so the result is deterministic and independent of
// the thread count. Two schedules give bitwise identical results (same summation order):
//   - per kv head: one task per (batch, kv head) owns dK, dV of the whole head and dQ of its query
//     heads, doing the five GEMMs above per pair; used when these tasks keep every thread busy;
//   - per tile: pass 1 runs one task per (batch, kv head, key tile) for dK, dV; pass 2 one task per
//     (batch, head, query tile) for dQ, recomputing P and dS (seven GEMMs per pair instead of five, but
//     parallel over tiles when there are few heads).
// Inputs are float32 or bfloat16 with any strides (head_dim contiguous); all arithmetic is float32 but
// for the backward's float64 accumulators.
//
// Decode forward (a few queries: a decode step's q_len of 1, or a short prefill over a cache): the
// tiled forward's vectors run across kBlockQ query rows, so one query would use one lane of each. The
// decode kernel vectorises over head_dim instead. One task per (batch, kv head, key split) handles
// every query row of the kv head's GQA group, so each K and V row is read once for all of them;
// keys are streamed in chunks that stay in L1 between the two products: each score is a head_dim-long
// dot product, kWidth of them reduced at once by a transposing sum; then online softmax per chunk and
// O += P V with the tile GEMM. Long caches with few (batch, kv head) tasks are split along the keys;
// the splits' partial (max, sum, O) are combined in split order. The split count depends on the shape
// only, never on the thread count, so the result does not either. After a decode forward the backward
// recomputes the scores with the same dot products.
#ifndef FASTGPT_ISA_PASS

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"

#define FASTGPT_ISA_SOURCE "cpu/attention.cpp"
#include "cpu/foreach_isa.h"

namespace fastgpt::cpu {

void attention_forward(const AttentionParams& p) { FASTGPT_ISA_DISPATCH(attention_forward, p) }

void attention_backward(const AttentionParams& p) { FASTGPT_ISA_DISPATCH(attention_backward, p) }

}  // namespace fastgpt::cpu

#else  // FASTGPT_ISA_PASS: compiled once per instruction set

namespace fastgpt::cpu::FASTGPT_ISA {

#include "cpu/simd.h"
#include "cpu/tile_gemm.h"

// Query and key tile sizes. A 64 x 64 float32 score tile is 16 KiB and the packed K^T and V tiles of
// head_dim 64 are 16 KiB each, so the working set of one pair stays in L2 (and mostly L1) up to
// head_dim 256. Both are multiples of every kWidth, as the tile GEMMs' column counts must be.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;

// Terms per float32 chunk of the sums over head_dim, S = Q K^T and dP = dO V^T (see
// chunked_dot_products): as long as a tile, so head_dim <= 64 sums in one chunk and pays nothing; each
// further chunk costs its GEMM one pass of additions over the output tile. dS = P (dP - delta) cancels
// dP against delta, so dP's absolute rounding error becomes dS's and dQ's: one float32 chain over
// head_dim 256 left dQ at up to 3.7x eager float32's error (eager's GEMM blocks its sums) and the
// forward's output, through S, at up to 2.4x; in 64-term chunks, at most 1.4x and 1.1x (1024 queries,
// 2 and 4 heads, six draws).
constexpr int64_t kDotChunk = 64;

// ---------------------------------------------------------------------------------------------
// Packing: strided float32/bfloat16 rows into contiguous float32 tiles.

// dst[r][0, cols) = src[r][0, cols) * scale and dst[r][cols, ld) = 0, for r < rows.
template <typename T>
void pack_rows(float* dst, int64_t ld, const T* src, int64_t src_stride, int64_t rows, int64_t cols, float scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = src + r * src_stride;
    float* out = dst + r * ld;
    int64_t c = 0;
    for (; c + kWidth <= cols; c += kWidth) store(out + c, load(in + c) * scale);
    if (c < cols) store(out + c, load_partial(in + c, cols - c) * scale);
    for (c = round_up(cols, kWidth); c < ld; c += kWidth) store(out + c, splat(0.0f));
  }
}

// dst[c][r] = src[r][c] * scale for r < rows and 0 for rows <= r < padded_rows, for c < cols.
template <typename T>
void pack_transposed(float* dst, int64_t ld, const T* src, int64_t src_stride, int64_t rows, int64_t padded_rows,
                     int64_t cols, float scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = src + r * src_stride;
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = to_float(in[c]) * scale;
  }
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = rows; r < padded_rows; ++r) dst[c * ld + r] = 0.0f;
  }
}

// dst[0, cols) = src[0, cols) * scale, converted to T.
template <typename T>
void store_row(T* dst, const float* src, int64_t cols, float scale) {
  int64_t c = 0;
  for (; c + kWidth <= cols; c += kWidth) store(dst + c, load(src + c) * scale);
  if (c < cols) store_partial(dst + c, load(src + c) * scale, cols - c);
}

// Scores of keys beyond `last_visible` (a column index in the tile) become -inf.
inline void mask_row(float* row, int64_t cols, int64_t last_visible) {
  for (int64_t c = 0; c < cols; c += kWidth) {
    VecInt beyond = iota(static_cast<int32_t>(c)) > static_cast<int32_t>(last_visible);
    store(row + c, vselect(beyond, splat(-__builtin_inff()), load(row + c)));
  }
}

// c = a[rows x head_dim] @ b[head_dim x cols] (see gemm), each element summed in float32 chunks of
// kDotChunk terms, the chunks' sums added in order. The forward's S^T and the backward's S both come
// from here, so each score is summed the same way in both.
inline void chunked_dot_products(int64_t rows, int64_t cols, int64_t head_dim, const float* a, int64_t lda,
                                 const float* b, int64_t ldb, float* c, int64_t ldc) {
  gemm<false>(rows, cols, head_dim < kDotChunk ? head_dim : kDotChunk, a, lda, b, ldb, c, ldc, false);
  for (int64_t d0 = kDotChunk; d0 < head_dim; d0 += kDotChunk) {
    const int64_t depth = head_dim - d0 < kDotChunk ? head_dim - d0 : kDotChunk;
    gemm<false>(rows, cols, depth, a + d0, lda, b + d0 * ldb, ldb, c, ldc, true);
  }
}

template <typename T>
const T* head_pointer(const HeadTensor& t, int64_t batch, int64_t head) {
  return static_cast<const T*>(t.data) + batch * t.batch_stride + head * t.head_stride;
}

template <typename T>
T* head_pointer_mut(const HeadTensor& t, int64_t batch, int64_t head) {
  return static_cast<T*>(t.data) + batch * t.batch_stride + head * t.head_stride;
}

// ---------------------------------------------------------------------------------------------
// Forward

// Rows [0, rows) of a (rows, cols) tile of T with row stride `stride`, as float32 rows with a row
// stride `*ld`: read in place when T is float32, unless the reader loads whole vectors past `cols`
// (reads_padding) and cols is not a multiple of kWidth; otherwise converted and zero-padded into
// `buffer`.
template <typename T>
const float* rows_as_float(const T* src, int64_t stride, int64_t rows, int64_t cols, bool reads_padding,
                           float* buffer, int64_t buffer_ld, int64_t* ld) {
  if constexpr (sizeof(T) == sizeof(float)) {
    if (!reads_padding || cols % kWidth == 0) {
      *ld = stride;
      return reinterpret_cast<const float*>(src);
    }
  }
  pack_rows(buffer, buffer_ld, src, stride, rows, cols, 1.0f);
  *ld = buffer_ld;
  return buffer;
}

// Multiply-adds of one Q K^T product over every (batch, head), the work measure that sizes the
// parallel regions (the causal mask roughly halves it; every pass does a small multiple of it).
int64_t score_work(const AttentionParams& p) {
  return static_cast<int64_t>(p.batch) * p.heads * p.q_len * p.kv_len * p.head_dim;
}

// Each task computes the transposed scores S^T = K Q^T of a key tile (keys x queries), so that Q^T is
// packed once per query tile, K and V are read in place, and the online softmax runs down the columns:
// every vector lane is one query row, with no horizontal reductions. Then O += P V reads P^T transposed.
template <typename T>
void forward(const AttentionParams& p) {
  constexpr int64_t kQueryVecs = kBlockQ / kWidth;
  const int64_t head_dim = p.head_dim;
  const int64_t padded_dim = round_up(head_dim, kWidth);
  const int64_t offset = static_cast<int64_t>(p.kv_len) - p.q_len;  // query i sees keys j <= i + offset
  const int64_t group = p.heads / p.kv_heads;
  const int64_t q_tiles = ceil_div(p.q_len, kBlockQ);
  const int64_t batch_heads = static_cast<int64_t>(p.batch) * p.heads;
  const int64_t tasks = batch_heads * q_tiles;

  // Per thread: Q^T tile, K and V tiles (when converted), S^T tile, output accumulator.
  const int64_t per_thread =
      head_dim * kBlockQ + 2 * kBlockK * padded_dim + kBlockK * kBlockQ + kBlockQ * padded_dim;
  const int threads = threads_for(score_work(p));
  ThreadScratch scratch(threads, per_thread);

  parallel_region(threads, [&] {
    float* qt_tile = scratch.for_thread(thread_index());  // (head_dim, kBlockQ): Q^T * softmax_scale
    float* k_buffer = qt_tile + head_dim * kBlockQ;       // (kBlockK, padded_dim)
    float* v_buffer = k_buffer + kBlockK * padded_dim;    // (kBlockK, padded_dim)
    float* scores_t = v_buffer + kBlockK * padded_dim;    // (kBlockK, kBlockQ): S^T, then P^T
    float* acc = scores_t + kBlockK * kBlockQ;            // (kBlockQ, padded_dim): unnormalised O
    Vec row_max[kQueryVecs];                              // running max of each query row's scores
    Vec row_sum[kQueryVecs];                              // running sum of exp(s - max)

    // The heaviest tiles (last rows, most keys) go first so that dynamic scheduling balances the tail.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t tile = q_tiles - 1 - task / batch_heads;
      const int64_t batch = (task % batch_heads) / p.heads;
      const int64_t head = task % p.heads;
      const int64_t kv_head = head / group;
      const int64_t q0 = tile * kBlockQ;
      const int64_t rows = q0 + kBlockQ <= p.q_len ? kBlockQ : p.q_len - q0;

      const T* q = head_pointer<T>(p.q, batch, head) + q0 * p.q.row_stride;
      const T* k = head_pointer<T>(p.k, batch, kv_head);
      const T* v = head_pointer<T>(p.v, batch, kv_head);
      pack_transposed(qt_tile, kBlockQ, q, p.q.row_stride, rows, kBlockQ, head_dim, p.softmax_scale);
      for (int64_t i = 0; i < kQueryVecs; ++i) {
        row_max[i] = splat(-__builtin_inff());
        row_sum[i] = splat(0.0f);
      }
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < padded_dim; c += kWidth) store(acc + r * padded_dim + c, splat(0.0f));
      }

      const int64_t last_key = q0 + rows - 1 + offset;  // the last key any row of the tile sees
      for (int64_t k0 = 0; k0 <= last_key; k0 += kBlockK) {
        const int64_t keys = k0 + kBlockK <= p.kv_len ? kBlockK : p.kv_len - k0;
        int64_t k_ld, v_ld;
        const float* k_rows = rows_as_float(k + k0 * p.k.row_stride, p.k.row_stride, keys, head_dim, false, k_buffer,
                                            padded_dim, &k_ld);
        const float* v_rows = rows_as_float(v + k0 * p.v.row_stride, p.v.row_stride, keys, head_dim, true, v_buffer,
                                            padded_dim, &v_ld);
        chunked_dot_products(keys, kBlockQ, head_dim, k_rows, k_ld, qt_tile, kBlockQ, scores_t, kBlockQ);

        // Key k0 + j is visible to query q0 + i iff i >= k0 + j - q0 - offset; only tiles reaching past
        // the first query's last visible key need the mask.
        const bool on_diagonal = k0 + keys - 1 > q0 + offset;
        Vec tile_max[kQueryVecs];
        for (int64_t i = 0; i < kQueryVecs; ++i) tile_max[i] = splat(-__builtin_inff());
        for (int64_t j = 0; j < keys; ++j) {
          float* s = scores_t + j * kBlockQ;
          const int32_t first_visible = static_cast<int32_t>(k0 + j - q0 - offset);
          for (int64_t i = 0; i < kQueryVecs; ++i) {
            Vec score = load(s + i * kWidth);
            if (on_diagonal) {
              score = vselect(iota(static_cast<int32_t>(i * kWidth)) < first_visible, splat(-__builtin_inff()), score);
              store(s + i * kWidth, score);
            }
            tile_max[i] = vmax(tile_max[i], score);
          }
        }
        Vec new_max[kQueryVecs], tile_sum[kQueryVecs];
        for (int64_t i = 0; i < kQueryVecs; ++i) {
          new_max[i] = vmax(row_max[i], tile_max[i]);
          tile_sum[i] = splat(0.0f);
        }
        for (int64_t j = 0; j < keys; ++j) {
          float* s = scores_t + j * kBlockQ;
          for (int64_t i = 0; i < kQueryVecs; ++i) {
            Vec prob = exp(load(s + i * kWidth) - new_max[i]);
            store(s + i * kWidth, prob);
            tile_sum[i] += prob;
          }
        }
        for (int64_t i = 0; i < kQueryVecs; ++i) {
          Vec rescale = exp(row_max[i] - new_max[i]);
          row_sum[i] = row_sum[i] * rescale + tile_sum[i];
          row_max[i] = new_max[i];
          for (int64_t lane = 0; lane < kWidth; ++lane) {
            const int64_t r = i * kWidth + lane;
            if (r >= rows || rescale[lane] == 1.0f) continue;
            float* o = acc + r * padded_dim;
            for (int64_t c = 0; c < padded_dim; c += kWidth) store(o + c, load(o + c) * rescale[lane]);
          }
        }
        gemm<true>(rows, padded_dim, keys, scores_t, kBlockQ, v_rows, v_ld, acc, padded_dim, true);
      }

      T* out = head_pointer_mut<T>(p.out, batch, head) + q0 * p.out.row_stride;
      float* lse = p.lse + (batch * p.heads + head) * p.q_len + q0;
      for (int64_t r = 0; r < rows; ++r) {
        const float max = row_max[r / kWidth][r % kWidth];
        const float sum = row_sum[r / kWidth][r % kWidth];
        store_row(out + r * p.out.row_stride, acc + r * padded_dim, head_dim, 1.0f / sum);
        lse[r] = max + std::log(sum);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Decode forward

// Queries (q_len) up to which the decode kernel runs. Per key and query head, its cost grows with
// q_len (each query row does its own dot product and P V row), while the tiled forward pays for a whole
// kBlockQ-row tile; whatever the GQA group, at head_dim 64 and 128, float32 and bfloat16, the decode
// kernel takes 0.06x the tiled time at q_len 1, 0.45x at 8, 0.75-0.8x at 16, 0.95x at 20 and 1.1x at
// 24 (measured, one thread, kv_len 512).
constexpr int64_t kDecodeMaxQueries = 16;
// Keys per chunk: the chunk's K and V (64 x head_dim float32 each: 16 KiB at head_dim 64) stay in L1
// from the scores to P V. A multiple of every kWidth.
constexpr int64_t kDecodeChunk = 64;
// Split-KV: the keys of each (batch, kv head) are split until there are kSplitTasks tasks, keeping at
// least kMinSplitKeys keys per split. Fixed numbers rather than the thread count, so that the summation
// order (and the result) does not depend on it; a split costs one extra (rows x head_dim) partial, about
// 1/256 of the work of its keys, so splitting on a machine with fewer threads costs little.
constexpr int64_t kSplitTasks = 64;
constexpr int64_t kMinSplitKeys = 256;

inline bool use_decode(const AttentionParams& p) { return p.q_len <= kDecodeMaxQueries; }

// Lane `lane` of the "low halves" and "high halves" of two vectors at one level of a transposing sum:
// each block of 2 * kHalf lanes takes kHalf lanes from x then kHalf from y (indices >= kWidth select y).
constexpr int low_half_lane(int lane, int half) {
  return lane % (2 * half) < half ? lane : kWidth + lane - half;
}
constexpr int high_half_lane(int lane, int half) {
  return lane % (2 * half) < half ? lane + half : kWidth + lane;
}

template <int kHalf, int... kLanes>
inline Vec add_halves(Vec x, Vec y, std::integer_sequence<int, kLanes...>) {
  return __builtin_shufflevector(x, y, low_half_lane(kLanes, kHalf)...) +
         __builtin_shufflevector(x, y, high_half_lane(kLanes, kHalf)...);
}

// Lane t of the result is the sum of the lanes of v[t], for t < 2 * kHalf (call with kHalf = kWidth / 2;
// v is overwritten). Each level adds pairs (v[i], v[i + kHalf]) into one vector holding kHalf partial
// sums of each: kWidth - 1 shuffle-add steps in all, instead of a full reduction per vector.
template <int kHalf>
inline Vec transpose_sum(Vec* v) {
  for (int i = 0; i < kHalf; ++i) {
    v[i] = add_halves<kHalf>(v[i], v[i + kHalf], std::make_integer_sequence<int, kWidth>{});
  }
  if constexpr (kHalf == 1) {
    return v[0];
  } else {
    return transpose_sum<kHalf / 2>(v);
  }
}

// scores[j] for j < cols (a multiple of kWidth, >= keys): q . k_j for the keys j < keys up to
// last_visible, -inf after (q: padded_dim floats, scaled; k: rows of padded_dim valid floats, row stride
// k_ld). Each dot product runs over head_dim in kWidth lanes, then its lanes are summed by the same
// tree in every row and column, so a score depends on q and k_j only; the backward recomputes it so.
inline void row_scores(const float* q, const float* k, int64_t k_ld, int64_t keys, int64_t cols, int64_t padded_dim,
                       int64_t last_visible, float* scores) {
  const int64_t last = last_visible < keys - 1 ? last_visible : keys - 1;
  for (int64_t j0 = 0; j0 <= last; j0 += kWidth) {
    Vec dots[kWidth];
    for (int t = 0; t < kWidth; ++t) {
      Vec dot = splat(0.0f);
      if (j0 + t <= last) {
        const float* row = k + (j0 + t) * k_ld;
        for (int64_t c = 0; c < padded_dim; c += kWidth) dot += load(q + c) * load(row + c);
      }
      dots[t] = dot;
    }
    Vec block = transpose_sum<kWidth / 2>(dots);
    if (j0 + kWidth - 1 > last) {
      block = vselect(iota(static_cast<int32_t>(j0)) > static_cast<int32_t>(last), splat(-__builtin_inff()), block);
    }
    store(scores + j0, block);
  }
  for (int64_t j0 = last < 0 ? 0 : round_up(last + 1, kWidth); j0 < cols; j0 += kWidth) {
    store(scores + j0, splat(-__builtin_inff()));
  }
}

// NaN-propagating maximum.
inline float max_or_nan(float a, float b) { return (a > b || a != a) ? a : b; }

struct DecodeShape {
  int64_t group;        // query heads per kv head
  int64_t rows;         // query rows per kv head: group * q_len, row r = (head r / q_len, query r % q_len)
  int64_t padded_dim;   // head_dim rounded up to kWidth
  int64_t splits;       // key splits per (batch, kv head)
  int64_t split_keys;   // keys per split (the last may have fewer), a multiple of kDecodeChunk
  int64_t state_floats; // floats of one (max, sum, O) running state of `rows` rows
};

inline DecodeShape decode_shape(const AttentionParams& p) {
  DecodeShape s;
  s.group = p.heads / p.kv_heads;
  s.rows = s.group * p.q_len;
  s.padded_dim = round_up(p.head_dim, kWidth);
  const int64_t pairs = static_cast<int64_t>(p.batch) * p.kv_heads;
  const int64_t wanted = pairs >= kSplitTasks ? 1 : ceil_div(kSplitTasks, pairs);
  const int64_t most = p.kv_len / kMinSplitKeys;
  const int64_t splits = std::max<int64_t>(1, std::min(wanted, most));
  s.split_keys = round_up(ceil_div(p.kv_len, splits), kDecodeChunk);
  s.splits = ceil_div(p.kv_len, s.split_keys);  // no empty split after the rounding up
  s.state_floats = s.rows * (s.padded_dim + 2);
  return s;
}

// A running softmax state of every query row of one (batch, kv head): row maxima, sums of exp(s - max)
// and unnormalised outputs.
struct DecodeState {
  float* out;  // (rows, padded_dim)
  float* max;  // (rows)
  float* sum;  // (rows)
  DecodeState(float* base, const DecodeShape& s)
      : out(base), max(base + s.rows * s.padded_dim), sum(base + s.rows * s.padded_dim + s.rows) {}
};

// Per-thread scratch of the decode kernel.
struct DecodeScratch {
  float* q;       // (rows, padded_dim): the query rows * softmax_scale
  float* k;       // (kDecodeChunk, padded_dim): a K chunk, when converted
  float* v;       // (kDecodeChunk, padded_dim): a V chunk, when converted
  float* scores;  // (rows, kDecodeChunk): scores, then probabilities
  float* state;   // a DecodeState, when the task's keys are not split
  static int64_t floats(const DecodeShape& s) {
    return s.rows * s.padded_dim + 2 * kDecodeChunk * s.padded_dim + s.rows * kDecodeChunk + s.state_floats;
  }
  DecodeScratch(float* base, const DecodeShape& s)
      : q(base),
        k(q + s.rows * s.padded_dim),
        v(k + kDecodeChunk * s.padded_dim),
        scores(v + kDecodeChunk * s.padded_dim),
        state(scores + s.rows * kDecodeChunk) {}
};

// Runs keys [k_begin, k_end) of one (batch, kv head) through the state, from its initial (empty) value.
// offset: query i of this sequence sees keys j <= i + offset.
template <typename T>
void decode_keys(const AttentionParams& p, const DecodeShape& s, const DecodeScratch& w, const DecodeState& state,
                 int64_t batch, int64_t kv_head, int64_t k_begin, int64_t k_end, int64_t offset) {
  for (int64_t r = 0; r < s.rows; ++r) {
    state.max[r] = -__builtin_inff();
    state.sum[r] = 0.0f;
    for (int64_t c = 0; c < s.padded_dim; c += kWidth) store(state.out + r * s.padded_dim + c, splat(0.0f));
  }
  const T* k = head_pointer<T>(p.k, batch, kv_head);
  const T* v = head_pointer<T>(p.v, batch, kv_head);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kDecodeChunk) {
    const int64_t keys = k0 + kDecodeChunk <= k_end ? kDecodeChunk : k_end - k0;
    int64_t k_ld, v_ld;
    const float* k_rows =
        rows_as_float(k + k0 * p.k.row_stride, p.k.row_stride, keys, p.head_dim, true, w.k, s.padded_dim, &k_ld);
    const float* v_rows =
        rows_as_float(v + k0 * p.v.row_stride, p.v.row_stride, keys, p.head_dim, true, w.v, s.padded_dim, &v_ld);
    for (int64_t r = 0; r < s.rows; ++r) {
      float* scores = w.scores + r * kDecodeChunk;
      row_scores(w.q + r * s.padded_dim, k_rows, k_ld, keys, round_up(keys, kWidth), s.padded_dim,
                 r % p.q_len + offset - k0, scores);
      // Online softmax over the chunk. A row that has seen no visible key yet keeps max -inf and takes
      // 0 as the reference, so that exp(-inf - reference) is 0 rather than NaN.
      Vec chunk_max = splat(-__builtin_inff());
      for (int64_t j = 0; j < keys; j += kWidth) chunk_max = vmax(chunk_max, load(scores + j));
      const float new_max = max_or_nan(state.max[r], reduce_max(chunk_max));
      const float reference = new_max == -__builtin_inff() ? 0.0f : new_max;
      Vec chunk_sum = splat(0.0f);
      for (int64_t j = 0; j < keys; j += kWidth) {
        Vec prob = exp(load(scores + j) - reference);
        store(scores + j, prob);
        chunk_sum += prob;
      }
      const float rescale = std::exp(state.max[r] - reference);
      state.sum[r] = state.sum[r] * rescale + reduce_sum(chunk_sum);
      state.max[r] = new_max;
      if (rescale != 1.0f) {
        float* o = state.out + r * s.padded_dim;
        for (int64_t c = 0; c < s.padded_dim; c += kWidth) store(o + c, load(o + c) * rescale);
      }
    }
    gemm<false>(s.rows, s.padded_dim, keys, w.scores, kDecodeChunk, v_rows, v_ld, state.out, s.padded_dim, true);
  }
}

// Writes out = O / sum and lse = max + log(sum) for every row of one (batch, kv head).
template <typename T>
void store_decode_rows(const AttentionParams& p, const DecodeShape& s, const DecodeState& state, int64_t batch,
                       int64_t kv_head) {
  for (int64_t r = 0; r < s.rows; ++r) {
    const int64_t head = kv_head * s.group + r / p.q_len, query = r % p.q_len;
    T* out = head_pointer_mut<T>(p.out, batch, head) + query * p.out.row_stride;
    // A row that saw no key (a sequence of length 0) has O = 0 and sum 0: its output is 0.
    store_row(out, state.out + r * s.padded_dim, p.head_dim, state.sum[r] == 0.0f ? 0.0f : 1.0f / state.sum[r]);
    p.lse[(batch * p.heads + head) * p.q_len + query] = state.max[r] + std::log(state.sum[r]);
  }
}

// Merges the splits' states of one (batch, kv head) into `merged`, in split order.
inline void merge_splits(const DecodeShape& s, float* split_states, const DecodeState& merged) {
  for (int64_t r = 0; r < s.rows; ++r) {
    float max = -__builtin_inff();
    for (int64_t split = 0; split < s.splits; ++split) {
      max = max_or_nan(max, DecodeState(split_states + split * s.state_floats, s).max[r]);
    }
    float* o = merged.out + r * s.padded_dim;
    float sum = 0.0f;
    for (int64_t c = 0; c < s.padded_dim; c += kWidth) store(o + c, splat(0.0f));
    for (int64_t split = 0; split < s.splits; ++split) {
      const DecodeState part(split_states + split * s.state_floats, s);
      // A split in which the row saw no key (max -inf, sum 0, O 0) gets weight 0, also when no split
      // saw one (max -inf too).
      const float weight = max == -__builtin_inff() ? 0.0f : std::exp(part.max[r] - max);
      sum += part.sum[r] * weight;
      const float* part_out = part.out + r * s.padded_dim;
      for (int64_t c = 0; c < s.padded_dim; c += kWidth) store(o + c, load(o + c) + load(part_out + c) * weight);
    }
    merged.max[r] = max;
    merged.sum[r] = sum;
  }
}

template <typename T>
void forward_decode(const AttentionParams& p) {
  if (p.batch == 0 || p.q_len == 0) return;  // then kv_len >= q_len >= 1 below
  const DecodeShape s = decode_shape(p);
  const int64_t pairs = static_cast<int64_t>(p.batch) * p.kv_heads;
  const int64_t tasks = pairs * s.splits;
  const int threads = static_cast<int>(std::min<int64_t>(threads_for(score_work(p)), tasks));
  ThreadScratch scratch(threads, DecodeScratch::floats(s));
  // The splits' states, (pairs, splits, state_floats), when the keys are split.
  std::vector<float> split_states(s.splits > 1 ? static_cast<size_t>(tasks * s.state_floats) : 0);

  parallel_region(threads, [&] {
    const DecodeScratch w(scratch.for_thread(thread_index()), s);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t pair = task / s.splits, split = task % s.splits;
      const int64_t batch = pair / p.kv_heads, kv_head = pair % p.kv_heads;
      for (int64_t g = 0; g < s.group; ++g) {
        const T* q = head_pointer<T>(p.q, batch, kv_head * s.group + g);
        pack_rows(w.q + g * p.q_len * s.padded_dim, s.padded_dim, q, p.q.row_stride, p.q_len, p.head_dim,
                  p.softmax_scale);
      }
      const int64_t kv_len = p.kv_lens ? p.kv_lens[batch] : p.kv_len;  // this sequence's keys
      const int64_t k_begin = split * s.split_keys;
      const int64_t k_end = std::min<int64_t>(kv_len, k_begin + s.split_keys);  // <= k_begin: an empty split
      const DecodeState state(s.splits > 1 ? split_states.data() + task * s.state_floats : w.state, s);
      decode_keys<T>(p, s, w, state, batch, kv_head, k_begin, k_end, kv_len - p.q_len);
      if (s.splits == 1) store_decode_rows<T>(p, s, state, batch, kv_head);
    }
    if (s.splits > 1) {
#pragma omp for schedule(static)
      for (int64_t pair = 0; pair < pairs; ++pair) {
        const DecodeState merged(w.state, s);
        merge_splits(s, split_states.data() + pair * s.splits * s.state_floats, merged);
        store_decode_rows<T>(p, s, merged, pair / p.kv_heads, pair % p.kv_heads);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward

// delta[b, h, i] = sum_d dout[b, h, i, d] * out[b, h, i, d], in float32.
template <typename T>
void compute_delta(const AttentionParams& p) {
  const int64_t rows_total = static_cast<int64_t>(p.batch) * p.heads * p.q_len;
  parallel_for(rows_total, threads_for(rows_total * p.head_dim), [&](int64_t index) {
    const int64_t row = index % p.q_len;
    const int64_t batch = index / (static_cast<int64_t>(p.heads) * p.q_len);
    const int64_t head = (index / p.q_len) % p.heads;
    const T* dout = head_pointer<T>(p.dout, batch, head) + row * p.dout.row_stride;
    const T* out = head_pointer<T>(p.out, batch, head) + row * p.out.row_stride;
    Vec sum = splat(0.0f);
    int64_t c = 0;
    for (; c + kWidth <= p.head_dim; c += kWidth) sum += load(dout + c) * load(out + c);
    if (c < p.head_dim) sum += load_partial(dout + c, p.head_dim - c) * load_partial(out + c, p.head_dim - c);
    p.delta[index] = reduce_sum(sum);
  });
}

// The query side of a tile, packed: Q (scaled), dO, lse and delta.
struct QuerySide {
  float* q;      // (rows, padded_dim), Q * softmax_scale
  float* dout;   // (rows, padded_dim)
  float* lse;    // (rows)
  float* delta;  // (rows)
};

// The key side of a key tile, or of a whole kv head, packed into float32.
struct KeySide {
  float* kt;   // (head_dim, ld): K^T
  float* vt;   // (head_dim, ld): V^T
  float* k;    // (keys, padded_dim)
  int64_t ld;  // row length of kt and vt
};

template <typename T>
void pack_query_side(const AttentionParams& p, const QuerySide& dst, int64_t batch, int64_t head, int64_t q0,
                     int64_t rows, int64_t padded_dim, float q_scale) {
  const T* q = head_pointer<T>(p.q, batch, head) + q0 * p.q.row_stride;
  const T* dout = head_pointer<T>(p.dout, batch, head) + q0 * p.dout.row_stride;
  pack_rows(dst.q, padded_dim, q, p.q.row_stride, rows, p.head_dim, q_scale);
  pack_rows(dst.dout, padded_dim, dout, p.dout.row_stride, rows, p.head_dim, 1.0f);
  const int64_t stats = (batch * p.heads + head) * p.q_len + q0;
  for (int64_t r = 0; r < rows; ++r) {
    dst.lse[r] = p.lse[stats + r];
    dst.delta[r] = p.delta[stats + r];
  }
}

// Packs keys [k0, k0 + keys) of one kv head, zero-padding K^T and V^T up to padded_keys columns.
template <typename T>
void pack_key_side(const AttentionParams& p, const KeySide& dst, int64_t batch, int64_t kv_head, int64_t k0,
                   int64_t keys, int64_t padded_keys, int64_t padded_dim) {
  const T* k = head_pointer<T>(p.k, batch, kv_head) + k0 * p.k.row_stride;
  const T* v = head_pointer<T>(p.v, batch, kv_head) + k0 * p.v.row_stride;
  pack_transposed(dst.kt, dst.ld, k, p.k.row_stride, keys, padded_keys, p.head_dim, 1.0f);
  pack_transposed(dst.vt, dst.ld, v, p.v.row_stride, keys, padded_keys, p.head_dim, 1.0f);
  pack_rows(dst.k, padded_dim, k, p.k.row_stride, keys, p.head_dim, 1.0f);
}

// One (query tile, key tile) pair. q/dout/lse/delta point at the tile's first query row, kt/vt at its
// first key column, k at its first key row; dk/dv (keys x padded_dim) and dq (rows x padded_dim) are
// float64 accumulators, each skipped when null. scores and dscores are (kBlockQ, kBlockK) scratch.
struct TilePair {
  QuerySide query;
  const float* kt;
  const float* vt;
  int64_t kt_ld;  // row length of kt and vt
  const float* k;
  double* dk;
  double* dv;
  double* dq;
  float* scores;
  float* dscores;
  int64_t rows;
  int64_t keys;
  int64_t last_visible;  // for the tile's first row, as a key column in the tile (row r: + r)
};

// S is recomputed as the forward computed it, so that exp(S - lse) matches the forward to the bit even
// where |S| is large: by chunked_dot_products after the tiled forward, by row_scores after the decode
// forward (decode_scores).
//
// dK and dV sum group * q_len rows' terms per key (dQ kv_len keys' terms per row): one float32 chain in
// that order would carry a rounding error growing linearly with the count (13x eager float32's error on
// dV at MQA, 2048 queries), where eager's blocked GEMMs grow about as its square root. So each pair's
// products, sums of at most 64 terms, are taken in float32 by the tile GEMM and added to float64
// accumulators: the error stays that of a 64-term float32 sum (below eager's). The sum over (group
// head, query tile) or key tile runs in the same order in both schedules and at any thread count.
inline void backward_pair(const TilePair& t, int64_t head_dim, int64_t padded_dim, bool decode_scores) {
  if (decode_scores) {
    for (int64_t r = 0; r < t.rows; ++r) {
      row_scores(t.query.q + r * padded_dim, t.k, padded_dim, t.keys, kBlockK, padded_dim, t.last_visible + r,
                 t.scores + r * kBlockK);
    }
  } else {
    chunked_dot_products(t.rows, kBlockK, head_dim, t.query.q, padded_dim, t.kt, t.kt_ld, t.scores, kBlockK);
  }
  chunked_dot_products(t.rows, kBlockK, head_dim, t.query.dout, padded_dim, t.vt, t.kt_ld, t.dscores, kBlockK);
  const bool on_diagonal = !decode_scores && t.last_visible < kBlockK - 1;  // row_scores masked already
  for (int64_t r = 0; r < t.rows; ++r) {
    float* s = t.scores + r * kBlockK;
    float* ds = t.dscores + r * kBlockK;
    if (on_diagonal) mask_row(s, kBlockK, t.last_visible + r);
    const float lse = t.query.lse[r];
    const float delta = t.query.delta[r];
    for (int64_t c = 0; c < kBlockK; c += kWidth) {
      Vec prob = exp(load(s + c) - lse);
      store(s + c, prob);
      store(ds + c, prob * (load(ds + c) - delta));
    }
  }
  if (t.dv) gemm<true>(t.keys, padded_dim, t.rows, t.scores, kBlockK, t.query.dout, padded_dim, t.dv, padded_dim, true);
  if (t.dk) gemm<true>(t.keys, padded_dim, t.rows, t.dscores, kBlockK, t.query.q, padded_dim, t.dk, padded_dim, true);
  if (t.dq) gemm<false>(t.rows, padded_dim, t.keys, t.dscores, kBlockK, t.k, padded_dim, t.dq, padded_dim, true);
}

inline void zero(double* dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = 0.0;
}

// Rows [row0, row0 + rows) of one head of dst_tensor = src * scale, rounded to float32 (then to
// bfloat16 when T is).
template <typename T>
void store_sums(const HeadTensor& dst_tensor, int64_t batch, int64_t head, int64_t row0, const double* src,
                int64_t rows, int64_t head_dim, int64_t padded_dim, double scale) {
  T* dst = head_pointer_mut<T>(dst_tensor, batch, head) + row0 * dst_tensor.row_stride;
  for (int64_t r = 0; r < rows; ++r) {
    const double* in = src + r * padded_dim;
    T* out = dst + r * dst_tensor.row_stride;
    for (int64_t c = 0; c < head_dim; c += kWidth) {
      VecDouble sum;
      __builtin_memcpy(&sum, in + c, sizeof sum);
      const Vec value = __builtin_convertvector(sum * scale, Vec);
      if (c + kWidth <= head_dim) {
        store(out + c, value);
      } else {
        store_partial(out + c, value, head_dim - c);
      }
    }
  }
}

// The index of the first query tile whose rows see key k0.
inline int64_t first_query_tile(int64_t k0, int64_t offset) { return k0 - offset > 0 ? (k0 - offset) / kBlockQ : 0; }

struct BackwardShape {
  int64_t head_dim, padded_dim, offset, group, q_tiles, k_tiles;
  bool decode_scores;  // the forward ran the decode kernel: recompute S with row_scores
  float q_scale;   // Q is packed times softmax_scale, so dK = softmax_scale * dS^T Q needs no scale
  float dq_scale;  // dQ = softmax_scale * dS K
};

inline BackwardShape backward_shape(const AttentionParams& p) {
  BackwardShape s;
  s.head_dim = p.head_dim;
  s.padded_dim = round_up(p.head_dim, kWidth);
  s.offset = static_cast<int64_t>(p.kv_len) - p.q_len;
  s.group = p.heads / p.kv_heads;
  s.q_tiles = ceil_div(p.q_len, kBlockQ);
  s.k_tiles = ceil_div(p.kv_len, kBlockK);
  s.decode_scores = use_decode(p);
  s.q_scale = p.softmax_scale;
  s.dq_scale = p.softmax_scale;
  return s;
}

// Schedule 1: one task per (batch, kv head), with the whole head packed in per-thread scratch.
template <typename T>
void backward_per_head(const AttentionParams& p, const BackwardShape& s) {
  const int64_t padded_keys = round_up(p.kv_len, kBlockK);
  const int64_t key_floats = padded_keys * s.padded_dim;
  const int64_t query_floats = static_cast<int64_t>(p.q_len) * s.padded_dim;
  // K^T, V^T, K of the kv head; Q, dO, lse, delta of one query head; two score tiles.
  const int64_t per_thread =
      2 * s.head_dim * padded_keys + key_floats + 2 * query_floats + 2 * p.q_len + 2 * kBlockQ * kBlockK;
  const int64_t tasks = static_cast<int64_t>(p.batch) * p.kv_heads;
  const int threads = threads_for(score_work(p));
  ThreadScratch scratch(threads, per_thread);
  // dK, dV of the kv head and dQ of one query head, summed in float64 (see backward_pair).
  ThreadScratch<double> sums(threads, 2 * key_floats + query_floats);

  parallel_region(threads, [&] {
    float* base = scratch.for_thread(thread_index());
    KeySide key_side{base, base + s.head_dim * padded_keys, base + 2 * s.head_dim * padded_keys, padded_keys};
    QuerySide query_side{key_side.k + key_floats, key_side.k + key_floats + query_floats, nullptr, nullptr};
    query_side.lse = query_side.dout + query_floats;
    query_side.delta = query_side.lse + p.q_len;
    float* scores = query_side.delta + p.q_len;
    float* dscores = scores + kBlockQ * kBlockK;
    double* dk = sums.for_thread(thread_index());
    double* dv = dk + key_floats;
    double* dq = dv + key_floats;

#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t batch = task / p.kv_heads;
      const int64_t kv_head = task % p.kv_heads;
      pack_key_side<T>(p, key_side, batch, kv_head, 0, p.kv_len, padded_keys, s.padded_dim);
      zero(dk, key_floats);
      zero(dv, key_floats);
      for (int64_t g = 0; g < s.group; ++g) {
        const int64_t head = kv_head * s.group + g;
        pack_query_side<T>(p, query_side, batch, head, 0, p.q_len, s.padded_dim, s.q_scale);
        zero(dq, query_floats);
        for (int64_t kt = 0; kt < s.k_tiles; ++kt) {
          const int64_t k0 = kt * kBlockK;
          for (int64_t qt = first_query_tile(k0, s.offset); qt < s.q_tiles; ++qt) {
            const int64_t q0 = qt * kBlockQ;
            TilePair pair;
            pair.query = QuerySide{query_side.q + q0 * s.padded_dim, query_side.dout + q0 * s.padded_dim,
                                   query_side.lse + q0, query_side.delta + q0};
            pair.kt = key_side.kt + k0;
            pair.vt = key_side.vt + k0;
            pair.kt_ld = padded_keys;
            pair.k = key_side.k + k0 * s.padded_dim;
            pair.dk = dk + k0 * s.padded_dim;
            pair.dv = dv + k0 * s.padded_dim;
            pair.dq = dq + q0 * s.padded_dim;
            pair.scores = scores;
            pair.dscores = dscores;
            pair.rows = q0 + kBlockQ <= p.q_len ? kBlockQ : p.q_len - q0;
            pair.keys = k0 + kBlockK <= p.kv_len ? kBlockK : p.kv_len - k0;
            pair.last_visible = q0 + s.offset - k0;
            backward_pair(pair, s.head_dim, s.padded_dim, s.decode_scores);
          }
        }
        store_sums<T>(p.dq, batch, head, 0, dq, p.q_len, s.head_dim, s.padded_dim, s.dq_scale);
      }
      store_sums<T>(p.dk, batch, kv_head, 0, dk, p.kv_len, s.head_dim, s.padded_dim, 1.0);
      store_sums<T>(p.dv, batch, kv_head, 0, dv, p.kv_len, s.head_dim, s.padded_dim, 1.0);
    }
  });
}

// Schedule 2: pass 1 (dK, dV) over key tiles, pass 2 (dQ) over query tiles.
template <typename T>
void backward_per_tile(const AttentionParams& p, const BackwardShape& s) {
  const int64_t tile_floats = kBlockQ * s.padded_dim;  // kBlockQ == kBlockK
  // K^T, V^T, K tiles; Q, dO tiles, lse, delta; two score tiles.
  const int64_t per_thread =
      2 * s.head_dim * kBlockK + tile_floats + 2 * tile_floats + 2 * kBlockQ + 2 * kBlockQ * kBlockK;
  const int threads = threads_for(score_work(p));
  ThreadScratch scratch(threads, per_thread);
  // Two float64 accumulator tiles: dK and dV, or dQ (see backward_pair).
  ThreadScratch<double> sums(threads, 2 * tile_floats);

  parallel_region(threads, [&] {
    float* base = scratch.for_thread(thread_index());
    KeySide key_side{base, base + s.head_dim * kBlockK, base + 2 * s.head_dim * kBlockK, kBlockK};
    QuerySide query_side;
    query_side.q = key_side.k + tile_floats;
    query_side.dout = query_side.q + tile_floats;
    query_side.lse = query_side.dout + tile_floats;
    query_side.delta = query_side.lse + kBlockQ;
    float* scores = query_side.delta + kBlockQ;
    float* dscores = scores + kBlockQ * kBlockK;
    double* acc0 = sums.for_thread(thread_index());
    double* acc1 = acc0 + tile_floats;

    // Pass 1: dK and dV of one key tile, summed over the query heads of its kv head.
    const int64_t key_tasks = static_cast<int64_t>(p.batch) * p.kv_heads * s.k_tiles;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < key_tasks; ++task) {
      const int64_t kt = task % s.k_tiles;
      const int64_t kv_head = (task / s.k_tiles) % p.kv_heads;
      const int64_t batch = task / (s.k_tiles * p.kv_heads);
      const int64_t k0 = kt * kBlockK;
      const int64_t keys = k0 + kBlockK <= p.kv_len ? kBlockK : p.kv_len - k0;
      pack_key_side<T>(p, key_side, batch, kv_head, k0, keys, kBlockK, s.padded_dim);
      zero(acc0, tile_floats);
      zero(acc1, tile_floats);
      for (int64_t g = 0; g < s.group; ++g) {
        const int64_t head = kv_head * s.group + g;
        for (int64_t qt = first_query_tile(k0, s.offset); qt < s.q_tiles; ++qt) {
          const int64_t q0 = qt * kBlockQ;
          const int64_t rows = q0 + kBlockQ <= p.q_len ? kBlockQ : p.q_len - q0;
          pack_query_side<T>(p, query_side, batch, head, q0, rows, s.padded_dim, s.q_scale);
          TilePair pair{query_side, key_side.kt, key_side.vt, kBlockK, key_side.k, acc0, acc1, nullptr,
                        scores, dscores, rows, keys, q0 + s.offset - k0};
          backward_pair(pair, s.head_dim, s.padded_dim, s.decode_scores);
        }
      }
      store_sums<T>(p.dk, batch, kv_head, k0, acc0, keys, s.head_dim, s.padded_dim, 1.0);
      store_sums<T>(p.dv, batch, kv_head, k0, acc1, keys, s.head_dim, s.padded_dim, 1.0);
    }

    // Pass 2: dQ of one query tile (the heaviest tiles first).
    const int64_t batch_heads = static_cast<int64_t>(p.batch) * p.heads;
    const int64_t query_tasks = batch_heads * s.q_tiles;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < query_tasks; ++task) {
      const int64_t qt = s.q_tiles - 1 - task / batch_heads;
      const int64_t batch = (task % batch_heads) / p.heads;
      const int64_t head = task % p.heads;
      const int64_t kv_head = head / s.group;
      const int64_t q0 = qt * kBlockQ;
      const int64_t rows = q0 + kBlockQ <= p.q_len ? kBlockQ : p.q_len - q0;
      pack_query_side<T>(p, query_side, batch, head, q0, rows, s.padded_dim, s.q_scale);
      zero(acc0, tile_floats);
      const int64_t last_key = q0 + rows - 1 + s.offset;
      for (int64_t k0 = 0; k0 <= last_key; k0 += kBlockK) {
        const int64_t keys = k0 + kBlockK <= p.kv_len ? kBlockK : p.kv_len - k0;
        pack_key_side<T>(p, key_side, batch, kv_head, k0, keys, kBlockK, s.padded_dim);
        TilePair pair{query_side, key_side.kt, key_side.vt, kBlockK, key_side.k, nullptr, nullptr, acc0,
                      scores, dscores, rows, keys, q0 + s.offset - k0};
        backward_pair(pair, s.head_dim, s.padded_dim, s.decode_scores);
      }
      store_sums<T>(p.dq, batch, head, q0, acc0, rows, s.head_dim, s.padded_dim, s.dq_scale);
    }
  });
}

template <typename T>
void backward(const AttentionParams& p) {
  compute_delta<T>(p);
  const BackwardShape shape = backward_shape(p);
  // Per-head tasks do 5/7 of the per-tile schedule's GEMM work; use them while they keep at least
  // 3/4 of the threads busy on average.
  const int64_t head_tasks = static_cast<int64_t>(p.batch) * p.kv_heads;
  const int64_t threads = threads_for(score_work(p));
  const int64_t rounds = ceil_div(head_tasks, threads);
  if (head_tasks > 0 && 4 * head_tasks >= 3 * rounds * threads) {
    backward_per_head<T>(p, shape);
  } else {
    backward_per_tile<T>(p, shape);
  }
}

void attention_forward(const AttentionParams& p) {
  const bool decode = use_decode(p) || p.kv_lens;  // only the decode kernel reads per-sequence lengths
  if (p.dtype == DType::kBFloat16) {
    decode ? forward_decode<BFloat16>(p) : forward<BFloat16>(p);
  } else {
    decode ? forward_decode<float>(p) : forward<float>(p);
  }
}

void attention_backward(const AttentionParams& p) {
  if (p.dtype == DType::kBFloat16) {
    backward<BFloat16>(p);
  } else {
    backward<float>(p);
  }
}

}  // namespace fastgpt::cpu::FASTGPT_ISA

#endif  // FASTGPT_ISA_PASS
