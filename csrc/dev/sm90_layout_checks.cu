/*
CPU checks of the register layouts the Hopper attention forward (csrc/cuda/attention_fwd_sm90.cu) relies
on, for every instantiation (bfloat16 and float16, head_dim 64 and 128), by running CuTe's own layout
functions on the host: for each of the 256 consumer threads,
  - every row of the (rows, columns) view of S (accumulator_rows_cols) is one row of the tile, and that
    row lies in the thread's warpgroup's 64 rows;
  - the 4 threads of its quad (lanes 4g .. 4g + 3, the ones the row max and row sum shuffle over) hold
    the same rows, and together every column of each row exactly once;
  - O's rows are S's rows, in the same order (the softmax's correction and 1/sum scale O by row);
  - the S registers read as the A operand of the PV wgmma (accumulator_as_operand_a) hold, at each
    operand position (row, key), the S value of that (row, key).
And for the backward (csrc/cuda/attention_bwd_sm90.cu), whose S^T and dP^T tiles are (keys, queries):
  - every column of the (rows, columns) view of S^T is one query (the lse and delta it is shifted by),
    and the thread's keys lie in its warpgroup's 64;
  - the S^T registers read as the A operand of the dK/dV wgmma hold P^T/dS^T at the right (key, query);
  - registers 2j and 2j + 1 of S^T are one key's adjacent queries, 4-byte aligned and adjacent in dS^T's
    shared-memory layout (one 32-bit store), and swizzled_byte_offset matches CuTe's tensor addressing;
  - dQ's registers 2j and 2j + 1 are adjacent columns of one row, dK's and dV's likewise (one 32-bit
    store), and the 256 threads hold each element of dQ (queries, head_dim) and of dK/dV (keys,
    head_dim) once;
  - each warpgroup's dQ columns are the kHeadDim / 2 of its staging tile (SmemDqAccum), each register
    pair one 8-byte aligned word there, the kernel's SwizzledRun addresses (first element + compile-time
    delta, XOR one mask) are swizzled_byte_offset's, which matches CuTe's addressing of the tile, and a
    warp's 8-byte stores of one register pair hit each of the 32 banks exactly twice (two wavefronts,
    the least 256 bytes take: no bank conflicts);
  - dK's and dV's register pairs, staged for their TMA stores in V's layout (SmemV), are one 32-bit
    word each at the kernel's SwizzledRun addresses, which are swizzled_byte_offset's and CuTe's, and a
    warp's store of one pair hits each of the 32 banks once;
  - the transposed views Q^T, K^T and dS address the same elements as Q, K and dS^T.
No GPU needed.

Compile and run (from csrc/dev; needs the CUTLASS headers: pip install nvidia-cutlass):
  make sm90_layout_checks && ./sm90_layout_checks
*/
#include <cstdio>
#include <vector>

#include "../cuda/attention_sm90.cuh"

using namespace cute;

static int g_failures = 0;

#define CHECK(condition, ...)              \
  do {                                     \
    if (!(condition)) {                    \
      if (g_failures < 10) {               \
        printf("  FAIL: " __VA_ARGS__);    \
        printf("\n");                      \
      }                                    \
      ++g_failures;                        \
    }                                      \
  } while (0)

template <typename T, int kHeadDim>
void check_layouts(const char* name) {
  using Tiles = fastgpt::cuda::sm90::Sm90Tiles<T, kHeadDim>;
  constexpr int kBlockM = Tiles::kBlockM;
  constexpr int kBlockN = Tiles::kBlockN;
  const int failures_before = g_failures;
  typename Tiles::MmaQK mma_qk;
  typename Tiles::MmaPV mma_pv;
  auto s_layout = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{}).layout();
  auto p_layout = fastgpt::cuda::sm90::accumulator_as_operand_a(s_layout);
  static_assert(size(decltype(p_layout){}) == size(decltype(s_layout){}));

  // rows[t][r] and the columns thread t holds of its row r.
  std::vector<std::vector<int>> rows(256);
  std::vector<std::vector<std::vector<int>>> columns(256);
  for (int t = 0; t < 256; ++t) {
    auto thread_qk = mma_qk.get_thread_slice(t);
    auto thread_pv = mma_pv.get_thread_slice(t);
    Tensor s_coord = thread_qk.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
    Tensor p_coord = thread_pv.partition_A(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
    Tensor o_coord = thread_pv.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    Tensor s_rows_cols = make_tensor(s_coord.data(), fastgpt::cuda::sm90::accumulator_rows_cols(s_coord.layout()));
    Tensor o_rows_cols = make_tensor(o_coord.data(), fastgpt::cuda::sm90::accumulator_rows_cols(o_coord.layout()));
    CHECK(size<0>(s_rows_cols) == size<0>(o_rows_cols), "%s: S and O views differ in rows", name);
    CHECK(size(p_coord) == size(s_coord), "%s: the A operand holds %d values, S %d", name, int(size(p_coord)),
          int(size(s_coord)));

    const int warpgroup_row0 = 64 * (t / 128);
    rows[t].resize(size<0>(s_rows_cols));
    columns[t].resize(size<0>(s_rows_cols));
    for (int r = 0; r < size<0>(s_rows_cols); ++r) {
      const int row = get<0>(s_rows_cols(r, 0));
      rows[t][r] = row;
      CHECK(row >= warpgroup_row0 && row < warpgroup_row0 + 64, "%s: thread %d row %d outside its warpgroup", name,
            t, row);
      for (int c = 0; c < size<1>(s_rows_cols); ++c) {
        CHECK(get<0>(s_rows_cols(r, c)) == row, "%s: thread %d view row %d mixes tile rows", name, t, r);
        columns[t][r].push_back(get<1>(s_rows_cols(r, c)));
      }
      for (int c = 0; c < size<1>(o_rows_cols); ++c) {
        CHECK(get<0>(o_rows_cols(r, c)) == row, "%s: thread %d O view row %d is not S's row %d", name, t, r, row);
      }
    }

    // Register i of S sits at offset s_layout(i); operand position a reads offset p_layout(a).
    std::vector<int> s_index_at_offset(size(s_layout), -1);
    for (int i = 0; i < size(s_layout); ++i) s_index_at_offset[s_layout(i)] = i;
    for (int a = 0; a < size(p_layout); ++a) {
      const int i = s_index_at_offset[p_layout(a)];
      CHECK(i >= 0, "%s: operand position %d reads no S register", name, a);
      if (i < 0) continue;
      CHECK(get<0>(p_coord(a)) == get<0>(s_coord(i)) && get<1>(p_coord(a)) == get<1>(s_coord(i)),
            "%s: thread %d operand (%d, %d) holds S (%d, %d)", name, t, int(get<0>(p_coord(a))),
            int(get<1>(p_coord(a))), int(get<0>(s_coord(i))), int(get<1>(s_coord(i))));
    }
  }

  // A quad holds whole rows: the same rows in every lane, each column once.
  for (int t = 0; t < 256; t += 4) {
    for (size_t r = 0; r < rows[t].size(); ++r) {
      std::vector<int> seen(kBlockN, 0);
      for (int lane = t; lane < t + 4; ++lane) {
        CHECK(rows[lane][r] == rows[t][r], "%s: quad of thread %d splits row %d", name, t, rows[t][r]);
        for (int column : columns[lane][r]) ++seen[column];
      }
      for (int column = 0; column < kBlockN; ++column) {
        CHECK(seen[column] == 1, "%s: quad of thread %d holds column %d of row %d %d times", name, t, column,
              rows[t][r], seen[column]);
      }
    }
  }
  printf("%-16s %s\n", name, g_failures == failures_before ? "OK" : "FAIL");
}

template <typename T, int kHeadDim>
void check_backward_layouts(const char* name) {
  using Tiles = fastgpt::cuda::sm90::Sm90BackwardTiles<T, kHeadDim>;
  constexpr int kBlockM = Tiles::kBlockM;
  constexpr int kBlockN = Tiles::kBlockN;
  const int failures_before = g_failures;
  typename Tiles::MmaSdP mma_sdp;
  typename Tiles::MmaDkv mma_dkv;
  typename Tiles::MmaDq mma_dq;
  auto s_layout = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{}).layout();
  auto p_layout = fastgpt::cuda::sm90::accumulator_as_operand_a(s_layout);

  std::vector<int> dq_seen(kBlockM * kHeadDim, 0), dkv_seen(kBlockN * kHeadDim, 0);
  constexpr int kDqColumns = kHeadDim / 2;
  // dq_bank_words[warp][pair][bank]: 4-byte words the warp's store of register pair `pair` puts in `bank`.
  const int dq_pairs = size(partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{})) / 2;
  using BankWords = std::vector<std::vector<std::vector<int>>>;
  BankWords dq_bank_words(8, std::vector<std::vector<int>>(dq_pairs, std::vector<int>(32, 0)));
  const int dkv_pairs = size(partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{})) / 2;
  BankWords dkv_bank_words(8, std::vector<std::vector<int>>(dkv_pairs, std::vector<int>(32, 0)));
  for (int t = 0; t < 256; ++t) {
    auto thread_sdp = mma_sdp.get_thread_slice(t);
    auto thread_dkv = mma_dkv.get_thread_slice(t);
    auto thread_dq = mma_dq.get_thread_slice(t);
    Tensor s_coord = thread_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));
    Tensor p_coord = thread_dkv.partition_A(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));
    Tensor dq_coord = thread_dq.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    Tensor dkv_coord = thread_dkv.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
    Tensor s_rows_cols = make_tensor(s_coord.data(), fastgpt::cuda::sm90::accumulator_rows_cols(s_coord.layout()));

    const int warpgroup_key0 = 64 * (t / 128);
    for (int c = 0; c < size<1>(s_rows_cols); ++c) {
      for (int r = 0; r < size<0>(s_rows_cols); ++r) {
        CHECK(get<1>(s_rows_cols(r, c)) == get<1>(s_rows_cols(0, c)), "%s: thread %d S^T column %d mixes queries",
              name, t, c);
        const int key = get<0>(s_rows_cols(r, c));
        CHECK(key >= warpgroup_key0 && key < warpgroup_key0 + 64, "%s: thread %d key %d outside its warpgroup", name,
              t, key);
      }
    }

    std::vector<int> s_index_at_offset(size(s_layout), -1);
    for (int i = 0; i < size(s_layout); ++i) s_index_at_offset[s_layout(i)] = i;
    CHECK(size(p_coord) == size(s_coord), "%s: the dK/dV A operand holds %d values, S^T %d", name,
          int(size(p_coord)), int(size(s_coord)));
    for (int a = 0; a < size(p_layout); ++a) {
      const int i = s_index_at_offset[p_layout(a)];
      CHECK(i >= 0, "%s: operand position %d reads no S^T register", name, a);
      if (i < 0) continue;
      CHECK(get<0>(p_coord(a)) == get<0>(s_coord(i)) && get<1>(p_coord(a)) == get<1>(s_coord(i)),
            "%s: thread %d dK/dV operand (%d, %d) holds S^T (%d, %d)", name, t, int(get<0>(p_coord(a))),
            int(get<1>(p_coord(a))), int(get<0>(s_coord(i))), int(get<1>(s_coord(i))));
    }

    for (int i = 0; i < size(s_coord); i += 2) {
      const int key = get<0>(s_coord(i)), query = get<1>(s_coord(i));
      CHECK(get<0>(s_coord(i + 1)) == key && get<1>(s_coord(i + 1)) == query + 1 && query % 2 == 0,
            "%s: thread %d S^T registers %d, %d are not one key's query pair", name, t, i, i + 1);
      for (int buffer = 0; buffer < 2; ++buffer) {
        const int offset = fastgpt::cuda::sm90::swizzled_byte_offset<T>(typename Tiles::SmemDst{},
                                                                         make_coord(key, query, buffer));
        const int next = fastgpt::cuda::sm90::swizzled_byte_offset<T>(typename Tiles::SmemDst{},
                                                                       make_coord(key, query + 1, buffer));
        CHECK(offset % 4 == 0 && next == offset + int(sizeof(T)), "%s: dS^T pair (%d, %d) not one 32-bit word", name,
              key, query);
      }
    }

    const int warpgroup = t / 128;
    // As the kernel builds it, at a base past 0 that is a multiple of the swizzle's 1024-byte period.
    constexpr uint32_t kRunBase = 64 * 1024;
    const fastgpt::cuda::sm90::SwizzledRun<float, typename Tiles::SmemDqAccum> dq_run(
        typename Tiles::SmemDqAccum{}, kRunBase,
        make_coord(get<0>(dq_coord(0)), get<1>(dq_coord(0)) - warpgroup * kDqColumns, warpgroup));
    for (int i = 0; i < size(dq_coord); i += 2) {
      const int row = get<0>(dq_coord(i)), column = get<1>(dq_coord(i));
      CHECK(get<0>(dq_coord(i + 1)) == row && get<1>(dq_coord(i + 1)) == column + 1 && column % 2 == 0,
            "%s: thread %d dQ registers %d, %d are not a column pair", name, t, i, i + 1);
      const int local = column - warpgroup * kDqColumns;
      CHECK(local >= 0 && local < kDqColumns, "%s: thread %d dQ column %d outside its warpgroup's", name, t, column);
      const int offset = fastgpt::cuda::sm90::swizzled_byte_offset<float>(typename Tiles::SmemDqAccum{},
                                                                          make_coord(row, local, warpgroup));
      const int next = fastgpt::cuda::sm90::swizzled_byte_offset<float>(typename Tiles::SmemDqAccum{},
                                                                        make_coord(row, local + 1, warpgroup));
      CHECK(offset % 8 == 0 && next == offset + 4, "%s: dQ staging pair (%d, %d) not one 8-byte word", name, row,
            column);
      const auto delta = make_coord(row - get<0>(dq_coord(0)), column - get<1>(dq_coord(0)), 0);
      CHECK(int(dq_run.address(delta) - kRunBase) == offset, "%s: thread %d SwizzledRun puts dQ (%d, %d) at %d, not %d",
            name, t, row, column, int(dq_run.address(delta) - kRunBase), offset);
      ++dq_bank_words[t / 32][i / 2][(offset / 4) % 32];
      ++dq_bank_words[t / 32][i / 2][(next / 4) % 32];
    }
    constexpr uint32_t kStagingBase = 32 * 1024;  // a multiple of the swizzle's period, as the kernel's
    const fastgpt::cuda::sm90::SwizzledRun<T, typename Tiles::SmemV> dkv_run(
        typename Tiles::SmemV{}, kStagingBase, make_coord(get<0>(dkv_coord(0)), get<1>(dkv_coord(0))));
    for (int i = 0; i < size(dkv_coord); i += 2) {
      const int key = get<0>(dkv_coord(i)), column = get<1>(dkv_coord(i));
      CHECK(get<0>(dkv_coord(i + 1)) == key && get<1>(dkv_coord(i + 1)) == column + 1 && column % 2 == 0,
            "%s: thread %d dK/dV registers %d, %d are not a column pair", name, t, i, i + 1);
      const int offset =
          fastgpt::cuda::sm90::swizzled_byte_offset<T>(typename Tiles::SmemV{}, make_coord(key, column));
      const int next =
          fastgpt::cuda::sm90::swizzled_byte_offset<T>(typename Tiles::SmemV{}, make_coord(key, column + 1));
      CHECK(offset % 4 == 0 && next == offset + int(sizeof(T)), "%s: dK/dV staging pair (%d, %d) not one 32-bit word",
            name, key, column);
      const auto delta = make_coord(key - get<0>(dkv_coord(0)), column - get<1>(dkv_coord(0)));
      CHECK(int(dkv_run.address(delta) - kStagingBase) == offset,
            "%s: thread %d SwizzledRun puts dK/dV (%d, %d) at %d, not %d", name, t, key, column,
            int(dkv_run.address(delta) - kStagingBase), offset);
      ++dkv_bank_words[t / 32][i / 2][(offset / 4) % 32];
    }
    for (int i = 0; i < size(dq_coord); ++i) ++dq_seen[get<0>(dq_coord(i)) * kHeadDim + get<1>(dq_coord(i))];
    for (int i = 0; i < size(dkv_coord); ++i) ++dkv_seen[get<0>(dkv_coord(i)) * kHeadDim + get<1>(dkv_coord(i))];
  }
  for (int seen : dq_seen) CHECK(seen == 1, "%s: a dQ element is held %d times", name, seen);
  for (int warp = 0; warp < 8; ++warp) {
    for (int pair = 0; pair < dq_pairs; ++pair) {
      for (int bank = 0; bank < 32; ++bank) {
        CHECK(dq_bank_words[warp][pair][bank] == 2, "%s: warp %d's dQ store %d puts %d words in bank %d", name, warp,
              pair, dq_bank_words[warp][pair][bank], bank);
      }
    }
  }
  for (int seen : dkv_seen) CHECK(seen == 1, "%s: a dK/dV element is held %d times", name, seen);
  for (int warp = 0; warp < 8; ++warp) {
    for (int pair = 0; pair < dkv_pairs; ++pair) {
      for (int bank = 0; bank < 32; ++bank) {
        CHECK(dkv_bank_words[warp][pair][bank] == 1, "%s: warp %d's dK/dV store %d puts %d words in bank %d", name,
              warp, pair, dkv_bank_words[warp][pair][bank], bank);
      }
    }
  }

  // Shared-memory views, compared by element address (host arrays stand in for shared memory; the
  // alignment is the kernel's).
  alignas(1024) static T ds[cosize_v<typename Tiles::SmemDst>];
  alignas(1024) static T q[cosize_v<typename Tiles::SmemQ>];
  alignas(1024) static T k[cosize_v<typename Tiles::SmemK>];
  Tensor sdSt = make_tensor(make_smem_ptr(ds), typename Tiles::SmemDst{});
  Tensor sdS = make_tensor(make_smem_ptr(ds), typename Tiles::SmemDs{});
  for (int buffer = 0; buffer < 2; ++buffer) {
    for (int key = 0; key < kBlockN; ++key) {
      for (int query = 0; query < kBlockM; ++query) {
        const T* element = raw_pointer_cast(&sdSt(key, query, buffer));
        CHECK(element == raw_pointer_cast(&sdS(query, key, buffer)), "%s: dS and dS^T views differ", name);
        CHECK(int((element - ds) * sizeof(T)) == fastgpt::cuda::sm90::swizzled_byte_offset<T>(
                                                     typename Tiles::SmemDst{}, make_coord(key, query, buffer)),
              "%s: swizzled_byte_offset differs from CuTe at (%d, %d, %d)", name, key, query, buffer);
      }
    }
  }
  Tensor sQ = make_tensor(make_smem_ptr(q), typename Tiles::SmemQ{});
  Tensor sQt = make_tensor(make_smem_ptr(q), typename Tiles::SmemQt{});
  for (int stage = 0; stage < Tiles::kStages; ++stage) {
    for (int row = 0; row < kBlockM; ++row) {
      for (int d = 0; d < kHeadDim; ++d) {
        CHECK(raw_pointer_cast(&sQ(row, d, stage)) == raw_pointer_cast(&sQt(d, row, stage)),
              "%s: Q and Q^T views differ", name);
      }
    }
  }
  alignas(1024) static float dq[cosize_v<typename Tiles::SmemDqAccum>];
  static_assert(cosize_v<typename Tiles::SmemDqAccum> == kBlockM * kHeadDim, "the dQ staging tiles have gaps");
  Tensor sdQ = make_tensor(make_smem_ptr(dq), typename Tiles::SmemDqAccum{});
  for (int warpgroup = 0; warpgroup < 2; ++warpgroup) {
    for (int row = 0; row < kBlockM; ++row) {
      for (int column = 0; column < kDqColumns; ++column) {
        const int offset = int((raw_pointer_cast(&sdQ(row, column, warpgroup)) - dq) * sizeof(float));
        CHECK(offset == fastgpt::cuda::sm90::swizzled_byte_offset<float>(typename Tiles::SmemDqAccum{},
                                                                         make_coord(row, column, warpgroup)),
              "%s: dQ swizzled_byte_offset differs from CuTe at (%d, %d, %d)", name, row, column, warpgroup);
        const int tile_bytes = kBlockM * kDqColumns * int(sizeof(float));
        CHECK(offset / tile_bytes == warpgroup, "%s: dQ staging (%d, %d) of warpgroup %d outside its tile", name, row,
              column, warpgroup);
      }
    }
  }
  // dK and dV staged in V's layout over the Q ring's bytes.
  Tensor sdK = make_tensor(make_smem_ptr(q), typename Tiles::SmemV{});
  for (int key = 0; key < kBlockN; ++key) {
    for (int d = 0; d < kHeadDim; ++d) {
      CHECK(int((raw_pointer_cast(&sdK(key, d)) - q) * sizeof(T)) ==
                fastgpt::cuda::sm90::swizzled_byte_offset<T>(typename Tiles::SmemV{}, make_coord(key, d)),
            "%s: dK staging swizzled_byte_offset differs from CuTe at (%d, %d)", name, key, d);
    }
  }
  Tensor sK = make_tensor(make_smem_ptr(k), typename Tiles::SmemK{});
  Tensor sKt = make_tensor(make_smem_ptr(k), typename Tiles::SmemKt{});
  for (int key = 0; key < kBlockN; ++key) {
    for (int d = 0; d < kHeadDim; ++d) {
      CHECK(raw_pointer_cast(&sK(key, d)) == raw_pointer_cast(&sKt(d, key)), "%s: K and K^T views differ", name);
    }
  }
  printf("%-25s %s\n", name, g_failures == failures_before ? "OK" : "FAIL");
}

int main() {
  check_layouts<cutlass::bfloat16_t, 64>("bfloat16 d=64");
  check_layouts<cutlass::bfloat16_t, 128>("bfloat16 d=128");
  check_layouts<cutlass::half_t, 64>("float16 d=64");
  check_layouts<cutlass::half_t, 128>("float16 d=128");
  check_backward_layouts<cutlass::bfloat16_t, 64>("backward bfloat16 d=64");
  check_backward_layouts<cutlass::bfloat16_t, 128>("backward bfloat16 d=128");
  check_backward_layouts<cutlass::half_t, 64>("backward float16 d=64");
  check_backward_layouts<cutlass::half_t, 128>("backward float16 d=128");
  printf(g_failures == 0 ? "all sm90 layout checks passed\n" : "%d sm90 layout check(s) FAILED\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
