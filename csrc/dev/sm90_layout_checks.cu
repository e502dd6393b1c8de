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

int main() {
  check_layouts<cutlass::bfloat16_t, 64>("bfloat16 d=64");
  check_layouts<cutlass::bfloat16_t, 128>("bfloat16 d=128");
  check_layouts<cutlass::half_t, 64>("float16 d=64");
  check_layouts<cutlass::half_t, 128>("float16 d=128");
  printf(g_failures == 0 ? "all sm90 layout checks passed\n" : "%d sm90 layout check(s) FAILED\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
