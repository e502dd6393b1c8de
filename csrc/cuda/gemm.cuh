// Tile configuration of the tensor-core GEMM (gemm.cu), shared with the csrc/dev harnesses.
#pragma once

#include <type_traits>

#include "launch.h"
#include "tile.cuh"

namespace fastgpt::cuda::gemm_config {

// 128 x 128 output tile per block: 4 warps in a 2 x 2 grid of 64 x 64 warp tiles (4 m16 x 8 n8 mma
// tiles, 128 float32 accumulators a thread), so every A fragment read from shared memory feeds 8 mma
// and every B fragment 4. K advances 32 at a time through a 4-stage cp.async pipeline (64 KB); two
// blocks fit an SM by registers.
constexpr int kBlockM = kGemmBlockM;
constexpr int kBlockN = 128;
constexpr int kBlockK = 32;
constexpr int kWarpsM = 2;
constexpr int kWarpsN = 2;
constexpr int kWarps = kWarpsM * kWarpsN;
constexpr int kThreads = 32 * kWarps;
constexpr int kWarpM = kBlockM / kWarpsM;
constexpr int kWarpN = kBlockN / kWarpsN;
constexpr int kMTiles = kWarpM / 16;
constexpr int kNTiles = kWarpN / 8;
constexpr int kStages = 4;
constexpr int kGroupM = 8;  // block rows per raster group, so neighbouring blocks share B tiles in L2
static_assert(kBlockM == kBlockN, "A and B tiles share one shape");

// A or B tile of one stage: [128][32] when K is contiguous, [32][128] when the operand is transposed.
template <bool kTransposed>
using OperandTile = std::conditional_t<kTransposed, SmemTile<kBlockK, kBlockM>, SmemTile<kBlockM, kBlockK>>;
constexpr int kTileBytes = OperandTile<false>::kBytes;
static_assert(OperandTile<true>::kBytes == kTileBytes, "both layouts are unpadded");
constexpr int kStageBytes = 2 * kTileBytes;
constexpr int kPipelineBytes = kStages * kStageBytes;

// The epilogue stages the float32 tile with rows padded by 8 floats: the fragment writes (rows g,
// columns 2t) then take the minimum two shared-memory wavefronts per warp.
constexpr int kStagingStride = kBlockN + 8;
constexpr int kStagingBytes = kBlockM * kStagingStride * 4;
constexpr int kColumnSumBytes = kWarps * kBlockN * 4;  // per-warp column sums for bias_grad_partial
constexpr int kSharedBytes = (kPipelineBytes > kStagingBytes ? kPipelineBytes : kStagingBytes) + kColumnSumBytes;

}  // namespace fastgpt::cuda::gemm_config
