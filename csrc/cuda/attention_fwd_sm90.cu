// Causal attention forward for Hopper (sm_90a) on CuTe: TMA tile copies into an mbarrier ring,
// warpgroup MMAs (wgmma), warp specialisation with register reallocation. FlashAttention-3's scheme,
// written for fastgpt's AttentionParams; the sm_80 kernel (attention_fwd.cu) serves everything else.
//
// One CTA = 3 warpgroups (384 threads), persistent over output tiles of 128 query rows:
//   warpgroup 0, the producer: gives up registers (setmaxnreg 24); one thread issues every TMA load:
//     Q once per tile into its own buffer, then K and V of each KV block into a ring of kStages
//     slots. Each slot has a "full" mbarrier per tensor (the TMA's transaction count completes it)
//     and an "empty" one that the 8 consumer warps arrive on when their GEMMs have read it.
//   warpgroups 1 and 2, the consumers: take registers (setmaxnreg 240); each owns 64 of the 128 rows.
//     S = Q K^T is an SS wgmma (both operands in shared memory); the online softmax runs on S in
//     registers; P, converted to 16 bits in registers, is the A operand of the RS wgmma O += P V.
//     Inside a warpgroup, the QK^T of block j is issued together with the PV of block j - 1, so the
//     softmax of block j runs while that PV is on the tensor cores. Between the two warpgroups a pair
//     of named barriers passes a turn: a warpgroup issues its GEMMs only on its turn and hands it on
//     right after, so one warpgroup's softmax overlaps the other's GEMMs (ping-pong).
//   After the last block, the consumers normalise O, store the logsumexp, stage O (16-bit) in shared
//   memory and one thread writes it with a TMA store.
// KV blocks are visited from the diagonal down to block 0: blocks above the diagonal are never loaded,
// the mask is applied only to blocks that cross the diagonal or kv_len (ragged), and the bottom-right
// alignment (query i sees keys j <= i + kv_len - q_len) comes from the block ranges of attention.cuh.
// GQA: query head h reads kv head h / (heads / kv_heads) by TMA coordinate.
//
// Tiles are numbered longest first (the query blocks nearest the end see the most keys) and the
// persistent CTAs (one per SM) take tile blockIdx.x, then every gridDim.x-th after it.
//
// Head dims 64 and 128, 128 x 128 tiles. Plan for the others (not instantiated yet):
//   96: the same code with kHeadDim = 96 and 2 stages, on 64-byte swizzle atoms (Layout_K_SW64 /
//       Layout_MN_SW64: the 128-byte atoms span 64 elements, which 96 is not a multiple of); wgmma
//       takes N = 96 for the PV.
//   256: O alone is 128 float32 registers a thread (64 rows a warpgroup), so S shrinks to 128 x 80
//       (40 registers) and the intra-warpgroup overlap may have to go; shared memory: Q 64 KB +
//       2 stages x (K + V, 40 KB each) = 224 KB, so O is staged in Q's buffer instead of its own.
#include <cuda_runtime.h>

#include <cmath>

#include "attention.cuh"
#include "attention_sm90.cuh"
#include "launch.h"
#include "mma.cuh"

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

namespace fastgpt::cuda {

namespace {

using namespace cute;
using sm90::accumulator_as_operand_a;
using sm90::accumulator_rows_cols;
using sm90::fence_registers;
using sm90::gmem_view;
using sm90::gmem_view_exact;
using sm90::gmem_view_transposed;
using sm90::issue_gemm;
using sm90::Sm90Tiles;

constexpr int kThreads = 384;  // producer warpgroup + 2 consumer warpgroups

template <typename T, int kHeadDim>
struct SharedStorage {
  using Tiles = Sm90Tiles<T, kHeadDim>;
  // 1024-byte alignment: the period of the 128-byte swizzle, which TMA and wgmma address by.
  alignas(1024) T q[cosize_v<typename Tiles::SmemQ>];
  alignas(1024) T k[cosize_v<typename Tiles::SmemK>];
  alignas(1024) T v[cosize_v<typename Tiles::SmemVt>];
  alignas(1024) T o[cosize_v<typename Tiles::SmemQ>];
  uint64_t q_full;
  uint64_t q_empty;
  uint64_t k_full[Tiles::kStages];
  uint64_t k_empty[Tiles::kStages];
  uint64_t v_full[Tiles::kStages];
  uint64_t v_empty[Tiles::kStages];
};

// Everything the kernel reads, passed as a __grid_constant__ parameter (TMA descriptors must be).
template <typename T, int kHeadDim>
struct Sm90Params {
  using Tiles = Sm90Tiles<T, kHeadDim>;
  typename Tiles::TmaQ tma_q;
  typename Tiles::TmaK tma_k;
  typename Tiles::TmaVt tma_vt;
  typename Tiles::TmaO tma_o;
  int batch, heads, kv_heads, q_len, kv_len;
  int num_m_blocks, num_tiles;
  float scale_log2;  // softmax_scale * log2(e): scores go through exp2
  float* lse;        // (batch, heads, q_len)
};

// Device-side pieces, compiled for sm_90a only (see FASTGPT_SM90A_DEVICE_CODE).
#if defined(FASTGPT_SM90A_DEVICE_CODE)

constexpr float kLn2 = 0.6931471805599453f;

constexpr int kProducerRegisters = 24;   // the producer only computes coordinates and issues TMA
constexpr int kConsumerRegisters = 240;  // 24 x 128 + 240 x 256 = 64512 <= 65536 registers per SM
constexpr int kConsumerThreads = 256;
constexpr int kConsumerWarps = kConsumerThreads / 32;

// Named barriers (ids past the ones CUTLASS reserves; hardware barrier 0 is __syncthreads):
// kTurnBarrier + w: consumer warpgroup w may issue its GEMMs; kOutputBarrier: the consumers' O
// staging buffer is free / written.
constexpr uint32_t kTurnBarrier = 0;
constexpr uint32_t kOutputBarrier = 2;

// A tile's coordinates from its number: longest first, i.e. the last query block of every
// (batch, head) before the one above it.
struct TileCoord {
  int m_block, head, batch;
};

__device__ inline TileCoord tile_coord(int tile, int num_m_blocks, int heads, int batch) {
  const int heads_total = heads * batch;
  const int bh = tile % heads_total;
  return {num_m_blocks - 1 - tile / heads_total, bh % heads, bh / heads};
}

// The ring position of the i-th KV block a CTA handles (counted over all its tiles): slot and the
// parity of the slot's current use.
struct RingState {
  int index = 0;
  __device__ int slot(int stages) const { return index % stages; }
  __device__ uint32_t parity(int stages) const { return static_cast<uint32_t>((index / stages) & 1); }
};

#endif  // FASTGPT_SM90A_DEVICE_CODE

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, 1)
    attention_forward_sm90_kernel(const __grid_constant__ Sm90Params<T, kHeadDim> p) {
#if defined(FASTGPT_SM90A_DEVICE_CODE)
  using Tiles = Sm90Tiles<T, kHeadDim>;
  using Storage = SharedStorage<T, kHeadDim>;
  using ClusterBarrier = cutlass::arch::ClusterBarrier;
  using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kBlockM = Tiles::kBlockM;
  constexpr int kBlockN = Tiles::kBlockN;
  constexpr int kStages = Tiles::kStages;
  constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(T);
  constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(T);  // one K or one V block

  extern __shared__ __align__(1024) uint8_t shared_bytes[];
  Storage& shared = *reinterpret_cast<Storage*>(shared_bytes);
  Tensor sQ = make_tensor(make_smem_ptr(shared.q), typename Tiles::SmemQ{});    // (BlockM, D)
  Tensor sK = make_tensor(make_smem_ptr(shared.k), typename Tiles::SmemK{});    // (BlockN, D, stages)
  Tensor sVt = make_tensor(make_smem_ptr(shared.v), typename Tiles::SmemVt{});  // (D, BlockN, stages)
  Tensor sO = make_tensor(make_smem_ptr(shared.o), typename Tiles::SmemQ{});    // (BlockM, D)

  const int warpgroup = threadIdx.x / 128;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group_size = p.heads / p.kv_heads;
  const int diagonal = p.kv_len - p.q_len;

  if (threadIdx.x == 0) {
    TxBarrier::init(&shared.q_full, 1);
    ClusterBarrier::init(&shared.q_empty, kConsumerWarps);
    for (int s = 0; s < kStages; ++s) {
      TxBarrier::init(&shared.k_full[s], 1);
      TxBarrier::init(&shared.v_full[s], 1);
      ClusterBarrier::init(&shared.k_empty[s], kConsumerWarps);
      ClusterBarrier::init(&shared.v_empty[s], kConsumerWarps);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (warpgroup == 0) {
    // ---- Producer ----
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegisters>();
    if (warp != 0 || lane != 0) return;
    Tensor mQ = p.tma_q.get_tma_tensor(make_shape(p.q_len, Int<kHeadDim>{}, p.heads, p.batch));
    Tensor mK = p.tma_k.get_tma_tensor(make_shape(p.kv_len, Int<kHeadDim>{}, p.kv_heads, p.batch));
    Tensor mVt = p.tma_vt.get_tma_tensor(make_shape(Int<kHeadDim>{}, p.kv_len, p.kv_heads, p.batch));
    auto tma_q = p.tma_q.get_slice(0);
    auto tma_k = p.tma_k.get_slice(0);
    auto tma_vt = p.tma_vt.get_slice(0);
    Tensor tQsQ = tma_q.partition_D(sQ);
    Tensor tKsK = tma_k.partition_D(sK);
    Tensor tVsV = tma_vt.partition_D(sVt);
    RingState ring;
    int tile_count = 0;
    for (int tile = blockIdx.x; tile < p.num_tiles; tile += gridDim.x, ++tile_count) {
      const TileCoord c = tile_coord(tile, p.num_m_blocks, p.heads, p.batch);
      const int kv_head = c.head / group_size;
      const int num_blocks = causal_kv_blocks(c.m_block * kBlockM, kBlockM, kBlockN, p.kv_len, diagonal);
      Tensor gQ = local_tile(mQ(_, _, c.head, c.batch), Shape<Int<kBlockM>, Int<kHeadDim>>{},
                             make_coord(c.m_block, _0{}));  // (BlockM, D)
      Tensor gK = local_tile(mK(_, _, kv_head, c.batch), Shape<Int<kBlockN>, Int<kHeadDim>>{},
                             make_coord(_, _0{}));  // (BlockN, D, blocks)
      Tensor gVt = local_tile(mVt(_, _, kv_head, c.batch), Shape<Int<kHeadDim>, Int<kBlockN>>{},
                              make_coord(_0{}, _));  // (D, BlockN, blocks)
      Tensor tQgQ = tma_q.partition_S(gQ);
      Tensor tKgK = tma_k.partition_S(gK);
      Tensor tVgV = tma_vt.partition_S(gVt);

      // Q of the previous tile has been read by every QK^T.
      ClusterBarrier::wait(&shared.q_empty, (tile_count & 1) ^ 1);
      TxBarrier::arrive_and_expect_tx(&shared.q_full, kQBytes);
      copy(p.tma_q.with(shared.q_full), tQgQ, tQsQ);
      for (int block = num_blocks - 1; block >= 0; --block, ++ring.index) {
        const int s = ring.slot(kStages);
        const uint32_t free_parity = ring.parity(kStages) ^ 1;
        ClusterBarrier::wait(&shared.k_empty[s], free_parity);
        TxBarrier::arrive_and_expect_tx(&shared.k_full[s], kKVBytes);
        copy(p.tma_k.with(shared.k_full[s]), tKgK(_, _, _, block), tKsK(_, _, _, s));
        ClusterBarrier::wait(&shared.v_empty[s], free_parity);
        TxBarrier::arrive_and_expect_tx(&shared.v_full[s], kKVBytes);
        copy(p.tma_vt.with(shared.v_full[s]), tVgV(_, _, _, block), tVsV(_, _, _, s));
      }
    }
    return;
  }

  // ---- Consumers ----
  cutlass::arch::warpgroup_reg_alloc<kConsumerRegisters>();
  const int consumer = warpgroup - 1;              // 0 or 1: rows [64 * consumer, 64 * consumer + 64)
  const int consumer_thread = threadIdx.x - 128;   // 0..255
  const bool warp_leader = lane == 0;

  typename Tiles::MmaQK mma_qk;
  typename Tiles::MmaPV mma_pv;
  auto thread_qk = mma_qk.get_thread_slice(consumer_thread);
  auto thread_pv = mma_pv.get_thread_slice(consumer_thread);
  Tensor tSrQ = thread_qk.partition_fragment_A(sQ);    // descriptors (MMA, 1, D/16)
  Tensor tSrK = thread_qk.partition_fragment_B(sK);    // (MMA, 1, D/16, stages)
  Tensor tOrVt = thread_pv.partition_fragment_B(sVt);  // (MMA, 1, BlockN/16, stages)
  Tensor tOsO = thread_pv.partition_C(sO);             // this thread's O elements in shared memory

  // (row, column) of each accumulator element of S within the tile.
  Tensor tScS = thread_qk.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));

  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});  // S, float32
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // O, float32
  Tensor tOrP = make_tensor<T>(accumulator_as_operand_a(tSrS.layout()));           // P, 16-bit A operand
  Tensor tOrP_as_S = make_tensor(tOrP.data(), tSrS.layout());                      // P indexed like S
  static_assert(size(tOrP) == size(tSrS));

  Tensor S = make_tensor(tSrS.data(), accumulator_rows_cols(tSrS.layout()));    // (rows, columns)
  Tensor S_coord = make_tensor(tScS.data(), accumulator_rows_cols(tScS.layout()));
  Tensor O = make_tensor(tOrO.data(), accumulator_rows_cols(tOrO.layout()));
  constexpr int kRows = size<0>(decltype(S.layout()){});  // rows of the tile this thread holds (2)
  static_assert(kRows == size<0>(decltype(O.layout()){}));

  // Ping-pong: the turn to issue GEMMs goes WG 0, WG 1, WG 0, ... Each warpgroup issues num_blocks + 1
  // GEMM batches a tile; the first batch of WG 0 needs no turn and the last of WG 1 passes none on,
  // so the arrivals and waits of each tile pair up. A warpgroup is never two arrivals ahead on a turn
  // barrier (which would complete it without the other): within a tile each arrival waits for the
  // other's previous one, and WG 0's untaken first turn of the next tile comes after the epilogue's
  // kOutputBarrier, which WG 1 reaches only after its last turn of this one.
  auto take_turn = [&](bool first) {
    if (!(consumer == 0 && first)) cutlass::arch::NamedBarrier::sync(2 * 128, kTurnBarrier + consumer);
  };
  auto pass_turn = [&](bool last) {
    if (!(consumer == 1 && last)) cutlass::arch::NamedBarrier::arrive(2 * 128, kTurnBarrier + 1 - consumer);
  };
  auto release = [&](uint64_t* barrier) {
    if (warp_leader) ClusterBarrier::arrive(barrier);
  };

  float row_max[kRows];  // running max of the scaled scores, log2 units
  float row_sum[kRows];  // this thread's share of the running sum of exp2
  // Online softmax of the block in S: updates row_max and row_sum, leaves exp2(S - max) in S and the
  // factor by which the O accumulated so far must be scaled in `correction`.
  auto softmax = [&](float (&correction)[kRows]) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float block_max = -INFINITY;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(S); ++c) block_max = fmaxf(block_max, S(r, c));
      // The 4 threads of a quad hold one row.
      block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 1));
      block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 2));
      const float new_max = fmaxf(row_max[r], block_max * p.scale_log2);
      // A row with every score masked so far keeps max -inf: exponentiate against 0, giving 0, not NaN.
      const float base = new_max == -INFINITY ? 0.0f : new_max;
      correction[r] = fast_exp2(row_max[r] - base);
      row_max[r] = new_max;
      float block_sum = 0.0f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(S); ++c) {
        S(r, c) = fast_exp2(fmaf(S(r, c), p.scale_log2, -base));
        block_sum += S(r, c);
      }
      row_sum[r] = row_sum[r] * correction[r] + block_sum;
    }
  };
  // -inf for keys past the causal limit of their row or past kv_len (only blocks that need it).
  auto mask = [&](int q0, int block) {
    const int k0 = block * kBlockN;
    CUTE_UNROLL
    for (int i = 0; i < size(S); ++i) {
      const int row = q0 + get<0>(S_coord(i));
      const int key = k0 + get<1>(S_coord(i));
      if (key > row + diagonal || key >= p.kv_len) S(i) = -INFINITY;
    }
  };
  auto convert_p = [&]() {
    CUTE_UNROLL
    for (int i = 0; i < size(tSrS); ++i) tOrP_as_S(i) = static_cast<T>(tSrS(i));
    fence_registers(tOrP);
  };

  RingState ring;
  int tile_count = 0;
  for (int tile = blockIdx.x; tile < p.num_tiles; tile += gridDim.x, ++tile_count) {
    const TileCoord c = tile_coord(tile, p.num_m_blocks, p.heads, p.batch);
    const int q0 = c.m_block * kBlockM;
    const int num_blocks = causal_kv_blocks(q0, kBlockM, kBlockN, p.kv_len, diagonal);
    const int num_unmasked = causal_unmasked_blocks(q0, kBlockN, num_blocks, diagonal);
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.0f;
    }
    clear(tOrO);

    // Block num_blocks - 1 (the diagonal one): S only.
    int block = num_blocks - 1;
    int s = ring.slot(kStages);
    ClusterBarrier::wait(&shared.q_full, tile_count & 1);
    ClusterBarrier::wait(&shared.k_full[s], ring.parity(kStages));
    take_turn(true);
    issue_gemm<true>(mma_qk, tSrQ, tSrK(_, _, _, s), tSrS);
    pass_turn(false);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);
    release(&shared.k_empty[s]);
    if (num_blocks == 1) release(&shared.q_empty);
    if (block >= num_unmasked) mask(q0, block);
    {
      float correction[kRows];
      softmax(correction);  // O is still zero: nothing to correct
    }
    convert_p();

    // Blocks num_blocks - 2 .. 0: S of this block and the PV of the previous one in one turn.
    for (--block; block >= 0; --block) {
      const int previous = s;
      ++ring.index;
      s = ring.slot(kStages);
      ClusterBarrier::wait(&shared.k_full[s], ring.parity(kStages));
      ClusterBarrier::wait(&shared.v_full[previous], RingState{ring.index - 1}.parity(kStages));
      take_turn(false);
      issue_gemm<true>(mma_qk, tSrQ, tSrK(_, _, _, s), tSrS);
      issue_gemm<false>(mma_pv, tOrP, tOrVt(_, _, _, previous), tOrO);
      pass_turn(false);
      warpgroup_wait<1>();  // S has landed; the PV may still run
      warpgroup_fence_operand(tSrS);
      release(&shared.k_empty[s]);
      if (block == 0) release(&shared.q_empty);
      if (block >= num_unmasked) mask(q0, block);
      float correction[kRows];
      softmax(correction);
      warpgroup_wait<0>();  // the PV has read P and written O
      warpgroup_fence_operand(tOrO);
      fence_registers(tOrP);
      release(&shared.v_empty[previous]);
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        CUTE_UNROLL
        for (int d = 0; d < size<1>(O); ++d) O(r, d) *= correction[r];
      }
      convert_p();
    }

    // The PV of block 0.
    ClusterBarrier::wait(&shared.v_full[s], ring.parity(kStages));
    take_turn(false);
    issue_gemm<false>(mma_pv, tOrP, tOrVt(_, _, _, s), tOrO);
    pass_turn(true);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    release(&shared.v_empty[s]);
    ++ring.index;

    // Normalise O, save the logsumexp (natural log), stage O in shared memory and store it by TMA.
    float* lse = p.lse + (static_cast<int64_t>(c.batch) * p.heads + c.head) * p.q_len;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float sum = row_sum[r];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const float inverse = 1.0f / sum;
      CUTE_UNROLL
      for (int d = 0; d < size<1>(O); ++d) O(r, d) *= inverse;
      const int row = q0 + get<0>(S_coord(r, 0));
      if (lane % 4 == 0 && row < p.q_len) lse[row] = row_max[r] * kLn2 + logf(sum);
    }
    // The previous tile's TMA store has finished reading sO.
    if (consumer_thread == 0) tma_store_wait<0>();
    cutlass::arch::NamedBarrier::sync(kConsumerThreads, kOutputBarrier);
    CUTE_UNROLL
    for (int i = 0; i < size(tOrO); ++i) tOsO(i) = static_cast<T>(tOrO(i));
    tma_store_fence();  // make the generic-proxy writes visible to the TMA (async proxy)
    cutlass::arch::NamedBarrier::sync(kConsumerThreads, kOutputBarrier);
    if (consumer_thread == 0) {
      Tensor mO = p.tma_o.get_tma_tensor(make_shape(p.q_len, Int<kHeadDim>{}, p.heads, p.batch));
      Tensor gO = local_tile(mO(_, _, c.head, c.batch), Shape<Int<kBlockM>, Int<kHeadDim>>{},
                             make_coord(c.m_block, _0{}));
      auto tma_o = p.tma_o.get_slice(0);
      copy(p.tma_o, tma_o.partition_S(sO), tma_o.partition_D(gO));
      tma_store_arrive();
    }
  }
  if (consumer_thread == 0) tma_store_wait<0>();
#elif defined(__CUDA_ARCH__)
  // Only the sm_90a image has the kernel; were this stub ever run (say, PTX of another architecture
  // compiled for a Hopper GPU), it stops instead of leaving out and lse unwritten.
  __trap();
#endif
}

template <typename T, int kHeadDim>
cudaError_t launch_forward_sm90(const AttentionParams& a, cudaStream_t stream) {
  using Tiles = Sm90Tiles<T, kHeadDim>;
  const T* q = static_cast<const T*>(a.q.data);
  const T* k = static_cast<const T*>(a.k.data);
  const T* v = static_cast<const T*>(a.v.data);
  T* out = static_cast<T*>(a.out.data);

  Sm90Params<T, kHeadDim> p{
      make_tma_copy(SM90_TMA_LOAD{}, gmem_view(q, a.q, a.q_len, kHeadDim, a.heads, a.batch),
                    typename Tiles::SmemQ{}, Shape<typename Tiles::BlockM, typename Tiles::HeadDim>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_view(k, a.k, a.kv_len, kHeadDim, a.kv_heads, a.batch),
                    take<0, 2>(typename Tiles::SmemK{}), Shape<typename Tiles::BlockN, typename Tiles::HeadDim>{},
                    _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_view_transposed(v, a.v, a.kv_len, kHeadDim, a.kv_heads, a.batch),
                    take<0, 2>(typename Tiles::SmemVt{}), Shape<typename Tiles::HeadDim, typename Tiles::BlockN>{},
                    _1{}),
      make_tma_copy(SM90_TMA_STORE{}, gmem_view(out, a.out, a.q_len, kHeadDim, a.heads, a.batch),
                    typename Tiles::SmemQ{}, Shape<typename Tiles::BlockM, typename Tiles::HeadDim>{}, _1{}),
      a.batch,
      a.heads,
      a.kv_heads,
      a.q_len,
      a.kv_len,
      fastgpt::cuda::ceil_div(a.q_len, Tiles::kBlockM),
      0,
      a.softmax_scale * kLog2e,
      a.lse,
  };
  p.num_tiles = p.num_m_blocks * a.heads * a.batch;

  int device = 0, sms = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (error != cudaSuccess) return error;
  auto kernel = attention_forward_sm90_kernel<T, kHeadDim>;
  constexpr int kSharedBytes = sizeof(SharedStorage<T, kHeadDim>);
  static_assert(kSharedBytes <= 227 * 1024, "an H100/H200 block has at most 227 KB of shared memory");
  error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes);
  if (error != cudaSuccess) return error;
  const int grid = p.num_tiles < sms ? p.num_tiles : sms;
  kernel<<<grid, kThreads, kSharedBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

const char* attention_forward_sm90_unsupported_reason(const AttentionParams& p) {
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) {
    return "the sm_90a attention kernel runs bfloat16 and float16";
  }
  if (p.head_dim != 64 && p.head_dim != 128) return "the sm_90a attention kernel has head_dim 64 and 128";
  // TMA: 16-byte aligned base addresses and strides that are multiples of 16 bytes (8 elements).
  if (!heads_aligned(p.q) || !heads_aligned(p.k) || !heads_aligned(p.v) || !heads_aligned(p.out)) {
    return "TMA needs 16-byte aligned tensors with batch, head and row strides of whole 16-byte units";
  }
  if (!gmem_view_exact(p.q, p.q_len, p.heads, p.batch) || !gmem_view_exact(p.k, p.kv_len, p.kv_heads, p.batch) ||
      !gmem_view_exact(p.v, p.kv_len, p.kv_heads, p.batch) || !gmem_view_exact(p.out, p.q_len, p.heads, p.batch)) {
    return "TMA cannot read a broadcast dimension (more than one element at stride 0)";
  }
  return nullptr;
}

cudaError_t attention_forward_sm90(const AttentionParams& p, cudaStream_t stream) {
  if (!attention_shape_ok(p)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.heads == 0 || p.q_len == 0) return cudaSuccess;
  if (attention_forward_sm90_unsupported_reason(p) != nullptr || p.lse == nullptr) return cudaErrorInvalidValue;
  int capability = 0;
  const cudaError_t error = device_capability(&capability);
  if (error != cudaSuccess) return error;
  if (capability / 10 != 9) return cudaErrorNoKernelImageForDevice;
  if (p.dtype == DType::kBFloat16) {
    return p.head_dim == 64 ? launch_forward_sm90<cutlass::bfloat16_t, 64>(p, stream)
                            : launch_forward_sm90<cutlass::bfloat16_t, 128>(p, stream);
  }
  return p.head_dim == 64 ? launch_forward_sm90<cutlass::half_t, 64>(p, stream)
                          : launch_forward_sm90<cutlass::half_t, 128>(p, stream);
}

}  // namespace fastgpt::cuda
