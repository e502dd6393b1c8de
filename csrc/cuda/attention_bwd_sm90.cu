// Causal attention backward for Hopper (sm_90a) on CuTe: TMA tile copies into an mbarrier ring,
// warpgroup MMAs (wgmma), a producer warp with register reallocation, dQ accumulated in float32 by
// TMA reduce-adds. FlashAttention-3's scheme, written for fastgpt's AttentionParams. Three kernels:
//   1. prepare: per query row, delta = rowsum(dO * O), lse * log2(e), and the row of the float32 dQ
//      accumulator zeroed, all in a workspace whose rows are padded to whole query blocks (so that
//      every block's statistics are one aligned bulk copy and every dQ reduce-add box lies in the
//      buffer);
//   2. the main kernel, one CTA per block of 128 keys of a (batch, kv head): dK and dV accumulate in
//      registers over every query block (and, for GQA, every query head of the group) that sees the
//      keys; each step's dQ contribution dS K is added to the float32 accumulator by TMA reduce-add
//      (cp.reduce.async.bulk.tensor .add: each element added atomically);
//   3. convert: dq = softmax_scale * dQ accumulator, in the input dtype.
// The reduce-adds' order across CTAs, and so dQ's last bits, vary from run to run: under
// torch.use_deterministic_algorithms the host (api_cuda.inc) runs the sm_80 backward (attention_bwd.cu),
// which has none.
//
// The main kernel: 3 warpgroups (384 threads).
//   warpgroup 0, the producer: gives up registers (setmaxnreg 24); one thread issues every TMA load:
//     K and V of the CTA's keys once, then for each step Q with its lse row and dO with its delta row
//     into a ring of kStages slots ("full" mbarriers completed by the transaction bytes, one "empty"
//     mbarrier a slot that the 8 consumer warps arrive on when every GEMM of the step has read it).
//   warpgroups 1 and 2, the consumers (setmaxnreg 240), 64 keys each, every step:
//     S^T = K Q^T and dP^T = V dO^T (SS wgmma, issued together; the exponentials of P^T run while dP^T
//     is on the tensor cores), P^T = exp2(S^T * scale * log2(e) - lse * log2(e)), causal mask on blocks
//     that cross the diagonal, dS^T = P^T (dP^T - delta); P^T and dS^T, converted to 16 bits in
//     registers, are the A operands of dV += P^T dO and dK += dS^T Q (RS wgmma); dS^T also goes to
//     shared memory for dQ = dS K (SS wgmma, each warpgroup kHeadDim / 2 columns over all 128 keys).
//     The three GEMMs overlap the warpgroup's own waiting and storing (FlashAttention-3's order):
//     dV is issued, then the named barrier (both warpgroups' dS are in shared memory) is waited on
//     while dV runs; dQ is issued, and once dV is done (P^T's registers free) dK; once dQ is done,
//     while dK runs, the warpgroup stores its dQ columns (float32) to its own swizzled shared-memory
//     tile, and after a warpgroup barrier one of its threads adds the tile to the accumulator by one
//     TMA reduce-add (no atomics from registers). That thread waits for the reduce-add to have read the
//     tile before the next step's named barrier, a whole step later, so the tile needs no second
//     buffer. The step ends when dK is done (the ring slot is then released).
//   At the end, after a barrier of both warpgroups, dK (times softmax_scale) and dV are staged in 16
//   bits in shared memory, over the Q and dO rings, and one thread stores both by TMA (which drops the
//   rows of keys past kv_len).
// What it does not have (yet): the next step's S^T and dP^T are not issued before this step's dK/dQ
// GEMMs have finished (no overlap across steps: at head_dim 128 their accumulators would hold 64
// registers a thread beside dK and dV's 128, dQ's 32 and dS^T's 16, the whole 240), and the two
// warpgroups do not ping-pong.
//
// Causal: a CTA starts at the first query block that sees its first key (causal_first_q_block), blocks
// above the diagonal are never loaded, and only blocks whose last key passes their first query's limit
// are masked; the bottom-right alignment comes from diagonal = kv_len - q_len. Rows past q_len are
// zero-filled by TMA and their lse is +inf in the workspace, so their P is exactly 0; keys past kv_len
// are past every query's causal limit, so the mask zeroes them.
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
using sm90::issue_gemm;
using sm90::Sm90BackwardTiles;

constexpr int kThreads = 384;       // producer warpgroup + 2 consumer warpgroups
constexpr int kRowAlignment = 64;   // workspace rows per (batch, head) are padded to whole query blocks
constexpr int kPrepareThreads = 256;

// ---------------------------------------------------------------------------------------------
// The workspace: dq_accum (batch, heads, padded_q_len, head_dim) float32, then lse_log2 and delta, each
// (batch, heads, padded_q_len) float32. padded_q_len = q_len rounded up to kRowAlignment.

struct Workspace {
  float* dq_accum;
  float* lse_log2;  // lse * log2(e); +inf on padded rows (their P is 0)
  float* delta;     // rowsum(dO * O); 0 on padded rows
  int padded_q_len;
};

Workspace workspace_of(const AttentionParams& p, void* base) {
  Workspace w;
  w.padded_q_len = fastgpt::cuda::ceil_div(p.q_len, kRowAlignment) * kRowAlignment;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * w.padded_q_len;
  w.dq_accum = static_cast<float*>(base);
  w.lse_log2 = w.dq_accum + rows * p.head_dim;
  w.delta = w.lse_log2 + rows;
  return w;
}

// ---------------------------------------------------------------------------------------------
// 1. prepare: kHeadDim / 8 lanes a row, 8 elements each (16-byte loads of dO and O).

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kPrepareThreads)
    attention_backward_sm90_prepare_kernel(const AttentionParams p, const Workspace w) {
  constexpr int kLanesPerRow = kHeadDim / 8;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * w.padded_q_len;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kPrepareThreads / kLanesPerRow) + threadIdx.x / kLanesPerRow;
  const int chunk = threadIdx.x % kLanesPerRow;
  const int i = static_cast<int>(row % w.padded_q_len);
  const int64_t batch_head = row / w.padded_q_len;
  const bool valid = row < rows && i < p.q_len;
  float sum = 0.0f;
  if (valid) {
    const int head = static_cast<int>(batch_head % p.heads);
    const int batch = static_cast<int>(batch_head / p.heads);
    const uint4 o = *reinterpret_cast<const uint4*>(head_rows<const T>(p.out, batch, head) + i * p.out.row_stride +
                                                    chunk * 8);
    const uint4 d = *reinterpret_cast<const uint4*>(head_rows<const T>(p.dout, batch, head) +
                                                    i * p.dout.row_stride + chunk * 8);
    const T* o_values = reinterpret_cast<const T*>(&o);
    const T* d_values = reinterpret_cast<const T*>(&d);
#pragma unroll
    for (int j = 0; j < 8; ++j) sum = fmaf(static_cast<float>(o_values[j]), static_cast<float>(d_values[j]), sum);
  }
#pragma unroll
  for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);  // stays within each row's aligned group of lanes
  }
  if (row < rows) {
    float4* accum = reinterpret_cast<float4*>(w.dq_accum + row * kHeadDim + chunk * 8);
    accum[0] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    accum[1] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (chunk == 0) {
      w.delta[row] = sum;
      w.lse_log2[row] = valid ? p.lse[batch_head * p.q_len + i] * kLog2e : INFINITY;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 2. The main kernel

template <typename T, int kHeadDim>
struct BackwardStorage {
  using Tiles = Sm90BackwardTiles<T, kHeadDim>;
  // 1024-byte alignment: the period of the 128-byte swizzle, which TMA and wgmma address by.
  alignas(1024) T k[cosize_v<typename Tiles::SmemK>];
  alignas(1024) T v[cosize_v<typename Tiles::SmemV>];
  alignas(1024) T q[cosize_v<typename Tiles::SmemQ>];
  alignas(1024) T dout[cosize_v<typename Tiles::SmemQ>];
  alignas(1024) T ds[cosize_v<typename Tiles::SmemDst>];
  alignas(1024) float dq[cosize_v<typename Tiles::SmemDqAccum>];  // this step's dQ, for the TMA reduce-add
  alignas(16) float lse_log2[Tiles::kStages][Tiles::kBlockM];  // bulk copies need 16-byte alignment
  alignas(16) float delta[Tiles::kStages][Tiles::kBlockM];
  uint64_t kv_full;
  uint64_t q_full[Tiles::kStages];     // Q and its lse rows
  uint64_t dout_full[Tiles::kStages];  // dO and its delta rows
  uint64_t empty[Tiles::kStages];
};

// Everything the kernel reads, passed as a __grid_constant__ parameter (TMA descriptors must be).
template <typename T, int kHeadDim>
struct BackwardParams {
  using Tiles = Sm90BackwardTiles<T, kHeadDim>;
  typename Tiles::TmaQ tma_q;
  typename Tiles::TmaQ tma_dout;
  typename Tiles::TmaK tma_k;
  typename Tiles::TmaV tma_v;
  typename Tiles::TmaDqAccum tma_dq;  // reduce-add into workspace.dq_accum
  int batch, heads, kv_heads, q_len, kv_len;
  float scale_log2;     // softmax_scale * log2(e)
  float softmax_scale;  // dK's factor (dQ's is applied by the convert kernel)
  Workspace workspace;
  typename Tiles::TmaDkv tma_dk;
  typename Tiles::TmaDkv tma_dv;
};

#if defined(FASTGPT_SM90A_DEVICE_CODE)

// A 32-bit st.shared at a 32-bit shared-window address (a generic store would hold a 64-bit address in
// registers).
__device__ inline void store_shared(uint32_t address, uint32_t value) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(address), "r"(value) : "memory");
}

// Two float32 values as one 8-byte st.shared (the address 8-byte aligned).
__device__ inline void store_shared(uint32_t address, float low, float high) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(address), "f"(low), "f"(high) : "memory");
}

constexpr int kProducerRegisters = 24;   // the producer only computes coordinates and issues copies
constexpr int kConsumerRegisters = 240;  // 24 x 128 + 240 x 256 = 64512 <= 65536 registers per SM
constexpr int kConsumerThreads = 256;
constexpr int kConsumerWarps = kConsumerThreads / 32;
// Named barriers (ids past the ones CUTLASS reserves): kDsBarrier: both consumer warpgroups' dS are in
// shared memory (and each warpgroup's dQ staging tile is free again); kDqBarrier + w: consumer
// warpgroup w's dQ is in its staging tile.
constexpr uint32_t kDsBarrier = 0;
constexpr uint32_t kDqBarrier = 1;
constexpr int kWarpgroupThreads = 128;

#endif  // FASTGPT_SM90A_DEVICE_CODE

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, 1)
    attention_backward_sm90_kernel(const __grid_constant__ BackwardParams<T, kHeadDim> p) {
#if defined(FASTGPT_SM90A_DEVICE_CODE)
  using Tiles = Sm90BackwardTiles<T, kHeadDim>;
  using Storage = BackwardStorage<T, kHeadDim>;
  using ClusterBarrier = cutlass::arch::ClusterBarrier;
  using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kBlockM = Tiles::kBlockM;
  constexpr int kBlockN = Tiles::kBlockN;
  constexpr int kStages = Tiles::kStages;
  constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(T);   // one Q or one dO tile
  constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(T);  // K or V
  constexpr uint32_t kStatsBytes = kBlockM * sizeof(float);      // a block's lse or delta rows

  extern __shared__ __align__(1024) uint8_t shared_bytes[];
  Storage& shared = *reinterpret_cast<Storage*>(shared_bytes);
  Tensor sK = make_tensor(make_smem_ptr(shared.k), typename Tiles::SmemK{});        // (BlockN, D)
  Tensor sKt = make_tensor(make_smem_ptr(shared.k), typename Tiles::SmemKt{});      // (D, BlockN)
  Tensor sV = make_tensor(make_smem_ptr(shared.v), typename Tiles::SmemV{});        // (BlockN, D)
  Tensor sQ = make_tensor(make_smem_ptr(shared.q), typename Tiles::SmemQ{});        // (BlockM, D, stages)
  Tensor sQt = make_tensor(make_smem_ptr(shared.q), typename Tiles::SmemQt{});      // (D, BlockM, stages)
  Tensor sdO = make_tensor(make_smem_ptr(shared.dout), typename Tiles::SmemQ{});    // (BlockM, D, stages)
  Tensor sdOt = make_tensor(make_smem_ptr(shared.dout), typename Tiles::SmemQt{});  // (D, BlockM, stages)
  Tensor sdS = make_tensor(make_smem_ptr(shared.ds), typename Tiles::SmemDs{});     // (BlockM, BlockN, 2)

  const int warpgroup = threadIdx.x / 128;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int kv_block = blockIdx.x;  // early key blocks are seen by the most queries and start first
  const int kv_head = blockIdx.y;
  const int batch = blockIdx.z;
  const int k0 = kv_block * kBlockN;
  const int group_size = p.heads / p.kv_heads;
  const int diagonal = p.kv_len - p.q_len;
  // Steps: (query head of the group, query block) pairs, head-major, query blocks from the first that
  // sees key k0. Every key is seen by query q_len - 1 at least, so each head has one block or more.
  const int first_q_block = causal_first_q_block(k0, kBlockM, diagonal);
  const int blocks_per_head = fastgpt::cuda::ceil_div(p.q_len, kBlockM) - first_q_block;
  const int num_steps = group_size * blocks_per_head;
  const Workspace& w = p.workspace;

  if (threadIdx.x == 0) {
    TxBarrier::init(&shared.kv_full, 1);
    for (int s = 0; s < kStages; ++s) {
      TxBarrier::init(&shared.q_full[s], 1);
      TxBarrier::init(&shared.dout_full[s], 1);
      ClusterBarrier::init(&shared.empty[s], kConsumerWarps);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (warpgroup == 0) {
    // ---- Producer ----
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegisters>();
    if (warp != 0 || lane != 0) return;
    Tensor mQ = p.tma_q.get_tma_tensor(make_shape(p.q_len, Int<kHeadDim>{}, p.heads, p.batch));
    Tensor mdO = p.tma_dout.get_tma_tensor(make_shape(p.q_len, Int<kHeadDim>{}, p.heads, p.batch));
    Tensor mK = p.tma_k.get_tma_tensor(make_shape(p.kv_len, Int<kHeadDim>{}, p.kv_heads, p.batch));
    Tensor mV = p.tma_v.get_tma_tensor(make_shape(p.kv_len, Int<kHeadDim>{}, p.kv_heads, p.batch));
    auto tma_q = p.tma_q.get_slice(0);
    auto tma_dout = p.tma_dout.get_slice(0);
    auto tma_k = p.tma_k.get_slice(0);
    auto tma_v = p.tma_v.get_slice(0);
    const auto kv_tile = make_coord(kv_block, _0{});
    Tensor gK = local_tile(mK(_, _, kv_head, batch), Shape<Int<kBlockN>, Int<kHeadDim>>{}, kv_tile);  // (BlockN, D)
    Tensor gV = local_tile(mV(_, _, kv_head, batch), Shape<Int<kBlockN>, Int<kHeadDim>>{}, kv_tile);
    TxBarrier::arrive_and_expect_tx(&shared.kv_full, 2 * kKVBytes);
    copy(p.tma_k.with(shared.kv_full), tma_k.partition_S(gK), tma_k.partition_D(sK));
    copy(p.tma_v.with(shared.kv_full), tma_v.partition_S(gV), tma_v.partition_D(sV));
    Tensor tQsQ = tma_q.partition_D(sQ);        // (TMA, 1, 1, stages)
    Tensor tdOsdO = tma_dout.partition_D(sdO);  // (TMA, 1, 1, stages)
    for (int step = 0; step < num_steps; ++step) {
      const int s = step % kStages;
      const int head = kv_head * group_size + step / blocks_per_head;
      const int m_block = first_q_block + step % blocks_per_head;
      const auto q_tile = make_coord(m_block, _0{});
      Tensor gQ = local_tile(mQ(_, _, head, batch), Shape<Int<kBlockM>, Int<kHeadDim>>{}, q_tile);  // (BlockM, D)
      Tensor gdO = local_tile(mdO(_, _, head, batch), Shape<Int<kBlockM>, Int<kHeadDim>>{}, q_tile);
      const int64_t stats_row = (static_cast<int64_t>(batch) * p.heads + head) * w.padded_q_len + m_block * kBlockM;
      // The slot's previous step has been read by every GEMM of both consumer warpgroups.
      ClusterBarrier::wait(&shared.empty[s], ((step / kStages) & 1) ^ 1);
      TxBarrier::arrive_and_expect_tx(&shared.q_full[s], kQBytes + kStatsBytes);
      copy(p.tma_q.with(shared.q_full[s]), tma_q.partition_S(gQ), tQsQ(_, _, _, s));
      SM90_BULK_COPY_G2S::copy(w.lse_log2 + stats_row, &shared.q_full[s], shared.lse_log2[s], kStatsBytes);
      TxBarrier::arrive_and_expect_tx(&shared.dout_full[s], kQBytes + kStatsBytes);
      copy(p.tma_dout.with(shared.dout_full[s]), tma_dout.partition_S(gdO), tdOsdO(_, _, _, s));
      SM90_BULK_COPY_G2S::copy(w.delta + stats_row, &shared.dout_full[s], shared.delta[s], kStatsBytes);
    }
    return;
  }

  // ---- Consumers ----
  cutlass::arch::warpgroup_reg_alloc<kConsumerRegisters>();
  const int consumer_thread = threadIdx.x - 128;  // 0..255: keys [64 * (warpgroup - 1), +64) of the block
  const int consumer = warpgroup - 1;             // 0 or 1: also dQ's columns [consumer * kHeadDim / 2, +kHeadDim / 2)
  const bool dq_issuer = consumer_thread % kWarpgroupThreads == 0;  // issues the warpgroup's dQ reduce-adds

  typename Tiles::MmaSdP mma_sdp;
  typename Tiles::MmaDkv mma_dkv;
  typename Tiles::MmaDq mma_dq;
  auto thread_sdp = mma_sdp.get_thread_slice(consumer_thread);
  auto thread_dkv = mma_dkv.get_thread_slice(consumer_thread);
  auto thread_dq = mma_dq.get_thread_slice(consumer_thread);

  Tensor tSrK = thread_sdp.partition_fragment_A(sK);       // descriptors (MMA, 1, D/16)
  Tensor tSrV = thread_sdp.partition_fragment_A(sV);       // (MMA, 1, D/16)
  Tensor tSrQ = thread_sdp.partition_fragment_B(sQ);       // (MMA, 1, D/16, stages)
  Tensor tSrdO = thread_sdp.partition_fragment_B(sdO);     // (MMA, 1, D/16, stages)
  Tensor tdVrdOt = thread_dkv.partition_fragment_B(sdOt);  // (MMA, 1, BlockM/16, stages)
  Tensor tdKrQt = thread_dkv.partition_fragment_B(sQt);    // (MMA, 1, BlockM/16, stages)
  Tensor tdQrdS = thread_dq.partition_fragment_A(sdS);     // (MMA, 1, BlockN/16, 2)
  Tensor tdQrKt = thread_dq.partition_fragment_B(sKt);     // (MMA, 1, BlockN/16)

  Tensor tSrS = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});    // S^T, then P^T
  Tensor tSrdP = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});   // dP^T, then dS^T
  Tensor tdVrdV = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});  // dV, float32
  Tensor tdKrdK = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});  // dK, float32
  Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});   // this step's dQ
  // P^T and dS^T in 16 bits as the A operands of the dV and dK wgmma, and indexed like S^T.
  Tensor tdVrP = make_tensor<T>(accumulator_as_operand_a(tSrS.layout()));
  Tensor tdKrdS = make_tensor<T>(accumulator_as_operand_a(tSrS.layout()));
  Tensor dS_as_S = make_tensor(tdKrdS.data(), tSrS.layout());
  static_assert(size(tdVrP) == size(tSrS));

  // (key, query) of each S^T element, (query, column) of each dQ element, (key, column) of dK and dV.
  Tensor tScS = thread_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));
  Tensor tdQcdQ = thread_dq.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tdKcdK = thread_dkv.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // S^T as (keys, queries): a thread's registers in one column share that column's lse and delta.
  Tensor St = make_tensor(tSrS.data(), accumulator_rows_cols(tSrS.layout()));
  Tensor dPt = make_tensor(tSrdP.data(), accumulator_rows_cols(tSrdP.layout()));
  Tensor St_coord = make_tensor(tScS.data(), accumulator_rows_cols(tScS.layout()));
  const int first_key = get<0>(tScS(0));    // the thread's first element of S^T within the tile
  const int first_query = get<1>(tScS(0));
  const uint32_t ds_base = cast_smem_ptr_to_uint(shared.ds);
  // The thread's dQ pairs in the staging tile: (first + offset) ^ mask, two registers across the loop
  // (one address per pair would hold 16 at head_dim 128, which with the GEMMs' registers spills).
  const auto dq_first = make_coord(get<0>(tdQcdQ(0)), get<1>(tdQcdQ(0)) - consumer * (kHeadDim / 2), consumer);
  sm90::SwizzledRun<float, typename Tiles::SmemDqAccum> dq_run(typename Tiles::SmemDqAccum{},
                                                               cast_smem_ptr_to_uint(shared.dq), dq_first);
  // The warpgroup's dQ staging tile (queries, kHeadDim / 2) and the accumulator's boxes it is added to.
  Tensor sdQ = make_tensor(make_smem_ptr(shared.dq), typename Tiles::SmemDqAccum{})(_, _, consumer);
  Tensor mdQ = p.tma_dq.get_tma_tensor(make_shape(w.padded_q_len, Int<kHeadDim>{}, p.heads, p.batch));
  auto tma_dq = p.tma_dq.get_slice(0);

  clear(tdVrdV);
  clear(tdKrdK);
  ClusterBarrier::wait(&shared.kv_full, 0);
  for (int step = 0; step < num_steps; ++step) {
    const int s = step % kStages;
    const uint32_t parity = (step / kStages) & 1;
    const int buffer = step % 2;  // dS buffer
    const int head = kv_head * group_size + step / blocks_per_head;
    const int q0 = (first_q_block + step % blocks_per_head) * kBlockM;

    ClusterBarrier::wait(&shared.q_full[s], parity);
    issue_gemm<true>(mma_sdp, tSrK, tSrQ(_, _, _, s), tSrS);
    ClusterBarrier::wait(&shared.dout_full[s], parity);
    issue_gemm<true>(mma_sdp, tSrV, tSrdO(_, _, _, s), tSrdP);
    warpgroup_wait<1>();  // S^T has landed; dP^T may still run
    warpgroup_fence_operand(tSrS);

    // P^T = exp2(S^T * scale * log2(e) - lse * log2(e)); 0 past the causal limit. Coordinates are taken
    // relative to the thread's first element, compile-time constants, so none of them needs a register.
    const float* lse_log2 = shared.lse_log2[s] + first_query;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(St); ++c) {
      const float query_lse = lse_log2[get<1>(St_coord(0, c)) - first_query];
      CUTE_UNROLL
      for (int r = 0; r < size<0>(St); ++r) St(r, c) = fast_exp2(fmaf(St(r, c), p.scale_log2, -query_lse));
    }
    if (k0 + kBlockN - 1 > q0 + diagonal) {
      // key > query + diagonal, as (key - first_key) - (query - first_query) > this:
      const int limit = q0 + first_query + diagonal - k0 - first_key;
      CUTE_UNROLL
      for (int i = 0; i < size(tSrS); ++i) {
        if ((get<0>(tScS(i)) - first_key) - (get<1>(tScS(i)) - first_query) > limit) tSrS(i) = 0.0f;
      }
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrdP);

    // dS^T = P^T (dP^T - delta); P^T and dS^T to 16 bits in the same pass, so that each float32 S^T and
    // dP^T register is free as soon as it is read.
    const float* delta = shared.delta[s] + first_query;
    Tensor P16 = make_tensor(tdVrP.data(), St.layout());     // (keys, queries), like St
    Tensor dS16 = make_tensor(tdKrdS.data(), St.layout());
    CUTE_UNROLL
    for (int c = 0; c < size<1>(dPt); ++c) {
      const float query_delta = delta[get<1>(St_coord(0, c)) - first_query];
      CUTE_UNROLL
      for (int r = 0; r < size<0>(dPt); ++r) {
        const float probability = St(r, c);
        P16(r, c) = static_cast<T>(probability);
        dS16(r, c) = static_cast<T>(probability * (dPt(r, c) - query_delta));
      }
    }
    // Registers 2j and 2j + 1 hold adjacent queries of one key, adjacent in dS^T's layout too (the
    // swizzle moves 16-byte chunks): one 32-bit st.shared a pair.
    Tensor dS_pairs = recast<uint32_t>(dS_as_S);
    CUTE_UNROLL
    for (int j = 0; j < size(dS_pairs); ++j) {
      const auto key_query = tScS(2 * j);
      store_shared(ds_base + sm90::swizzled_byte_offset<T>(typename Tiles::SmemDst{},
                                                           make_coord(get<0>(key_query), get<1>(key_query), buffer)),
                   dS_pairs(j));
    }
    fence_registers(tdVrP);
    fence_registers(tdKrdS);
    cutlass::arch::fence_view_async_shared();  // the dS stores, visible to wgmma (the async proxy)

    // Three GEMMs, each committed as its own group (groups complete in issue order), ordered so that
    // the tensor cores always have one queued while the warpgroup waits or stores: dV runs during the
    // barrier, dK during dQ's stores to shared memory. At most two of P^T, dS^T and the dQ accumulator
    // hold registers at once (P^T is free once dV is done, before dK is issued).
    issue_gemm<false>(mma_dkv, tdVrP, tdVrdOt(_, _, _, s), tdVrdV);
    // The previous step's reduce-add has read this warpgroup's dQ staging tile (it was issued a whole
    // S^T/dP^T step ago, so this rarely waits); the barrier below tells the warpgroup.
    if (dq_issuer) tma_store_wait<0>();
    // Both warpgroups' dS are stored. With two dS buffers one barrier a step suffices: a warpgroup
    // writes buffer b again two steps later, after the other has passed the next step's barrier, which
    // it reaches only once its dQ GEMM of this step has finished (the wait before its dQ stores).
    cutlass::arch::NamedBarrier::sync(kConsumerThreads, kDsBarrier);
    issue_gemm<true>(mma_dq, tdQrdS(_, _, _, buffer), tdQrKt, tdQrdQ);
    warpgroup_wait<1>();  // dV is done: P^T's registers are free
    warpgroup_fence_operand(tdVrdV);
    fence_registers(tdVrP);
    issue_gemm<false>(mma_dkv, tdKrdS, tdKrQt(_, _, _, s), tdKrdK);
    warpgroup_wait<1>();  // dQ is done; dK may still run
    warpgroup_fence_operand(tdQrdQ);

    // This step's dQ columns to the warpgroup's staging tile: registers 2j and 2j + 1 are adjacent
    // columns of one row, one 8-byte st.shared a pair (the swizzle moves 16-byte chunks). Coordinates
    // relative to the thread's first element are compile-time constants. dq_run's two values are made
    // opaque to the compiler each step: otherwise it hoists the 16 loop-invariant addresses out of the
    // loop into 16 registers (and spills at head_dim 128); the empty asm costs no instruction.
    asm volatile("" : "+r"(dq_run.first), "+r"(dq_run.mask));
    CUTE_UNROLL
    for (int i = 0; i < size(tdQrdQ); i += 2) {
      const auto delta = make_coord(get<0>(tdQcdQ(i)) - get<0>(tdQcdQ(0)), get<1>(tdQcdQ(i)) - get<1>(tdQcdQ(0)), 0);
      store_shared(dq_run.address(delta), tdQrdQ(i), tdQrdQ(i + 1));
    }
    tma_store_fence();  // the stores, visible to the TMA (async proxy)
    cutlass::arch::NamedBarrier::sync(kWarpgroupThreads, kDqBarrier + consumer);
    // One thread adds the tile to the float32 accumulator: a TMA reduce-add, each element added
    // atomically (.add on global memory), so both warpgroups and every CTA of the (batch, head) may add
    // to the same rows. Rows past q_len exist in the padded accumulator and receive zeros.
    if (dq_issuer) {
      Tensor gdQ = local_tile(mdQ(_, _, head, batch), Shape<Int<kBlockM>, typename Tiles::DqColumns>{},
                              make_coord(q0 / kBlockM, consumer));  // (BlockM, D/2)
      copy(p.tma_dq, tma_dq.partition_S(sdQ), tma_dq.partition_D(gdQ));
      tma_store_arrive();
    }
    // dK is done: dS^T's registers may be written by the next step, and every GEMM of the step has
    // read the slot's Q and dO.
    warpgroup_wait<0>();
    warpgroup_fence_operand(tdKrdK);
    fence_registers(tdKrdS);
    if (lane == 0) ClusterBarrier::arrive(&shared.empty[s]);
  }
  // The last reduce-add has read its tile before the CTA's shared memory goes away.
  if (dq_issuer) tma_store_wait<0>();

  // dK = softmax_scale * sum dS^T Q and dV, staged in shared memory in V's layout and stored by TMA,
  // which leaves out the rows of keys past kv_len. The staging tiles are the Q and dO rings, the same
  // size: every TMA load into them has landed (each was waited for), and after this barrier both
  // warpgroups' last GEMMs have read them.
  cutlass::arch::NamedBarrier::sync(kConsumerThreads, kDsBarrier);
  Tensor sdK = make_tensor(make_smem_ptr(shared.q), typename Tiles::SmemV{});     // (BlockN, D)
  Tensor sdV = make_tensor(make_smem_ptr(shared.dout), typename Tiles::SmemV{});  // (BlockN, D)
  const auto dkv_first = make_coord(get<0>(tdKcdK(0)), get<1>(tdKcdK(0)));
  const sm90::SwizzledRun<T, typename Tiles::SmemV> dk_run(typename Tiles::SmemV{}, cast_smem_ptr_to_uint(shared.q),
                                                           dkv_first);
  const sm90::SwizzledRun<T, typename Tiles::SmemV> dv_run(typename Tiles::SmemV{},
                                                           cast_smem_ptr_to_uint(shared.dout), dkv_first);
  // Registers 2j and 2j + 1 are adjacent columns of one key: one 32-bit st.shared a pair.
  auto pack = [](float low, float high) {
    T pair[2] = {static_cast<T>(low), static_cast<T>(high)};
    return *reinterpret_cast<const uint32_t*>(pair);
  };
  CUTE_UNROLL
  for (int i = 0; i < size(tdKrdK); i += 2) {
    const auto delta = make_coord(get<0>(tdKcdK(i)) - get<0>(tdKcdK(0)), get<1>(tdKcdK(i)) - get<1>(tdKcdK(0)));
    store_shared(dk_run.address(delta), pack(tdKrdK(i) * p.softmax_scale, tdKrdK(i + 1) * p.softmax_scale));
    store_shared(dv_run.address(delta), pack(tdVrdV(i), tdVrdV(i + 1)));
  }
  tma_store_fence();  // the stores, visible to the TMA (async proxy)
  cutlass::arch::NamedBarrier::sync(kConsumerThreads, kDsBarrier);
  if (consumer_thread == 0) {
    Tensor mdK = p.tma_dk.get_tma_tensor(make_shape(p.kv_len, Int<kHeadDim>{}, p.kv_heads, p.batch));
    Tensor mdV = p.tma_dv.get_tma_tensor(make_shape(p.kv_len, Int<kHeadDim>{}, p.kv_heads, p.batch));
    const auto kv_tile = make_coord(kv_block, _0{});
    Tensor gdK = local_tile(mdK(_, _, kv_head, batch), Shape<Int<kBlockN>, Int<kHeadDim>>{}, kv_tile);  // (BlockN, D)
    Tensor gdV = local_tile(mdV(_, _, kv_head, batch), Shape<Int<kBlockN>, Int<kHeadDim>>{}, kv_tile);
    auto tma_dk = p.tma_dk.get_slice(0);
    auto tma_dv = p.tma_dv.get_slice(0);
    copy(p.tma_dk, tma_dk.partition_S(sdK), tma_dk.partition_D(gdK));
    copy(p.tma_dv, tma_dv.partition_S(sdV), tma_dv.partition_D(gdV));
    tma_store_arrive();
    tma_store_wait<0>();  // the stores have read shared memory before the CTA exits
  }
#elif defined(__CUDA_ARCH__)
  // Only the sm_90a image has the kernel; were this stub ever run, it stops instead of leaving dk and
  // dv unwritten.
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------
// 3. convert: dq = softmax_scale * dq_accum, 8 elements a thread (two float4 loads, one 16-byte store).

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kPrepareThreads)
    attention_backward_sm90_convert_kernel(const AttentionParams p, const Workspace w) {
  constexpr int kLanesPerRow = kHeadDim / 8;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.q_len;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kPrepareThreads / kLanesPerRow) + threadIdx.x / kLanesPerRow;
  if (row >= rows) return;
  const int chunk = threadIdx.x % kLanesPerRow;
  const int i = static_cast<int>(row % p.q_len);
  const int64_t batch_head = row / p.q_len;
  const int head = static_cast<int>(batch_head % p.heads);
  const int batch = static_cast<int>(batch_head / p.heads);
  const float4* accum =
      reinterpret_cast<const float4*>(w.dq_accum + (batch_head * w.padded_q_len + i) * kHeadDim + chunk * 8);
  const float4 low = accum[0], high = accum[1];
  const float values[8] = {low.x, low.y, low.z, low.w, high.x, high.y, high.z, high.w};
  uint4 packed;
  T* out_values = reinterpret_cast<T*>(&packed);
#pragma unroll
  for (int j = 0; j < 8; ++j) out_values[j] = static_cast<T>(values[j] * p.softmax_scale);
  *reinterpret_cast<uint4*>(head_rows<T>(p.dq, batch, head) + i * p.dq.row_stride + chunk * 8) = packed;
}

// ---------------------------------------------------------------------------------------------
// Launchers

template <typename T, int kHeadDim>
cudaError_t launch_backward_sm90(const AttentionParams& a, const Workspace& w, cudaStream_t stream) {
  using Tiles = Sm90BackwardTiles<T, kHeadDim>;
  using BlockM = typename Tiles::BlockM;
  using BlockN = typename Tiles::BlockN;
  using HeadDim = typename Tiles::HeadDim;
  constexpr int kRowsPerBlock = kPrepareThreads / (kHeadDim / 8);

  const int64_t padded_rows = static_cast<int64_t>(a.batch) * a.heads * w.padded_q_len;
  attention_backward_sm90_prepare_kernel<T, kHeadDim>
      <<<static_cast<unsigned>((padded_rows + kRowsPerBlock - 1) / kRowsPerBlock), kPrepareThreads, 0, stream>>>(a, w);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;

  const T* q = static_cast<const T*>(a.q.data);
  const T* k = static_cast<const T*>(a.k.data);
  const T* v = static_cast<const T*>(a.v.data);
  const T* dout = static_cast<const T*>(a.dout.data);
  T* dk = static_cast<T*>(a.dk.data);
  T* dv = static_cast<T*>(a.dv.data);
  // The float32 dQ accumulator as (padded rows, head_dim, heads, batch), rows contiguous.
  const int64_t accum_head_stride = static_cast<int64_t>(w.padded_q_len) * kHeadDim;
  const auto dq_accum = make_tensor(
      make_gmem_ptr(w.dq_accum),
      make_layout(make_shape(w.padded_q_len, kHeadDim, a.heads, a.batch),
                  make_stride(static_cast<int64_t>(kHeadDim), _1{}, accum_head_stride, accum_head_stride * a.heads)));
  BackwardParams<T, kHeadDim> p{
      make_tma_copy(SM90_TMA_LOAD{}, gmem_view(q, a.q, a.q_len, kHeadDim, a.heads, a.batch),
                    take<0, 2>(typename Tiles::SmemQ{}), Shape<BlockM, HeadDim>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_view(dout, a.dout, a.q_len, kHeadDim, a.heads, a.batch),
                    take<0, 2>(typename Tiles::SmemQ{}), Shape<BlockM, HeadDim>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_view(k, a.k, a.kv_len, kHeadDim, a.kv_heads, a.batch),
                    typename Tiles::SmemK{}, Shape<BlockN, HeadDim>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_view(v, a.v, a.kv_len, kHeadDim, a.kv_heads, a.batch),
                    typename Tiles::SmemV{}, Shape<BlockN, HeadDim>{}, _1{}),
      make_tma_copy(SM90_TMA_REDUCE_ADD{}, dq_accum, take<0, 2>(typename Tiles::SmemDqAccum{}),
                    Shape<BlockM, typename Tiles::DqColumns>{}, _1{}),
      a.batch,
      a.heads,
      a.kv_heads,
      a.q_len,
      a.kv_len,
      a.softmax_scale * kLog2e,
      a.softmax_scale,
      w,
      make_tma_copy(SM90_TMA_STORE{}, gmem_view(dk, a.dk, a.kv_len, kHeadDim, a.kv_heads, a.batch),
                    typename Tiles::SmemV{}, Shape<BlockN, HeadDim>{}, _1{}),
      make_tma_copy(SM90_TMA_STORE{}, gmem_view(dv, a.dv, a.kv_len, kHeadDim, a.kv_heads, a.batch),
                    typename Tiles::SmemV{}, Shape<BlockN, HeadDim>{}, _1{}),
  };
  auto kernel = attention_backward_sm90_kernel<T, kHeadDim>;
  constexpr int kSharedBytes = sizeof(BackwardStorage<T, kHeadDim>);
  static_assert(kSharedBytes <= 227 * 1024, "an H100/H200 block has at most 227 KB of shared memory");
  error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes);
  if (error != cudaSuccess) return error;
  const dim3 grid(fastgpt::cuda::ceil_div(a.kv_len, Tiles::kBlockN), a.kv_heads, a.batch);
  kernel<<<grid, kThreads, kSharedBytes, stream>>>(p);
  error = cudaGetLastError();
  if (error != cudaSuccess) return error;

  const int64_t rows = static_cast<int64_t>(a.batch) * a.heads * a.q_len;
  attention_backward_sm90_convert_kernel<T, kHeadDim>
      <<<static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock), kPrepareThreads, 0, stream>>>(a, w);
  return cudaGetLastError();
}

}  // namespace

const char* attention_backward_sm90_unsupported_reason(const AttentionParams& p) {
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) {
    return "the sm_90a attention backward runs bfloat16 and float16";
  }
  if (p.head_dim != 64 && p.head_dim != 128) return "the sm_90a attention backward has head_dim 64 and 128";
  if (p.batch == 0 || p.heads == 0 || p.q_len == 0) return "TMA cannot describe an empty tensor";
  if (!heads_aligned(p.q) || !heads_aligned(p.k) || !heads_aligned(p.v) || !heads_aligned(p.out) ||
      !heads_aligned(p.dout) || !heads_aligned(p.dq) || !heads_aligned(p.dk) || !heads_aligned(p.dv)) {
    return "TMA needs 16-byte aligned tensors with batch, head and row strides of whole 16-byte units";
  }
  if (!gmem_view_exact(p.q, p.q_len, p.heads, p.batch) ||
      !gmem_view_exact(p.dout, p.q_len, p.heads, p.batch) ||
      !gmem_view_exact(p.k, p.kv_len, p.kv_heads, p.batch) ||
      !gmem_view_exact(p.v, p.kv_len, p.kv_heads, p.batch) ||
      !gmem_view_exact(p.dk, p.kv_len, p.kv_heads, p.batch) ||
      !gmem_view_exact(p.dv, p.kv_len, p.kv_heads, p.batch)) {
    return "TMA cannot describe a broadcast (stride 0) dimension of q, k, v, dout, dk or dv";
  }
  return nullptr;
}

size_t attention_backward_sm90_workspace_bytes(const AttentionParams& p) {
  const int64_t padded_rows =
      static_cast<int64_t>(p.batch) * p.heads * (fastgpt::cuda::ceil_div(p.q_len, kRowAlignment) * kRowAlignment);
  return static_cast<size_t>(padded_rows) * (p.head_dim + 2) * sizeof(float);
}

cudaError_t attention_backward_sm90(const AttentionParams& p, void* workspace, cudaStream_t stream) {
  if (!attention_shape_ok(p)) return cudaErrorInvalidValue;
  if (attention_backward_sm90_unsupported_reason(p) != nullptr || p.lse == nullptr || !is_aligned(workspace, 16)) {
    return cudaErrorInvalidValue;
  }
  int capability = 0;
  const cudaError_t error = device_capability(&capability);
  if (error != cudaSuccess) return error;
  if (capability / 10 != 9) return cudaErrorNoKernelImageForDevice;
  const Workspace w = workspace_of(p, workspace);
  if (p.dtype == DType::kBFloat16) {
    return p.head_dim == 64 ? launch_backward_sm90<cutlass::bfloat16_t, 64>(p, w, stream)
                            : launch_backward_sm90<cutlass::bfloat16_t, 128>(p, w, stream);
  }
  return p.head_dim == 64 ? launch_backward_sm90<cutlass::half_t, 64>(p, w, stream)
                          : launch_backward_sm90<cutlass::half_t, 128>(p, w, stream);
}

}  // namespace fastgpt::cuda
