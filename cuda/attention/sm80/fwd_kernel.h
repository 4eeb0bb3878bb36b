// Forward Evoformer attention: for each (b, n, h) and tile of 64 queries, stream the keys in
// tiles of 64, add the pair bias and the key mask inside the tile, keep an online softmax in
// fp32 and write O and the log-sum-exp. Nothing of size S x S leaves the chip.
// kWriteResidual (the forward under differentiation) also writes the fp32 O's rounding residual
// in bf16, the rest of O that the backward's delta needs; inference runs without it.
#pragma once

#include <cuda_runtime.h>

#include "attention/fwd_epilogue.h"
#include "attention/grid.h"
#include "attention/sm80/kernel_traits.h"
#include "attention/logits.h"
#include "attention/params.h"
#include "attention/tile_utils.h"

namespace jevo {
namespace sm80 {

template <typename Traits, bool kWriteResidual>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocksFwd) attention_fwd_kernel(const FwdParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;
  constexpr int kStages = Traits::kStagesFwd;
  static_assert(kStages == 2 || kStages == 3);

  const AttentionShape& sh = p.shape;
  const int S = static_cast<int>(sh.seq);
  const int D = static_cast<int>(sh.head_dim);
  const TileCoord tc = decode_tile_coord((S + kBlockM - 1) / kBlockM, sh.heads);
  const int64_t bn = tc.outer;  // b * N + n
  const int64_t h = tc.head;
  const int m0 = tc.tile * kBlockM;
  const int tid = threadIdx.x;
  const int64_t b = bn / sh.n;
  const int64_t row_stride = sh.heads * sh.head_dim;
  const int64_t base = bn * sh.seq * row_stride + h * sh.head_dim;

  const Element* q = static_cast<const Element*>(p.q) + base;
  const Element* k = static_cast<const Element*>(p.k) + base;
  const Element* v = static_cast<const Element*>(p.v) + base;
  Element* o = static_cast<Element*>(p.o) + base;
  const uint8_t* mask = p.mask ? p.mask + bn * sh.seq : nullptr;
  const Element* bias =
      p.bias ? static_cast<const Element*>(p.bias) + (b * sh.heads + h) * sh.seq * sh.seq : nullptr;

  // Shared memory: Q, then kStages stages of (K, V, bias tile) in a ring, so that the loads of a
  // key tile have at least one whole tile of work to land in.
  constexpr int kBiasElems = BiasTileLayout<kBlockM, kBlockN>::kElems;
  constexpr int kStageElemsK = Traits::kTileElemsKV;
  constexpr int kStageElems = 2 * kStageElemsK + kBiasElems;
  extern __shared__ __align__(128) char smem[];
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutQ{});
  Element* stages = raw_pointer_cast(sQ.data() + size(sQ));
  auto stage_k = [&](int st) {
    return make_tensor(make_smem_ptr(stages + st * kStageElems), typename Traits::SmemLayoutKV{});
  };
  auto stage_vt = [&](int st) {
    return make_tensor(make_smem_ptr(stages + st * kStageElems + kStageElemsK),
                       typename Traits::SmemLayoutKVt{});
  };
  auto stage_bias = [&](int st) { return stages + st * kStageElems + 2 * kStageElemsK; };

  const int n_blocks = (S + kBlockN - 1) / kBlockN;
  // Loads key tile `nb` into stage nb % kStages and commits one cp.async group (empty past the
  // last tile, so that the group count per iteration stays fixed).
  auto issue = [&](int nb) {
    if (nb < n_blocks) {
      const int st = nb % kStages, n0 = nb * kBlockN;
      Tensor sK = stage_k(st);
      Tensor sV = make_tensor(make_smem_ptr(stages + st * kStageElems + kStageElemsK),
                              typename Traits::SmemLayoutKV{});
      load_tile_async<kNThreads>(sK, k + n0 * row_stride, row_stride, S - n0, D, tid);
      load_tile_async<kNThreads>(sV, v + n0 * row_stride, row_stride, S - n0, D, tid);
      if (bias) load_bias_tile<kBlockM, kBlockN, kNThreads>(stage_bias(st), bias, m0, n0, S, tid);
    }
    cp_async_fence();
  };

  load_tile_async<kNThreads>(sQ, q + m0 * row_stride, row_stride, S - m0, D, tid);
  issue(0);  // the same group as Q
  issue(1);
  KeyMaskPrefetch key_mask;
  key_mask.fetch<kBlockN>(mask, 0, S);

  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor rQ = thr_mma.partition_fragment_A(sQ);
  Tensor rK = thr_mma.partition_fragment_B(stage_k(0));
  Tensor rVt = thr_mma.partition_fragment_B(stage_vt(0));
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_o);

  auto copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma);
  auto thr_copy_q = copy_q.get_thread_slice(tid);
  auto copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma);
  auto thr_copy_k = copy_k.get_thread_slice(tid);
  auto copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma);
  auto thr_copy_v = copy_v.get_thread_slice(tid);

  // Q stays in registers for the whole key loop.
  cp_async_wait<1>();
  __syncthreads();
  cute::copy(copy_q, thr_copy_q.partition_S(sQ), thr_copy_q.retile_D(rQ));

  const AccCoords<Traits::kNWarps> at(tid);
  constexpr int kRows = 2 * (kBlockM / (16 * Traits::kNWarps));
  constexpr int kCols = kBlockN / 4;

  float row_max[kRows];  // natural units
  float row_sum[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }

  for (int nb = 0; nb < n_blocks; ++nb) {
    const int st = nb % kStages;
    const uint64_t valid = key_mask.bits();
    if (nb + 1 < n_blocks) key_mask.fetch<kBlockN>(mask, (nb + 1) * kBlockN, S);
    cp_async_wait<1>();
    __syncthreads();  // tile nb landed; every warp is done with tile nb - 1
    if constexpr (kStages == 3) issue(nb + 2);  // into the stage of tile nb - 1

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_rs(acc_s, rQ, rK, thr_copy_k.partition_S(stage_k(st)), mma, copy_k, thr_copy_k);

    Tensor s = make_tensor(acc_s.data(), acc_rowcol_layout(acc_s.layout()));
    logits(s, at, p.scale, bias ? stage_bias(st) : nullptr, valid);

    // Online softmax: rescale what was accumulated by exp(old max - new max).
    Tensor o_rc = make_tensor(acc_o.data(), acc_rowcol_layout(acc_o.layout()));
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int c = 0; c < kCols; ++c) mx = fmaxf(mx, s(r, c));
      mx = quad_max(mx);
      // A row with every key so far masked keeps max -inf; subtract 0 then so no inf - inf.
      const float base_log2 = (mx == -INFINITY ? 0.f : mx) * kLog2e;
      const float correction = exp2f(row_max[r] * kLog2e - base_log2);
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const float pv = exp2f(fmaf(s(r, c), kLog2e, -base_log2));
        s(r, c) = pv;
        sum += pv;
      }
      row_sum[r] = row_sum[r] * correction + sum;
#pragma unroll
      for (int c = 0; c < size<1>(o_rc); ++c) o_rc(r, c) *= correction;
    }

    Tensor p_frag = convert_fragment<Element>(acc_s);
    Tensor rP = make_tensor(p_frag.data(), acc_as_a_layout(p_frag.layout()));
    gemm_rs(acc_o, rP, rVt, thr_copy_v.partition_S(stage_vt(st)), mma, copy_v, thr_copy_v);

    if constexpr (kStages == 2) {
      __syncthreads();  // every warp is done with tile nb
      issue(nb + 2);    // into its stage
    }
  }

  Tensor o_rc = make_tensor(acc_o.data(), acc_rowcol_layout(acc_o.layout()));
  float* lse = p.lse + (bn * sh.heads + h) * sh.seq;
  using Residual = cutlass::bfloat16_t;
  Residual* o_res = kWriteResidual ? static_cast<Residual*>(p.o_residual) + base : nullptr;
  write_forward_rows<kWriteResidual>(o_rc, at, row_max, row_sum, o, o_res, lse, row_stride, m0, S, D);
}

}  // namespace sm80
}  // namespace jevo
