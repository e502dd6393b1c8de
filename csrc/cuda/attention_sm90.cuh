// Tile shapes, shared-memory layouts, MMA atoms, TMA copy types and the register views of the Hopper
// attention forward (attention_fwd_sm90.cu), apart so that a CPU program (csrc/dev/sm90_layout_checks.cu)
// can check the register layouts the kernel relies on: that the rows of the (rows, columns) view of an
// accumulator are rows of the tile, that the 4 threads of a quad together hold whole rows, and that the
// accumulator registers of S, read as the A operand of the PV wgmma, hold P at the right (row, key).
// Needs the CUTLASS/CuTe headers (fastgpt/_cutlass_paths.py).
#pragma once

// cute/tensor.hpp first: the atoms' headers build on it.
#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>

namespace fastgpt::cuda::sm90 {

using namespace cute;

template <typename T, int kHeadDim>
struct Sm90Tiles {
  static constexpr int kBlockM = 128;  // query rows a tile: 64 per consumer warpgroup (wgmma's M)
  static constexpr int kBlockN = 128;  // keys a block: S is 64 float32 registers a thread
  // K/V ring depth: Q 32 KB + 2 x (K 32 KB + V 32 KB) + O 32 KB = 192 KB at head_dim 128; at 64,
  // 3 stages (16 + 96 + 16 = 128 KB) hide more TMA latency behind the short GEMMs.
  static constexpr int kStages = kHeadDim == 64 ? 3 : 2;

  using BlockM = Int<kBlockM>;
  using BlockN = Int<kBlockN>;
  using HeadDim = Int<kHeadDim>;

  // Q, K and O: rows of head_dim contiguous elements (K-major for both GEMMs' operands), 128-byte
  // swizzle so that TMA writes and wgmma reads are bank-conflict free.
  using SmemQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<BlockM, HeadDim>{}));
  using SmemK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<BlockN, HeadDim, Int<kStages>>{}));
  // V^T: (head_dim, keys) with head_dim contiguous, the MN-major B operand of O += P V; TMA reads V
  // through a transposed view of the global tensor, so no transpose is ever done.
  using SmemVt =
      decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{}, Shape<HeadDim, BlockN, Int<kStages>>{}));

  // Two warpgroups side by side in M, each a 64 x N x 16 wgmma.
  using MmaQK = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<BlockM, BlockN, HeadDim>>(),
                                        Layout<Shape<_2, _1, _1>>{}));
  using MmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<T, T, float, Shape<BlockM, HeadDim, BlockN>, GMMA::Major::K, GMMA::Major::MN>(),
      Layout<Shape<_2, _1, _1>>{}));

  // Global tensors as TMA sees them: (rows, head_dim, heads, batch), head_dim contiguous; V as
  // (head_dim, rows, heads, batch).
  using GmemLayout = Layout<Shape<int, int, int, int>, Stride<int64_t, _1, int64_t, int64_t>>;
  using GmemLayoutT = Layout<Shape<int, int, int, int>, Stride<_1, int64_t, int64_t, int64_t>>;
  using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<const T*>(nullptr)), GmemLayout{}));
  using GmemTensorT = decltype(make_tensor(make_gmem_ptr(static_cast<const T*>(nullptr)), GmemLayoutT{}));
  using GmemTensorOut = decltype(make_tensor(make_gmem_ptr(static_cast<T*>(nullptr)), GmemLayout{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemQ{}, Shape<BlockM, HeadDim>{}, _1{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemK{}), Shape<BlockN, HeadDim>{},
                                      _1{}));
  using TmaVt = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensorT{}, take<0, 2>(SmemVt{}),
                                       Shape<HeadDim, BlockN>{}, _1{}));
  using TmaO = decltype(make_tma_copy(SM90_TMA_STORE{}, GmemTensorOut{}, SmemQ{}, Shape<BlockM, HeadDim>{}, _1{}));
};

// A wgmma accumulator ((2 columns, 2 rows, N/8), M tiles, N tiles) seen as (rows, columns):
// ((2 rows, M tiles), (2 columns, N/8, N tiles)), so that row reductions run over mode 1.
template <typename Layout>
CUTE_HOST_DEVICE constexpr auto accumulator_rows_cols(Layout layout) {
  static_assert(rank_v<decltype(get<0>(layout))> == 3 && rank_v<Layout> == 3);
  return make_layout(make_layout(get<0, 1>(layout), get<1>(layout)),
                     make_layout(get<0, 0>(layout), get<0, 2>(layout), get<2>(layout)));
}

// The same registers as the A operand of a k16 wgmma: two n8 column groups of the accumulator make
// one k16 slice, i.e. ((2, 2, 2), M tiles, N / 16).
template <typename Layout>
CUTE_HOST_DEVICE constexpr auto accumulator_as_operand_a(Layout layout) {
  static_assert(size<0, 2>(layout) % 2 == 0);
  const auto column_groups = logical_divide(get<0, 2>(layout), Int<2>{});  // (2, N/16)
  return make_layout(make_layout(get<0, 0>(layout), get<0, 1>(layout), get<0>(column_groups)), get<1>(layout),
                     get<1>(column_groups));
}

}  // namespace fastgpt::cuda::sm90
