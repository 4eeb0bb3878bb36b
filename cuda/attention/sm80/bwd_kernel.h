// Backward Evoformer attention, deterministic (no floating-point atomics), in three launches:
//  1. dK, dV: one CTA per (b, n, h, key tile) walks the query tiles, recomputing P from the
//     saved log-sum-exp; P and dS go through shared memory to be used transposed.
//  2. dQ and the bias gradient: one CTA per (b, chunk of N, h, query tile) walks the n of its
//     chunk and the key tiles; it owns its slice of the fp32 bias-gradient partial of its chunk,
//     so the sum over n needs no atomics and never materialises [N, H, S, S].
//  3. dBias = sum over chunks of the partials, in a fixed order, rounded once.
#pragma once

#include <cuda_runtime.h>

#include "attention/bwd_common.h"
#include "attention/grid.h"
#include "attention/params.h"
#include "attention/sm80/kernel_traits.h"

namespace jevo {
namespace sm80 {

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocksDkdv) attention_bwd_dkdv_kernel(const BwdParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;
  static_assert(kBlockM == kBlockN, "one tiled mma serves queries x keys and keys x head dim");

  const DkdvSlice<Element, kBlockN> slice(p);
  const int S = slice.S, D = slice.D, n0 = slice.n0;
  const int64_t row_stride = slice.row_stride;
  const Element *q = slice.q, *k = slice.k, *v = slice.v, *dout = slice.dout, *bias = slice.bias;
  const uint8_t* mask = slice.mask;
  const float *lse = slice.lse, *delta = slice.delta;
  const int tid = threadIdx.x;

  // Shared memory: K, V, P, dS, then two stages of (Q, dO, bias tile) so that the next query
  // tile streams in while this one is computed.
  constexpr int kBiasElems = BiasTileLayout<kBlockM, kBlockN>::kElems;
  constexpr int kStageElems = 2 * Traits::kTileElemsQ + kBiasElems;
  extern __shared__ __align__(128) char smem[];
  Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
  Tensor sP = make_tensor(sV.data() + size(sV), typename Traits::SmemLayoutP{});
  Tensor sdS = make_tensor(sP.data() + size(sP), typename Traits::SmemLayoutP{});
  Tensor sPt = make_tensor(sP.data(), typename Traits::SmemLayoutPt{});
  Tensor sdSt = make_tensor(sdS.data(), typename Traits::SmemLayoutPt{});
  Element* stages = raw_pointer_cast(sdS.data() + size(sdS));
  auto stage_q = [&](int stage) {
    return make_tensor(make_smem_ptr(stages + stage * kStageElems), typename Traits::SmemLayoutQ{});
  };
  auto stage_do = [&](int stage) {
    return make_tensor(make_smem_ptr(stages + stage * kStageElems + Traits::kTileElemsQ),
                       typename Traits::SmemLayoutQ{});
  };
  auto stage_bias = [&](int stage) { return stages + stage * kStageElems + 2 * Traits::kTileElemsQ; };
  auto issue = [&](int mb) {  // loads of query tile mb into stage mb % 2
    Tensor sQ = stage_q(mb & 1);
    Tensor sdO = stage_do(mb & 1);
    const int m0 = mb * kBlockM;
    load_tile_async<kNThreads>(sQ, q + m0 * row_stride, row_stride, S - m0, D, tid);
    load_tile_async<kNThreads>(sdO, dout + m0 * row_stride, row_stride, S - m0, D, tid);
    if (bias) load_bias_tile<kBlockM, kBlockN, kNThreads>(stage_bias(mb & 1), bias, m0, n0, S, tid);
    cp_async_fence();
  };

  load_tile_async<kNThreads>(sK, k + n0 * row_stride, row_stride, S - n0, D, tid);
  load_tile_async<kNThreads>(sV, v + n0 * row_stride, row_stride, S - n0, D, tid);
  issue(0);

  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  // Queries x keys products: S = Q K^T and dP = dO V^T.
  Tensor rQ = thr_mma.partition_fragment_A(stage_q(0));
  Tensor rK = thr_mma.partition_fragment_B(sK);
  Tensor rdO = thr_mma.partition_fragment_A(stage_do(0));
  Tensor rV = thr_mma.partition_fragment_B(sV);
  // Keys x head-dim products: dV += P^T dO and dK += dS^T Q.
  Tensor rPt = thr_mma.partition_fragment_A(sPt);
  Tensor rdOt = thr_mma.partition_fragment_B(make_tensor(stage_do(0).data(), typename Traits::SmemLayoutQt{}));
  Tensor rdSt = thr_mma.partition_fragment_A(sdSt);
  Tensor rQt = thr_mma.partition_fragment_B(make_tensor(stage_q(0).data(), typename Traits::SmemLayoutQt{}));
  Tensor acc_dk = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  clear(acc_dk);
  clear(acc_dv);

  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma);
  auto thr_copy_a = copy_a.get_thread_slice(tid);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma);
  auto thr_copy_b = copy_b.get_thread_slice(tid);
  auto copy_at = make_tiled_copy_A(typename Traits::SmemCopyAtomTransposed{}, mma);
  auto thr_copy_at = copy_at.get_thread_slice(tid);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma);
  auto thr_copy_bt = copy_bt.get_thread_slice(tid);
  Tensor sK_part = thr_copy_b.partition_S(sK);
  Tensor sV_part = thr_copy_b.partition_S(sV);
  Tensor sPt_part = thr_copy_at.partition_S(sPt);
  Tensor sdSt_part = thr_copy_at.partition_S(sdSt);

  const AccCoords<Traits::kNWarps> at(tid);
  KeyMaskPrefetch key_mask;
  key_mask.fetch<kBlockN>(mask, n0, S);
  const uint64_t valid = key_mask.bits();  // the keys of this CTA
  const int m_blocks = (S + kBlockM - 1) / kBlockM;
  constexpr int kRows = 2 * (kBlockM / (16 * Traits::kNWarps));
  RowStats<kRows> stats, next_stats;
  stats.load(lse, delta, 0, S, at);

  for (int mb = 0; mb < m_blocks; ++mb) {
    if (mb + 1 < m_blocks) {
      issue(mb + 1);  // into the stage the previous iteration finished with
      next_stats.load(lse, delta, (mb + 1) * kBlockM, S, at);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    Tensor sQ = stage_q(mb & 1);
    Tensor sdO = stage_do(mb & 1);
    Tensor sQt = make_tensor(sQ.data(), typename Traits::SmemLayoutQt{});
    Tensor sdOt = make_tensor(sdO.data(), typename Traits::SmemLayoutQt{});

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    clear(acc_dp);
    gemm_ss(acc_s, rQ, rK, thr_copy_a.partition_S(sQ), sK_part, mma, copy_a, copy_b, thr_copy_a, thr_copy_b);
    gemm_ss(acc_dp, rdO, rV, thr_copy_a.partition_S(sdO), sV_part, mma, copy_a, copy_b, thr_copy_a,
            thr_copy_b);

    Tensor s = make_tensor(acc_s.data(), acc_rowcol_layout(acc_s.layout()));
    Tensor dp = make_tensor(acc_dp.data(), acc_rowcol_layout(acc_dp.layout()));
    logits(s, at, p.scale, bias ? stage_bias(mb & 1) : nullptr, valid);
    softmax_grad(s, dp, stats);
    store_tile_pairs<Element>(s, at, sP);
    store_tile_pairs<Element>(dp, at, sdS);
    __syncthreads();

    gemm_ss(acc_dv, rPt, rdOt, sPt_part, thr_copy_bt.partition_S(sdOt), mma, copy_at, copy_bt,
            thr_copy_at, thr_copy_bt);
    gemm_ss(acc_dk, rdSt, rQt, sdSt_part, thr_copy_bt.partition_S(sQt), mma, copy_at, copy_bt,
            thr_copy_at, thr_copy_bt);
    __syncthreads();  // every warp is done with this stage, P and dS
    stats = next_stats;
  }

  store_dk_dv(make_tensor(acc_dk.data(), acc_rowcol_layout(acc_dk.layout())),
              make_tensor(acc_dv.data(), acc_rowcol_layout(acc_dv.layout())), at, p, slice);
}

// Shared memory of the dQ / bias-gradient kernel: two stages (by group parity) of kGroup (Q, dO)
// tile pairs, and two stages (by step parity) of (K, V, bias tile), so that the next step streams
// in during this one; with a bias, also two stages of the fp32 partial tile that the step's
// read-modify-write reads (first, for alignment).
template <typename Traits, int kGroup, bool kHasBias>
struct DqSmem {
  static constexpr int kPartialStride = Traits::kBlockN + 8;  // floats; 16-byte aligned rows
  static constexpr int kPartialElems = kHasBias ? Traits::kBlockM * kPartialStride : 0;
  static constexpr int kBiasElems = kHasBias ? BiasTileLayout<Traits::kBlockM, Traits::kBlockN>::kElems : 0;
  static constexpr int kQStageElems = kGroup * 2 * Traits::kTileElemsQ;
  static constexpr int kKVStageElems = 2 * Traits::kTileElemsKV + kBiasElems;
  static constexpr int kBytes = 2 * kPartialElems * int(sizeof(float)) +
                                2 * (kQStageElems + kKVStageElems) * int(sizeof(typename Traits::Element));
};

// kGroup n share each read-modify-write of the bias-gradient partial (with a bias: 2 for head
// dims up to 64, whose dQ accumulators fit in registers); without a bias it is 1, which leaves
// registers for more resident CTAs.
template <typename Traits, int kGroup, bool kHasBias>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kHeadDim <= 64 ? (kGroup == 1 ? 3 : 2) : 1)
    attention_bwd_dq_kernel(const BwdParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;

  const AttentionShape& sh = p.shape;
  const DqSlice<Element, kBlockM, kHasBias> slice(p);
  const int S = slice.S, D = slice.D, m0 = slice.m0;
  const int64_t b = slice.b, h = slice.h, row_stride = slice.row_stride;
  const int64_t n_begin = slice.n_begin, n_end = slice.n_end;
  const Element* bias = slice.bias;
  float* dbias = slice.dbias;
  const int tid = threadIdx.x;

  // The n of a chunk are taken kGroup at a time: for each key tile, the kGroup dS tiles are
  // summed in registers before the one read-modify-write of the fp32 bias-gradient partial,
  // which divides that traffic (the bound of this kernel) by kGroup.
  using Smem = DqSmem<Traits, kGroup, kHasBias>;
  constexpr int kPartialStride = Smem::kPartialStride;
  constexpr int kPartialElems = Smem::kPartialElems;
  constexpr int kQStageElems = Smem::kQStageElems;
  constexpr int kKVStageElems = Smem::kKVStageElems;
  extern __shared__ __align__(128) char smem[];
  // Two stages of the fp32 partial tile that the step's read-modify-write will read, prefetched
  // with the step's other loads so that the read's latency is hidden (first, for alignment).
  float* partial_stages = reinterpret_cast<float*>(smem);
  Element* q_stages = reinterpret_cast<Element*>(partial_stages + 2 * kPartialElems);
  Element* kv_stages = q_stages + 2 * kQStageElems;
  auto stage_q = [&](int st, int sub) {
    return make_tensor(make_smem_ptr(q_stages + st * kQStageElems + sub * 2 * Traits::kTileElemsQ),
                       typename Traits::SmemLayoutQ{});
  };
  auto stage_do = [&](int st, int sub) {
    return make_tensor(make_smem_ptr(q_stages + st * kQStageElems + sub * 2 * Traits::kTileElemsQ +
                                     Traits::kTileElemsQ),
                       typename Traits::SmemLayoutQ{});
  };
  auto stage_k = [&](int st) {
    return make_tensor(make_smem_ptr(kv_stages + st * kKVStageElems), typename Traits::SmemLayoutKV{});
  };
  auto stage_v = [&](int st) {
    return make_tensor(make_smem_ptr(kv_stages + st * kKVStageElems + Traits::kTileElemsKV),
                       typename Traits::SmemLayoutKV{});
  };
  auto stage_bias = [&](int st) { return kv_stages + st * kKVStageElems + 2 * Traits::kTileElemsKV; };

  const int n_blocks = (S + kBlockN - 1) / kBlockN;
  auto offset = [&](int64_t n) { return slice.offset(sh, n); };
  using Schedule = DqSchedule<kGroup>;
  using Step = typename Schedule::Step;
  const Schedule schedule{n_begin, n_end, n_blocks};
  auto issue = [&](const Step& st) {
    const int n0 = st.nb * kBlockN;
    if (st.nb == 0 && st.sub == 0) {
      for (int sub = 0; sub < st.size; ++sub) {
        const int64_t base = offset(st.n0 + sub) + m0 * row_stride;
        Tensor sQ = stage_q(st.group & 1, sub);
        Tensor sdO = stage_do(st.group & 1, sub);
        load_tile_async<kNThreads>(sQ, static_cast<const Element*>(p.q) + base, row_stride, S - m0, D, tid);
        load_tile_async<kNThreads>(sdO, static_cast<const Element*>(p.dout) + base, row_stride, S - m0, D, tid);
      }
    }
    const int64_t base = offset(st.n0 + st.sub) + n0 * row_stride;
    Tensor sK = stage_k(st.parity);
    Tensor sV = stage_v(st.parity);
    load_tile_async<kNThreads>(sK, static_cast<const Element*>(p.k) + base, row_stride, S - n0, D, tid);
    load_tile_async<kNThreads>(sV, static_cast<const Element*>(p.v) + base, row_stride, S - n0, D, tid);
    if (kHasBias) load_bias_tile<kBlockM, kBlockN, kNThreads>(stage_bias(st.parity), bias, m0, n0, S, tid);
    if (kHasBias && schedule.stages_partial(st)) {
      load_square_tile<kBlockM, kBlockN, kPartialStride, kNThreads>(
          partial_stages + st.parity * kPartialElems, dbias, m0, n0, S, tid);
    }
    cp_async_fence();
  };
  Step cur = schedule.first();
  issue(cur);

  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor rQ = thr_mma.partition_fragment_A(stage_q(0, 0));
  Tensor rK = thr_mma.partition_fragment_B(stage_k(0));
  Tensor rdO = thr_mma.partition_fragment_A(stage_do(0, 0));
  Tensor rV = thr_mma.partition_fragment_B(stage_v(0));
  Tensor rKt = thr_mma.partition_fragment_B(make_tensor(stage_k(0).data(), typename Traits::SmemLayoutKVt{}));

  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma);
  auto thr_copy_a = copy_a.get_thread_slice(tid);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma);
  auto thr_copy_b = copy_b.get_thread_slice(tid);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma);
  auto thr_copy_bt = copy_bt.get_thread_slice(tid);

  const AccCoords<Traits::kNWarps> at(tid);
  constexpr int kRows = 2 * (kBlockM / (16 * Traits::kNWarps));
  // The key mask and row statistics of a step, fetched one step ahead.
  auto prefetch = [&](const Step& st, KeyMaskPrefetch& key_mask, RowStats<kRows>& stats) {
    const int64_t bn = b * sh.n + st.n0 + st.sub;
    key_mask.fetch<kBlockN>(p.mask ? p.mask + bn * sh.seq : nullptr, st.nb * kBlockN, S);
    stats.load(p.lse + (bn * sh.heads + h) * sh.seq, p.delta + (bn * sh.heads + h) * sh.seq, m0, S, at);
  };
  KeyMaskPrefetch key_mask, next_key_mask;
  RowStats<kRows> stats, next_stats;
  prefetch(cur, key_mask, stats);
  using AccQ = decltype(partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using AccS = decltype(partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  AccQ acc_dq[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) clear(acc_dq[g]);
  AccS acc_bias;

  while (cur.n0 < n_end) {
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
    __syncthreads();
    Tensor sQ = stage_q(cur.group & 1, cur.sub);
    Tensor sdO = stage_do(cur.group & 1, cur.sub);
    Tensor sK = stage_k(cur.parity);
    Tensor sV = stage_v(cur.parity);
    Tensor sKt = make_tensor(sK.data(), typename Traits::SmemLayoutKVt{});

    AccS acc_s, acc_dp;
    clear(acc_s);
    clear(acc_dp);
    gemm_ss(acc_s, rQ, rK, thr_copy_a.partition_S(sQ), thr_copy_b.partition_S(sK), mma, copy_a,
            copy_b, thr_copy_a, thr_copy_b);
    gemm_ss(acc_dp, rdO, rV, thr_copy_a.partition_S(sdO), thr_copy_b.partition_S(sV), mma, copy_a,
            copy_b, thr_copy_a, thr_copy_b);

    Tensor s = make_tensor(acc_s.data(), acc_rowcol_layout(acc_s.layout()));
    Tensor dp = make_tensor(acc_dp.data(), acc_rowcol_layout(acc_dp.layout()));
    logits_tile<kHasBias>(s, at, p.scale, PaddedBiasTile<kBlockN, Element>{stage_bias(cur.parity)},
                          valid);
    softmax_grad(s, dp, stats);

    if constexpr (kHasBias) {
#pragma unroll
      for (int i = 0; i < size(acc_dp); ++i) acc_bias(i) = cur.sub == 0 ? acc_dp(i) : acc_bias(i) + acc_dp(i);
      if (cur.sub + 1 == cur.size) {
        // This CTA alone owns these elements of its chunk's partial: plain read-modify-write.
        Tensor db = make_tensor(acc_bias.data(), acc_rowcol_layout(acc_bias.layout()));
        accumulate_partial<kBlockM, kBlockN, kPartialStride>(
            db, at, dbias, partial_stages + cur.parity * kPartialElems, cur.n0 == n_begin,
            schedule.staged_rmw(cur), m0, n0, S);
      }
    }

    Tensor ds_frag = convert_fragment<Element>(acc_dp);
    Tensor rdS = make_tensor(ds_frag.data(), acc_as_a_layout(ds_frag.layout()));
    // Static indices only, so that the accumulators stay in registers.
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      if (g != cur.sub) continue;
      gemm_rs(acc_dq[g], rdS, rKt, thr_copy_bt.partition_S(sKt), mma, copy_bt, thr_copy_bt);
      if (cur.nb + 1 == n_blocks) {
        store_rows(make_tensor(acc_dq[g].data(), acc_rowcol_layout(acc_dq[g].layout())), at,
                   static_cast<Element*>(p.dq) + offset(n), row_stride, m0, S, D, p.scale);
        clear(acc_dq[g]);
      }
    }
    __syncthreads();  // every warp is done with this step's stages
    cur = next;
    key_mask = next_key_mask;
    stats = next_stats;
  }
}

}  // namespace sm80
}  // namespace jevo
