// Tile shapes, shared-memory layouts, MMA atoms, TMA copy types and the register views of the Hopper
// attention forward (attention_fwd_sm90.cu), apart so that a CPU program (csrc/dev/sm90_layout_checks.cu)
// can check the register layouts the kernel relies on: that the rows of the (rows, columns) view of an
// accumulator are rows of the tile, that the 4 threads of a quad together hold whole rows, and that the
// accumulator registers of S, read as the A operand of the PV wgmma, hold P at the right (row, key).
// The backward's tiles (Sm90BackwardTiles, attention_bwd_sm90.cu) follow, then what both kernels share:
// the global views TMA is built on, swizzled shared-memory addressing (swizzled_byte_offset, and
// SwizzledRun for a thread's register pairs, which the backward stores its dQ, dK and dV tiles with)
// and the wgmma issue helpers.
// Needs the CUTLASS/CuTe headers (fastgpt/_cutlass_paths.py).
#pragma once

#include "../params.h"

// wgmma, TMA and setmaxnreg exist only in the architecture-specific sm_90a target; other targets of
// the kernels' files (sm_80 in a multi-architecture build) compile their kernels as stubs that are
// never launched (the launchers run only on compute capability 9.x).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FASTGPT_SM90A_DEVICE_CODE 1
#endif

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

// The backward (attention_bwd_sm90.cu): one CTA per block of kBlockN keys, looping over the query
// blocks (and GQA query heads) that see them. Everything is computed transposed, keys in wgmma's M, so
// that P^T and dS^T stay in registers as the A operands of dV += P^T dO and dK += dS^T Q:
//   S^T = K Q^T and dP^T = V dO^T: SS, (keys, queries), 64 keys per consumer warpgroup;
//   dV += P^T dO and dK += dS^T Q: RS, (keys, head_dim), B = dO^T and Q^T, transposed views of the
//     Q and dO ring slots (MN-major: head_dim contiguous);
//   dQ = dS K: SS, (queries, head_dim), A = dS from shared memory (both warpgroups' keys; MN-major,
//     queries contiguous), B = K^T;
//     the two warpgroups split head_dim, kHeadDim / 2 columns each, and each adds its columns to the
//     float32 dQ accumulator in global memory by one TMA reduce-add of a float32 shared-memory tile.
template <typename T, int kHeadDim>
struct Sm90BackwardTiles {
  static constexpr int kBlockM = 64;   // query rows a step: S^T's N and dQ's M (one wgmma M)
  static constexpr int kBlockN = 128;  // keys a CTA: 64 per consumer warpgroup (wgmma's M)
  // Q/dO ring depth. Shared memory at head_dim 128: K 32 KB + V 32 KB + 2 x (Q 16 KB + dO 16 KB) +
  // dS 2 x 16 KB + dQ float32 32 KB = 192 KB; registers, not shared memory, bound the tile: dK and dV
  // are 2 x 64 float32 registers a thread at head_dim 128.
  static constexpr int kStages = 2;

  using BlockM = Int<kBlockM>;
  using BlockN = Int<kBlockN>;
  using HeadDim = Int<kHeadDim>;
  using Stages = Int<kStages>;

  // Q and dO: (queries, head_dim, stages), head_dim contiguous; K-major B operand of S^T and dP^T.
  using SmemQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<BlockM, HeadDim, Stages>{}));
  // The same bytes as (head_dim, queries, stages): the MN-major B operand of dV and dK.
  using SmemQt = decltype(composition(SmemQ{}, make_layout(Shape<HeadDim, BlockM, Stages>{},
                                                           Stride<BlockM, _1, Int<kBlockM * kHeadDim>>{})));
  // K: (keys, head_dim), the K-major A operand of S^T; read as (head_dim, keys), the MN-major B operand
  // of dQ, whose warpgroups take kHeadDim / 2 columns each: a swizzle atom kHeadDim / 2 elements wide
  // (128 bytes at head_dim 128, 64 at 64) so that each warpgroup's slice is whole atoms.
  using AtomK = std::conditional_t<kHeadDim == 128, GMMA::Layout_K_SW128_Atom<T>, GMMA::Layout_K_SW64_Atom<T>>;
  using SmemK = decltype(tile_to_shape(AtomK{}, Shape<BlockN, HeadDim>{}));
  using SmemKt = decltype(composition(SmemK{}, make_layout(Shape<HeadDim, BlockN>{}, Stride<BlockN, _1>{})));
  using SmemV = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<BlockN, HeadDim>{}));
  // dS^T: (keys, queries, 2 buffers), queries contiguous, so that the dS^T registers (pairs of adjacent
  // queries) are stored as 32-bit words; read as dS (queries, keys, buffers), the MN-major A operand of
  // dQ. Two buffers: a warpgroup writes step i + 1's while the other may still read step i's.
  using SmemDst = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<BlockN, BlockM, _2>{}));
  using SmemDs = decltype(composition(SmemDst{}, make_layout(Shape<BlockM, BlockN, _2>{},
                                                             Stride<BlockN, _1, Int<kBlockM * kBlockN>>{})));
  // dQ's float32 staging for the TMA reduce-add: (queries, kHeadDim / 2 columns, warpgroup), each
  // warpgroup's columns one tile. Columns contiguous in 128-byte swizzle atoms (8 rows x 32 floats):
  // a warp's 8-byte stores of accumulator pairs (8 rows x 4 lanes) then spread over all 32 banks, and
  // TMA reads atoms of this swizzle. 16 KB at head_dim 128, 8 KB at 64.
  using DqColumns = Int<kHeadDim / 2>;
  using SmemDqAccum = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<float>{}, Shape<BlockM, DqColumns, _2>{}));

  using MmaSdP = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<BlockN, BlockM, HeadDim>>(),
                                         Layout<Shape<_2, _1, _1>>{}));
  using MmaDkv = decltype(make_tiled_mma(
      GMMA::rs_op_selector<T, T, float, Shape<BlockN, HeadDim, BlockM>, GMMA::Major::K, GMMA::Major::MN>(),
      Layout<Shape<_2, _1, _1>>{}));
  using MmaDq = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<BlockM, Int<kHeadDim / 2>, BlockN>, GMMA::Major::MN, GMMA::Major::MN>(),
      Layout<Shape<_1, _2, _1>>{}));

  using GmemTensor = typename Sm90Tiles<T, kHeadDim>::GmemTensor;
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemQ{}), Shape<BlockM, HeadDim>{},
                                      _1{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemK{}, Shape<BlockN, HeadDim>{}, _1{}));
  using TmaV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemV{}, Shape<BlockN, HeadDim>{}, _1{}));
  // dK and dV, staged in V's layout (over the Q and dO ring, the same size) and stored by TMA.
  using TmaDkv = decltype(make_tma_copy(SM90_TMA_STORE{}, typename Sm90Tiles<T, kHeadDim>::GmemTensorOut{}, SmemV{},
                                        Shape<BlockN, HeadDim>{}, _1{}));
  static_assert(cosize_v<SmemV> == cosize_v<SmemQ>, "dK and dV are staged in the Q and dO rings");
  // The float32 dQ accumulator (padded rows, head_dim, heads, batch), added to a (queries, kHeadDim / 2)
  // box at a time.
  using GmemTensorAccum =
      decltype(make_tensor(make_gmem_ptr(static_cast<float*>(nullptr)), typename Sm90Tiles<T, kHeadDim>::GmemLayout{}));
  using TmaDqAccum = decltype(make_tma_copy(SM90_TMA_REDUCE_ADD{}, GmemTensorAccum{}, take<0, 2>(SmemDqAccum{}),
                                            Shape<BlockM, DqColumns>{}, _1{}));
};

// A (rows, head_dim, heads, batch) view of a HeadTensor for TMA. A dimension of one element may carry
// any stride (torch gives it 0 or anything); TMA wants a nonzero multiple of 16 bytes there, so it
// gets 8 elements.
inline int64_t tma_stride(int extent, int64_t stride) { return extent == 1 || stride == 0 ? int64_t{8} : stride; }

// Whether gmem_view describes t as it is: tma_stride takes a zero stride for a dimension of one
// element, so a broadcast dimension (more than one element at stride 0, as torch's expand gives, which
// the 16-byte stride checks let through) would be read 8 elements apart instead of from the same rows.
// Each kernel's gate declines tensors for which this is false (attention_{forward,backward}_sm90_unsupported_reason).
inline bool gmem_view_exact(const HeadTensor& t, int rows, int heads, int batch) {
  return (rows == 1 || t.row_stride != 0) && (heads == 1 || t.head_stride != 0) && (batch == 1 || t.batch_stride != 0);
}

template <typename Element>
auto gmem_view(Element* data, const HeadTensor& t, int rows, int head_dim, int heads, int batch) {
  return make_tensor(make_gmem_ptr(data),
                     make_layout(make_shape(rows, head_dim, heads, batch),
                                 make_stride(tma_stride(rows, t.row_stride), _1{}, tma_stride(heads, t.head_stride),
                                             tma_stride(batch, t.batch_stride))));
}

// The same as (head_dim, rows, heads, batch).
template <typename Element>
auto gmem_view_transposed(Element* data, const HeadTensor& t, int rows, int head_dim, int heads, int batch) {
  return make_tensor(make_gmem_ptr(data),
                     make_layout(make_shape(head_dim, rows, heads, batch),
                                 make_stride(_1{}, tma_stride(rows, t.row_stride), tma_stride(heads, t.head_stride),
                                             tma_stride(batch, t.batch_stride))));
}

// Byte offset of the element at `coord` of a swizzled shared-memory layout (GMMA atoms tiled by
// tile_to_shape, from a 1024-byte aligned base): the layout without its swizzle gives the element
// offset, and the swizzle permutes byte offsets. The backward stores dS^T through it with 32-bit
// shared-memory addresses; csrc/dev/sm90_layout_checks.cu compares it with CuTe's tensor addressing.
template <typename T, typename SwizzledLayout, typename Coord>
CUTE_HOST_DEVICE constexpr int swizzled_byte_offset(SwizzledLayout layout, const Coord& coord) {
  return get_swizzle_portion(layout)(static_cast<int>(get_nonswizzle_portion(layout)(coord)) *
                                     static_cast<int>(sizeof(T)));
}

// The shared-memory addresses of a thread's elements of a swizzled layout, from two values: the
// unswizzled byte address of its first element and the swizzle's XOR mask there. A swizzle XORs low
// byte-offset bits with higher ones (bits 4-6 with bits 7-9 at 128 bytes); when the thread's other
// elements lie compile-time coordinate deltas away that move the unswizzled offset by amounts leaving
// those higher bits alone (rows 8 apart, columns within one 128-byte row, whole atoms), each one's
// address is (first + unswizzled(delta)) XOR mask: no register per element, and no arithmetic the
// compiler cannot fold but one add and one XOR. The base must be a multiple of the swizzle's period
// (1024 bytes at 128) so that adding it commutes with the XOR. csrc/dev/sm90_layout_checks.cu checks
// every element's address against swizzled_byte_offset for the layouts the kernels use it on.
template <typename T, typename SwizzledLayout>
struct SwizzledRun {
  uint32_t first;  // base + unswizzled byte offset of the first element
  uint32_t mask;   // the swizzle's XOR at the first element

  template <typename Coord>
  CUTE_HOST_DEVICE SwizzledRun(SwizzledLayout layout, uint32_t base, const Coord& first_coord)
      : first(base + static_cast<uint32_t>(get_nonswizzle_portion(layout)(first_coord)) * sizeof(T)),
        mask(static_cast<uint32_t>(swizzled_byte_offset<T>(layout, first_coord)) ^
             (static_cast<uint32_t>(get_nonswizzle_portion(layout)(first_coord)) * sizeof(T))) {}

  // The address of the element `delta` (a coordinate difference, compile-time in the kernels) past the first.
  template <typename Delta>
  CUTE_HOST_DEVICE uint32_t address(const Delta& delta) const {
    return (first + static_cast<uint32_t>(get_nonswizzle_portion(SwizzledLayout{})(delta)) * sizeof(T)) ^ mask;
  }
};

#if defined(__CUDACC__)

// Pins registers in place around wgmma: the compiler may not move reads or writes of them across
// the asynchronous MMA's issue or its wait (16-bit operands are fenced as 32-bit pairs).
template <typename Tensor>
__device__ inline void fence_registers(Tensor& t) {
  if constexpr (sizeof(typename Tensor::value_type) == 2) {
    auto words = recast<uint32_t>(t);
    warpgroup_fence_operand(words);
  } else {
    warpgroup_fence_operand(t);
  }
}

// acc (+)= A B over every k slice, issued asynchronously and committed as one group; the caller waits
// (warpgroup_wait) and then fences what it reads or writes next (a register A operand included).
template <bool kZeroInit, typename TiledMma, typename TensorA, typename TensorB, typename TensorC>
__device__ inline void issue_gemm(TiledMma& mma, const TensorA& a, const TensorB& b, TensorC& acc) {
  warpgroup_fence_operand(acc);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(acc);
}

#endif  // __CUDACC__

}  // namespace fastgpt::cuda::sm90
