// Backward Evoformer attention for Hopper (sm_90a): the sm80 backward's contract and its three
// deterministic launches (dK/dV; dQ and the bias gradient's per-chunk partials; the partials'
// reduction, shared with sm80), with every matrix product on wgmma. The loads are the sm80
// kernels' cp.async pipelines into GMMA-swizzled tiles; the products read those tiles directly
// (no ldmatrix, no per-warp operand copies) and run beside the warpgroup's own instructions:
// P = exp(S - lse) is computed while dP = dO V^T is still on the tensor cores, and in the dQ
// kernel the bias-gradient partial's read-modify-write runs while dQ += dS K does.
#pragma once

#include <cuda_runtime.h>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

#include "attention/bwd_common.h"
#include "attention/grid.h"
#include "attention/params.h"
#include "attention/sm90/bwd_traits.h"
#include "attention/sm90/fwd_kernel.h"

namespace jevo {
namespace sm90 {

// Data written to shared memory by the threads (cp.async or stores) is read by wgmma through
// the async proxy: each writer fences before the barrier that publishes it.
CUTE_DEVICE void publish_shared_to_wgmma() {
  cutlass::arch::fence_view_async_shared();
  __syncthreads();
}

// Stores of this thread's accumulator pairs into a [64, 64] 16-bit tile laid out as
// SmemLayoutP (128-byte rows whose 16-byte chunk c sits at c ^ (row % 8), the GMMA and TMA
// 128-byte swizzle). A thread's rows are row0 and row0 + 8, which share row % 8, so the byte
// address of its pair in column group j is one of 8 per-tile values (plus 1024 for row0 + 8):
// computed once, outside the loop, so that each store is a single st.shared with an immediate.
// The byte offset, in that tile, of the pair in column group j of row `row` (columns
// 8 j + col0 and + 1, col0 even and < 8). Checked against CuTe's SmemLayoutP by
// tests/test_kernel_host_checks.py.
CUTE_HOST_DEVICE constexpr uint32_t swizzle128_pair_offset(int row, int col0, int j) {
  return uint32_t(row * 128 + col0 * 2 + ((j ^ (row & 7)) << 4));
}

struct Swizzle128PairStores {
  uint32_t addr[8];  // shared-window byte address of the pair (row0, 8 j + col0), j < 8

  template <int kNWarps>
  CUTE_DEVICE Swizzle128PairStores(const void* tile, AccCoords<kNWarps> const& at) {
    const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(tile));
#pragma unroll
    for (int j = 0; j < 8; ++j) addr[j] = base + swizzle128_pair_offset(at.row0, at.col0, j);
  }

  // rc: the (rows, cols) view of an fp32 [64, 64] accumulator; tile_offset: the byte offset of
  // the destination tile from the one the addresses were computed for.
  template <typename Element, int kTileOffset, typename RowCol>
  CUTE_DEVICE void store(RowCol const& rc) const {
    static_assert(decltype(size<0>(rc))::value == 2 && decltype(size<1>(rc))::value == 16);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
      for (int c = 0; c < 16; c += 2) {
        cutlass::Array<Element, 2> pair;
        pair[0] = static_cast<Element>(rc(r, c));
        pair[1] = static_cast<Element>(rc(r, c + 1));
        const uint32_t bits = reinterpret_cast<const uint32_t&>(pair);
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr[c >> 1] + r * 1024 + kTileOffset), "r"(bits));
      }
    }
  }
};

// The TMA descriptors of the dK/dV kernel (a kernel parameter, so __grid_constant__): the
// activations as encode_activation_map gives them, the bias as encode_bias_map.
struct DkdvTensorMaps {
  CUtensorMap q, k, v, dout, bias;
};

// Shared memory of the dK/dV kernel: the CTA's K and V, P and dS of the current query tile, and
// two stages of (Q, dO, bias tile) so that the next query tile streams in during this one, all
// filled by TMA (the bias tile with the 128-byte swizzle, as Swizzle128BiasTile reads it), and
// the mbarriers that say K and V, or a stage, have landed.
template <typename Traits>
struct DkdvSmem {
  using Element = typename Traits::Element;
  alignas(1024) Element k[Traits::kTileElemsKV];
  alignas(1024) Element v[Traits::kTileElemsKV];
  alignas(1024) Element p[Traits::kTileElemsP];
  alignas(1024) Element ds[Traits::kTileElemsP];
  alignas(1024) Element q[2 * Traits::kTileElemsQ];
  alignas(1024) Element dout[2 * Traits::kTileElemsQ];
  alignas(1024) Element bias[2 * Traits::kTileElemsP];
  alignas(8) uint64_t kv_full;
  uint64_t full[2];
};

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocksDkdv)
    attention_bwd_dkdv_kernel(const BwdParams p, const __grid_constant__ DkdvTensorMaps maps) {
  using Element = typename Traits::Element;
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kBoxD = Traits::kBoxD;
  constexpr int kBoxesD = Traits::kBoxesD;
  constexpr uint64_t kCacheHint = static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL);

  const DkdvSlice<Element, kBlockN> slice(p);
  const int S = slice.S, n0 = slice.n0;
  const uint8_t* mask = slice.mask;
  const float *lse = slice.lse, *delta = slice.delta;
  const bool has_bias = slice.bias != nullptr;
  const int tid = threadIdx.x;
  const int32_t head = static_cast<int32_t>(slice.h), outer = static_cast<int32_t>(slice.bn);
  const int32_t bias_plane = static_cast<int32_t>(slice.b * p.shape.heads + slice.h);

  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<DkdvSmem<Traits>*>(smem_raw);
  using Rows1 = typename Traits::template SmemLayoutRows<1>;
  using Rows2 = typename Traits::template SmemLayoutRows<2>;
  using RowsT2 = typename Traits::template SmemLayoutRowsT<2>;
  Tensor sK = make_tensor(make_smem_ptr(smem.k), Rows1{})(_, _, 0);       // (n, d)
  Tensor sV = make_tensor(make_smem_ptr(smem.v), Rows1{})(_, _, 0);       // (n, d)
  Tensor sQ = make_tensor(make_smem_ptr(smem.q), Rows2{});                // (m, d, stage)
  Tensor sdO = make_tensor(make_smem_ptr(smem.dout), Rows2{});            // (m, d, stage)
  Tensor sQt = make_tensor(make_smem_ptr(smem.q), RowsT2{});              // (d, m, stage)
  Tensor sdOt = make_tensor(make_smem_ptr(smem.dout), RowsT2{});          // (d, m, stage)
  // P and dS [m, n] are written by Swizzle128PairStores (SmemLayoutP) and read as [n, m].
  Tensor sPt = make_tensor(make_smem_ptr(smem.p), typename Traits::SmemLayoutPt{});   // (n, m)
  Tensor sdSt = make_tensor(make_smem_ptr(smem.ds), typename Traits::SmemLayoutPt{}); // (n, m)

  const int m_blocks = (S + kBlockM - 1) / kBlockM;
  constexpr uint32_t kTileBytes = Traits::kTileElemsQ * sizeof(Element);
  constexpr uint32_t kBiasBytes = Traits::kTileElemsP * sizeof(Element);
  // Thread 0 loads query tile mb (Q, dO and the bias tile) into stage mb % 2; its mbarrier
  // completes when all their bytes have landed (rows past S arrive as zeros).
  auto issue = [&](int mb) {
    if (mb >= m_blocks) return;
    const int st = mb & 1;
    const int32_t m0 = mb * kBlockM;
    Barrier::arrive_and_expect_tx(&smem.full[st], 2 * kTileBytes + (has_bias ? kBiasBytes : 0));
#pragma unroll
    for (int part = 0; part < kBoxesD; ++part) {
      const int offset = st * Traits::kTileElemsQ + part * kBlockM * kBoxD;
      SM90_TMA_LOAD_4D::copy(&maps.q, &smem.full[st], kCacheHint, smem.q + offset, part * kBoxD, head, m0, outer);
      SM90_TMA_LOAD_4D::copy(&maps.dout, &smem.full[st], kCacheHint, smem.dout + offset, part * kBoxD, head,
                             m0, outer);
    }
    if (has_bias) {
      SM90_TMA_LOAD_3D::copy(&maps.bias, &smem.full[st], kCacheHint, smem.bias + st * Traits::kTileElemsP, n0,
                             m0, bias_plane);
    }
  };
  if (tid == 0) {
    Barrier::init(&smem.kv_full, 1);
    Barrier::init(&smem.full[0], 1);
    Barrier::init(&smem.full[1], 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  if (tid == 0) {
    Barrier::arrive_and_expect_tx(&smem.kv_full, 2 * Traits::kTileElemsKV * sizeof(Element));
#pragma unroll
    for (int part = 0; part < kBoxesD; ++part) {
      const int offset = part * kBlockN * kBoxD;
      SM90_TMA_LOAD_4D::copy(&maps.k, &smem.kv_full, kCacheHint, smem.k + offset, part * kBoxD, head, n0, outer);
      SM90_TMA_LOAD_4D::copy(&maps.v, &smem.kv_full, kCacheHint, smem.v + offset, part * kBoxD, head, n0, outer);
    }
    issue(0);
  }

  typename Traits::MmaQK mma_qk;
  typename Traits::MmaKV mma_kv;
  auto thr_qk = mma_qk.get_thread_slice(tid);
  auto thr_kv = mma_kv.get_thread_slice(tid);
  Tensor tSrQ = thr_qk.make_fragment_A(thr_qk.partition_A(sQ));        // (.., .., k, stage)
  Tensor tSrdO = thr_qk.make_fragment_A(thr_qk.partition_A(sdO));
  Tensor tSrK = thr_qk.make_fragment_B(thr_qk.partition_B(sK));        // (.., .., k)
  Tensor tSrV = thr_qk.make_fragment_B(thr_qk.partition_B(sV));
  Tensor tKrPt = thr_kv.make_fragment_A(thr_kv.partition_A(sPt));      // (.., .., k)
  Tensor tKrdSt = thr_kv.make_fragment_A(thr_kv.partition_A(sdSt));
  Tensor tKrdOt = thr_kv.make_fragment_B(thr_kv.partition_B(sdOt));    // (.., .., k, stage)
  Tensor tKrQt = thr_kv.make_fragment_B(thr_kv.partition_B(sQt));
  Tensor acc_dk = partition_fragment_C(mma_kv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(mma_kv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  clear(acc_dk);
  clear(acc_dv);
  Tensor acc_s = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor acc_dp = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor s = make_tensor(acc_s.data(), acc_rowcol_layout(acc_s.layout()));
  Tensor dp = make_tensor(acc_dp.data(), acc_rowcol_layout(acc_dp.layout()));

  const AccCoords<Traits::kNWarps> at(tid);
  const Swizzle128PairStores pair_stores(smem.p, at);  // P at smem.p, dS right after it
  constexpr int kDsOffset = int(offsetof(DkdvSmem<Traits>, ds) - offsetof(DkdvSmem<Traits>, p));
  KeyMaskPrefetch key_mask;
  key_mask.fetch<kBlockN>(mask, n0, S);
  // The keys of this CTA. A masked key's column of P and dS only ever reaches its own rows of
  // dV = P^T dO and dK = dS^T Q, so the loop computes every key as unmasked (no selects) and
  // the masked keys' rows are written as zeros at the end, whatever they hold.
  const uint64_t valid = key_mask.bits();
  constexpr int kRows = decltype(size<0>(s))::value;
  RowStats<kRows> stats, next_stats;
  stats.load(lse, delta, 0, S, at);
  Barrier::wait(&smem.kv_full, 0);

  for (int mb = 0; mb < m_blocks; ++mb) {
    const int st = mb & 1;
    // Stage (mb + 1) % 2 held tile mb - 1, whose products every warp finished before the
    // barrier that ended the last iteration.
    if (tid == 0) issue(mb + 1);
    if (mb + 1 < m_blocks) next_stats.load(lse, delta, (mb + 1) * kBlockM, S, at);
    Barrier::wait(&smem.full[st], (mb >> 1) & 1);

    wgmma_batch<true>(mma_qk, tSrQ(_, _, _, st), tSrK, acc_s);
    wgmma_batch<true>(mma_qk, tSrdO(_, _, _, st), tSrV, acc_dp);
    warpgroup_wait<1>();  // S; dP may still run
    warpgroup_fence_operand(acc_s);  // no read of S moves above the wait
    logits_from(s, at, p.scale,
                Swizzle128BiasTile<Element>{has_bias ? smem.bias + st * Traits::kTileElemsP : nullptr},
                ~uint64_t(0));
    probs_from_logits(s, stats);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_dp);
    dscores_from_probs(s, dp, stats);
    pair_stores.template store<Element, 0>(s);
    pair_stores.template store<Element, kDsOffset>(dp);
    publish_shared_to_wgmma();

    wgmma_batch<false>(mma_kv, tKrPt, tKrdOt(_, _, _, st), acc_dv);
    wgmma_batch<false>(mma_kv, tKrdSt, tKrQt(_, _, _, st), acc_dk);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_dv);
    warpgroup_fence_operand(acc_dk);
    __syncthreads();  // every warp is done with this stage, P and dS
    stats = next_stats;
  }

  store_dk_dv(make_tensor(acc_dk.data(), acc_rowcol_layout(acc_dk.layout())),
              make_tensor(acc_dv.data(), acc_rowcol_layout(acc_dv.layout())), at, p, slice, valid);
}

// Shared memory of the dQ / bias-gradient kernel: with a bias, two stages (by step parity) of
// the fp32 partial tile that the step's read-modify-write reads (first, for alignment; loaded
// by the threads with cp.async); two stages (by group parity) of kGroup (Q, dO) tile pairs; two
// stages (by step parity) of (K, V, bias tile), these by TMA.
template <typename Traits, int kGroup, bool kHasBias>
struct DqSmem {
  using Element = typename Traits::Element;
  static constexpr int kPartialStride = Traits::kBlockN + 8;  // floats; 16-byte aligned rows
  static constexpr int kPartialElems = Traits::kBlockM * kPartialStride;
  alignas(1024) float partial[kHasBias ? 2 * kPartialElems : 1];
  alignas(1024) Element q[2 * kGroup * Traits::kTileElemsQ];
  alignas(1024) Element dout[2 * kGroup * Traits::kTileElemsQ];
  alignas(1024) Element k[2 * Traits::kTileElemsKV];
  alignas(1024) Element v[2 * Traits::kTileElemsKV];
  alignas(1024) Element bias[kHasBias ? 2 * Traits::kTileElemsP : 1];  // TMA's 128-byte swizzle
  alignas(8) uint64_t q_full[2];   // a group's Q and dO tiles have landed (by group parity)
  uint64_t kv_full[2];             // a step's K, V and bias tiles have landed (by step parity)
};

// The TMA descriptors of the dQ kernel: as the dK/dV kernel's.
using DqTensorMaps = DkdvTensorMaps;

// kGroup n share each read-modify-write of the bias-gradient partial (see DqSchedule).
template <typename Traits, int kGroup, bool kHasBias>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocksDq)
    attention_bwd_dq_kernel(const BwdParams p, const __grid_constant__ DqTensorMaps maps) {
  using Element = typename Traits::Element;
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;
  constexpr int kBoxD = Traits::kBoxD;
  constexpr int kBoxesD = Traits::kBoxesD;
  constexpr uint64_t kCacheHint = static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL);
  using Smem = DqSmem<Traits, kGroup, kHasBias>;
  constexpr int kPartialStride = Smem::kPartialStride;

  const AttentionShape& sh = p.shape;
  const DqSlice<Element, kBlockM, kHasBias> slice(p);
  const int S = slice.S, m0 = slice.m0;
  const int64_t b = slice.b, h = slice.h;
  const int64_t n_begin = slice.n_begin, n_end = slice.n_end;
  float* dbias = slice.dbias;
  const int tid = threadIdx.x;
  const int32_t head = static_cast<int32_t>(h), bias_plane = static_cast<int32_t>(b * sh.heads + h);

  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<Smem*>(smem_raw);
  using RowsQ = typename Traits::template SmemLayoutRows<2 * kGroup>;
  using RowsKV = typename Traits::template SmemLayoutRows<2>;
  using RowsKVt = typename Traits::template SmemLayoutRowsT<2>;
  Tensor sQ = make_tensor(make_smem_ptr(smem.q), RowsQ{});       // (m, d, slot)
  Tensor sdO = make_tensor(make_smem_ptr(smem.dout), RowsQ{});   // (m, d, slot)
  Tensor sK = make_tensor(make_smem_ptr(smem.k), RowsKV{});      // (n, d, parity)
  Tensor sV = make_tensor(make_smem_ptr(smem.v), RowsKV{});      // (n, d, parity)
  Tensor sKt = make_tensor(make_smem_ptr(smem.k), RowsKVt{});    // (d, n, parity)

  const int n_blocks = (S + kBlockN - 1) / kBlockN;
  auto offset = [&](int64_t n) { return slice.offset(sh, n); };
  using Schedule = DqSchedule<kGroup>;
  using Step = typename Schedule::Step;
  const Schedule schedule{n_begin, n_end, n_blocks};
  auto slot = [](const Step& st) { return (st.group & 1) * kGroup + st.sub; };
  constexpr uint32_t kTileBytes = Traits::kTileElemsQ * sizeof(Element);
  constexpr uint32_t kBiasBytes = Traits::kTileElemsP * sizeof(Element);
  // The loads of step st: thread 0 issues the TMA copies of its K, V and bias tiles (and, at a
  // group's first step, the group's Q and dO tiles); every thread stages its share of the
  // partial tile the step's read-modify-write will read, by cp.async.
  auto issue = [&](const Step& st) {
    const int32_t n0 = st.nb * kBlockN;
    if (tid == 0) {
      if (st.nb == 0 && st.sub == 0) {
        uint64_t* full = &smem.q_full[st.group & 1];
        Barrier::arrive_and_expect_tx(full, 2 * kTileBytes * st.size);
        for (int sub = 0; sub < st.size; ++sub) {
          const int32_t outer = static_cast<int32_t>(b * sh.n + st.n0 + sub);
#pragma unroll
          for (int part = 0; part < kBoxesD; ++part) {
            const int offset = ((st.group & 1) * kGroup + sub) * Traits::kTileElemsQ + part * kBlockM * kBoxD;
            SM90_TMA_LOAD_4D::copy(&maps.q, full, kCacheHint, smem.q + offset, part * kBoxD, head, m0, outer);
            SM90_TMA_LOAD_4D::copy(&maps.dout, full, kCacheHint, smem.dout + offset, part * kBoxD, head, m0,
                                   outer);
          }
        }
      }
      uint64_t* full = &smem.kv_full[st.parity];
      Barrier::arrive_and_expect_tx(full, 2 * kTileBytes + (kHasBias ? kBiasBytes : 0));
      const int32_t outer = static_cast<int32_t>(b * sh.n + st.n0 + st.sub);
#pragma unroll
      for (int part = 0; part < kBoxesD; ++part) {
        const int offset = st.parity * Traits::kTileElemsKV + part * kBlockN * kBoxD;
        SM90_TMA_LOAD_4D::copy(&maps.k, full, kCacheHint, smem.k + offset, part * kBoxD, head, n0, outer);
        SM90_TMA_LOAD_4D::copy(&maps.v, full, kCacheHint, smem.v + offset, part * kBoxD, head, n0, outer);
      }
      if constexpr (kHasBias) {
        SM90_TMA_LOAD_3D::copy(&maps.bias, full, kCacheHint, smem.bias + st.parity * Traits::kTileElemsP, n0,
                               m0, bias_plane);
      }
    }
    if constexpr (kHasBias) {
      if (schedule.stages_partial(st)) {
        load_square_tile<kBlockM, kBlockN, kPartialStride, kNThreads>(
            smem.partial + st.parity * Smem::kPartialElems, dbias, m0, n0, S, tid);
      }
    }
    cp_async_fence();
  };
  if (tid == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      Barrier::init(&smem.q_full[i], 1);
      Barrier::init(&smem.kv_full[i], 1);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  Step cur = schedule.first();
  issue(cur);

  typename Traits::MmaQK mma_qk;
  typename Traits::MmaDQ mma_dq;
  auto thr_qk = mma_qk.get_thread_slice(tid);
  auto thr_dq = mma_dq.get_thread_slice(tid);
  Tensor tSrQ = thr_qk.make_fragment_A(thr_qk.partition_A(sQ));       // (.., .., k, slot)
  Tensor tSrdO = thr_qk.make_fragment_A(thr_qk.partition_A(sdO));
  Tensor tSrK = thr_qk.make_fragment_B(thr_qk.partition_B(sK));       // (.., .., k, parity)
  Tensor tSrV = thr_qk.make_fragment_B(thr_qk.partition_B(sV));
  Tensor tQrKt = thr_dq.make_fragment_B(thr_dq.partition_B(sKt));     // (.., .., k, parity)

  const AccCoords<Traits::kNWarps> at(tid);
  using AccQ = decltype(partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using AccS = decltype(partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  AccS acc_s, acc_dp, acc_bias;
  Tensor s = make_tensor(acc_s.data(), acc_rowcol_layout(acc_s.layout()));
  Tensor dp = make_tensor(acc_dp.data(), acc_rowcol_layout(acc_dp.layout()));
  constexpr int kRows = decltype(size<0>(s))::value;
  // The key mask and row statistics of a step, fetched one step ahead.
  auto prefetch = [&](const Step& st, KeyMaskPrefetch& key_mask, RowStats<kRows>& stats) {
    const int64_t bn = b * sh.n + st.n0 + st.sub;
    key_mask.fetch<kBlockN>(p.mask ? p.mask + bn * sh.seq : nullptr, st.nb * kBlockN, S);
    stats.load(p.lse + (bn * sh.heads + h) * sh.seq, p.delta + (bn * sh.heads + h) * sh.seq, m0, S, at);
  };
  KeyMaskPrefetch key_mask, next_key_mask;
  RowStats<kRows> stats, next_stats;
  prefetch(cur, key_mask, stats);
  AccQ acc_dq[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) clear(acc_dq[g]);
  Tensor ds_frag = make_tensor<Element>(acc_dp.layout());
  Tensor ds_rc = make_tensor(ds_frag.data(), acc_rowcol_layout(ds_frag.layout()));
  Tensor bias_rc = make_tensor(acc_bias.data(), acc_rowcol_layout(acc_bias.layout()));
  Tensor tOrdS = acc_as_a_operand<kBlockN>(ds_frag);

  for (int64_t step = 0; cur.n0 < n_end; ++step) {
    const Step next = schedule.advance(cur);
    const int64_t n = cur.n0 + cur.sub;
    const int n0 = cur.nb * kBlockN;
    const uint64_t valid = key_mask.bits();
    if (next.n0 < n_end) {
      issue(next);  // into the stages the previous step finished with
      prefetch(next, next_key_mask, next_stats);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this step's staged partial tile, from every thread's cp.async
    if (cur.nb == 0 && cur.sub == 0) Barrier::wait(&smem.q_full[cur.group & 1], (cur.group >> 1) & 1);
    Barrier::wait(&smem.kv_full[cur.parity], static_cast<int>((step >> 1) & 1));

    wgmma_batch<true>(mma_qk, tSrQ(_, _, _, slot(cur)), tSrK(_, _, _, cur.parity), acc_s);
    wgmma_batch<true>(mma_qk, tSrdO(_, _, _, slot(cur)), tSrV(_, _, _, cur.parity), acc_dp);
    warpgroup_wait<1>();  // S; dP may still run
    warpgroup_fence_operand(acc_s);  // no read of S moves above the wait
    logits_tile<kHasBias>(s, at, p.scale,
                          Swizzle128BiasTile<Element>{smem.bias + cur.parity * Traits::kTileElemsP}, valid);
    probs_from_logits(s, stats);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_dp);
    // dS = P (dP - delta), written to the dQ product's operand and summed into the bias
    // gradient; the accumulators themselves are only read, so that no wgmma waits on them.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int c = 0; c < size<1>(s); ++c) {
        const float ds = s(r, c) * (dp(r, c) - stats.delta[r]);
        ds_rc(r, c) = static_cast<Element>(ds);
        if constexpr (kHasBias) bias_rc(r, c) = cur.sub == 0 ? ds : bias_rc(r, c) + ds;
      }
    }
    // dQ += dS K runs while the bias gradient's partial is updated (which reads no wgmma
    // accumulator). Static indices only, so that the accumulators stay in registers; each
    // branch waits for its own product, so that no accumulator is merged (copied) across the
    // branches while a product still writes it.
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      if (g != cur.sub) continue;
      wgmma_batch<false>(mma_dq, tOrdS, tQrKt(_, _, _, cur.parity), acc_dq[g]);
      if constexpr (kHasBias) {
        if (cur.sub + 1 == cur.size) {
          // This CTA alone owns these elements of its chunk's partial: plain read-modify-write.
          accumulate_partial<kBlockM, kBlockN, kPartialStride>(
              bias_rc, at, dbias, smem.partial + cur.parity * Smem::kPartialElems, cur.n0 == n_begin,
              schedule.staged_rmw(cur), m0, n0, S);
        }
      }
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_dq[g]);
    }
    if (cur.nb + 1 == n_blocks) {
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        if (g != cur.sub) continue;
        store_rows(make_tensor(acc_dq[g].data(), acc_rowcol_layout(acc_dq[g].layout())), at,
                   static_cast<Element*>(p.dq) + offset(n), slice.row_stride, m0, S, slice.D, p.scale);
        clear(acc_dq[g]);
      }
    }
    __syncthreads();  // every warp is done with this step's stages
    cur = next;
    key_mask = next_key_mask;
    stats = next_stats;
  }
}

}  // namespace sm90
}  // namespace jevo
