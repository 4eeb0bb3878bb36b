// Forward Evoformer attention for Hopper (sm_90a): the sm80 kernel's contract and its online
// softmax, with both matrix products on wgmma, which runs asynchronously beside the warpgroup's
// own instructions. The products of consecutive key tiles are pipelined: the step of tile j
// issues S_j = Q K_j^T and O += P_{j-1} V_{j-1}, waits for S_j only, computes the softmax of
// tile j while P V of tile j - 1 still runs on the tensor cores, and only then waits for it and
// rescales O. Operands come from shared memory (Q, K, V) and registers (P), so no ldmatrix and
// no per-warp copies of K and V. Q, K, V and the bias tiles arrive by TMA, issued by one thread
// and awaited on one mbarrier per stage, so the warps spend no instructions on loads.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

#include "attention/fwd_epilogue.h"
#include "attention/grid.h"
#include "attention/logits.h"
#include "attention/params.h"
#include "attention/sm90/fwd_traits.h"
#include "attention/tile_utils.h"

namespace jevo {
namespace sm90 {

// The wgmma accumulator layout ((2, 2, N / 8), MMA_M, MMA_N) seen as (rows, cols): the second
// value mode is the row pair (r, r + 8), the first and third the columns 8 j + {0, 1}.
template <typename Layout>
CUTE_HOST_DEVICE auto acc_rowcol_layout(Layout acc) {
  static_assert(decltype(rank(acc))::value == 3);
  static_assert(decltype(rank<0>(acc))::value == 3);
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)),
                     make_layout(get<0, 0>(acc), get<0, 2>(acc), get<2>(acc)));
}

// The accumulator of S [64, kBlockN] in the element type, seen as the register A operand of
// P V: its values (2 columns, 2 rows, column groups 2k and 2k + 1) are those of the k16 slice k
// in wgmma's A-register order.
template <int kBlockN, typename Frag>
CUTE_DEVICE auto acc_as_a_operand(Frag& frag) {
  static_assert(decltype(size(frag))::value == kBlockN / 2);
  return make_tensor(frag.data(), make_layout(Shape<Shape<_2, _2, _2>, _1, Int<kBlockN / 16>>{}));
}

// acc (+)= A B over the K slices of one tiled wgmma, as one committed batch. With kZeroInit the
// first slice overwrites acc. Waits for nothing: the caller waits with warpgroup_wait<N>.
template <bool kZeroInit, typename TiledMma, typename TA, typename TB, typename TC>
CUTE_DEVICE void wgmma_batch(TiledMma& mma, TA&& a, TB&& b, TC& acc) {
  constexpr bool kRegisterA =
      !is_same_v<typename cute::remove_cvref_t<TA>::iterator, GMMA::DescriptorIterator>;
  if constexpr (kRegisterA) warpgroup_fence_operand(a);
  warpgroup_fence_operand(acc);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(acc);
  if constexpr (kRegisterA) warpgroup_fence_operand(a);
}

// The TMA descriptors of one launch (kernel parameters, so __grid_constant__ and 64-byte
// aligned): activations as encode_activation_map gives them, the bias as encode_bias_map.
struct FwdTensorMaps {
  CUtensorMap q, k, v, bias;
};

// Shared memory of the kernel: Q, the K, V and bias rings (each tile 1 KiB-aligned, as the
// 128-byte swizzle wants), and the mbarriers that say a stage (or Q) has landed.
template <typename Traits>
struct FwdSmem {
  using Element = typename Traits::Element;
  alignas(1024) Element q[Traits::kTileElemsQ];
  alignas(1024) Element k[Traits::kStages * Traits::kTileElemsKV];
  alignas(1024) Element v[Traits::kStages * Traits::kTileElemsKV];
  alignas(1024) Element bias[Traits::kStages * Traits::kTileElemsBias];
  alignas(8) uint64_t q_full;
  uint64_t full[Traits::kStages];
};

template <typename Traits, bool kWriteResidual>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocks)
    attention_fwd_kernel(const FwdParams p, const __grid_constant__ FwdTensorMaps maps) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;
  constexpr int kPrefetch = Traits::kPrefetch;
  constexpr int kBoxD = Traits::kBoxD;
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr uint64_t kCacheHint = static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL);

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
  Element* o = static_cast<Element*>(p.o) + base;
  const uint8_t* mask = p.mask ? p.mask + bn * sh.seq : nullptr;
  const bool has_bias = p.bias != nullptr;

  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<FwdSmem<Traits>*>(smem_raw);
  Tensor sQ = make_tensor(make_smem_ptr(smem.q), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k), typename Traits::SmemLayoutK{});     // (n, d, stage)
  Tensor sVt = make_tensor(make_smem_ptr(smem.v), typename Traits::SmemLayoutVt{});   // (d, n, stage)

  const int n_blocks = (S + kBlockN - 1) / kBlockN;
  const int32_t head = static_cast<int32_t>(h), outer = static_cast<int32_t>(bn);
  const int32_t bias_plane = static_cast<int32_t>(b * sh.heads + h);
  constexpr uint32_t kKVBytes = Traits::kTileElemsKV * sizeof(Element);
  constexpr uint32_t kBiasBytes = Traits::kTileElemsBias * sizeof(Element);
  // Thread 0 loads key tile `nb` (K, V and the bias tile) into stage nb % kStages; its mbarrier
  // completes when all their bytes have landed.
  auto issue = [&](int nb) {
    if (nb >= n_blocks) return;
    const int st = nb % kStages;
    const int32_t n0 = nb * kBlockN;
    Barrier::arrive_and_expect_tx(&smem.full[st], 2 * kKVBytes + (has_bias ? kBiasBytes : 0));
#pragma unroll
    for (int part = 0; part < Traits::kBoxesD; ++part) {
      const int32_t d0 = part * kBoxD;
      const int offset = st * Traits::kTileElemsKV + part * kBlockN * kBoxD;
      SM90_TMA_LOAD_4D::copy(&maps.k, &smem.full[st], kCacheHint, smem.k + offset, d0, head, n0, outer);
      SM90_TMA_LOAD_4D::copy(&maps.v, &smem.full[st], kCacheHint, smem.v + offset, d0, head, n0, outer);
    }
    if (has_bias) {
      SM90_TMA_LOAD_3D::copy(&maps.bias, &smem.full[st], kCacheHint,
                             smem.bias + st * Traits::kTileElemsBias, n0, m0, bias_plane);
    }
  };

  if (tid == 0) {
    Barrier::init(&smem.q_full, 1);
#pragma unroll
    for (int st = 0; st < kStages; ++st) Barrier::init(&smem.full[st], 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  if (tid == 0) {
    Barrier::arrive_and_expect_tx(&smem.q_full, Traits::kTileElemsQ * sizeof(Element));
#pragma unroll
    for (int part = 0; part < Traits::kBoxesD; ++part) {
      SM90_TMA_LOAD_4D::copy(&maps.q, &smem.q_full, kCacheHint, smem.q + part * kBlockM * kBoxD,
                             part * kBoxD, head, m0, outer);
    }
#pragma unroll
    for (int i = 0; i < kPrefetch; ++i) issue(i);
  }
  KeyMaskPrefetch key_mask;
  key_mask.fetch<kBlockN>(mask, 0, S);

  typename Traits::MmaQK mma_qk;
  typename Traits::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(tid);
  auto thr_pv = mma_pv.get_thread_slice(tid);
  Tensor tSrQ = thr_qk.make_fragment_A(thr_qk.partition_A(sQ));    // descriptors
  Tensor tSrK = thr_qk.make_fragment_B(thr_qk.partition_B(sK));    // (.., .., k, stage)
  Tensor tOrVt = thr_pv.make_fragment_B(thr_pv.partition_B(sVt));  // (.., .., k, stage)
  Tensor acc_s = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor acc_o = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor p_frag = make_tensor<Element>(acc_s.layout());  // P of the previous tile
  Tensor tOrP = acc_as_a_operand<kBlockN>(p_frag);
  clear(acc_o);

  const AccCoords<Traits::kNWarps> at(tid);
  Tensor s = make_tensor(acc_s.data(), acc_rowcol_layout(acc_s.layout()));
  Tensor o_rc = make_tensor(acc_o.data(), acc_rowcol_layout(acc_o.layout()));
  constexpr int kRows = decltype(size<0>(s))::value;
  constexpr int kCols = decltype(size<1>(s))::value;
  static_assert(kRows == 2, "a thread holds rows r and r + 8 of its warp's 16");

  float row_max[kRows];  // natural units
  float row_sum[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }

  Barrier::wait(&smem.q_full, 0);
  for (int nb = 0; nb < n_blocks; ++nb) {
    const int st = nb % kStages;
    const uint64_t valid = key_mask.bits();
    if (nb + 1 < n_blocks) key_mask.fetch<kBlockN>(mask, (nb + 1) * kBlockN, S);
    Barrier::wait(&smem.full[st], (nb / kStages) & 1);  // tile nb has landed
    // After the barrier every warp is done with tile nb - 1's softmax, and its P V (tile nb - 2's
    // V) has completed: tile nb - 2's stage is free for the next load.
    __syncthreads();
    if (tid == 0) issue(nb + kPrefetch);

    wgmma_batch<true>(mma_qk, tSrQ, tSrK(_, _, _, st), acc_s);
    if (nb > 0) wgmma_batch<false>(mma_pv, tOrP, tOrVt(_, _, _, (nb - 1) % kStages), acc_o);
    if (nb > 0) {
      warpgroup_wait<1>();  // S of this tile; P V of the last may still run
    } else {
      warpgroup_wait<0>();
    }

    logits_from(s, at, p.scale,
                Swizzle128BiasTile<Element>{has_bias ? smem.bias + st * Traits::kTileElemsBias : nullptr},
                valid);
    float correction[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int c = 0; c < kCols; ++c) mx = fmaxf(mx, s(r, c));
      mx = quad_max(mx);
      // A row with every key so far masked keeps max -inf; subtract 0 then so no inf - inf.
      const float base_log2 = (mx == -INFINITY ? 0.f : mx) * kLog2e;
      correction[r] = exp2f(row_max[r] * kLog2e - base_log2);
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const float pv = exp2f(fmaf(s(r, c), kLog2e, -base_log2));
        s(r, c) = pv;
        sum += pv;
      }
      row_sum[r] = row_sum[r] * correction[r] + sum;
    }

    warpgroup_wait<0>();  // P V of tile nb - 1: O and P are free again
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int c = 0; c < size<1>(o_rc); ++c) o_rc(r, c) *= correction[r];
    }
#pragma unroll
    for (int i = 0; i < size(acc_s); ++i) p_frag(i) = static_cast<Element>(acc_s(i));
  }
  if (n_blocks > 0) {
    wgmma_batch<false>(mma_pv, tOrP, tOrVt(_, _, _, (n_blocks - 1) % kStages), acc_o);
    warpgroup_wait<0>();
  }

  float* lse = p.lse + (bn * sh.heads + h) * sh.seq;
  using Residual = cutlass::bfloat16_t;
  Residual* o_res = kWriteResidual ? static_cast<Residual*>(p.o_residual) + base : nullptr;
  write_forward_rows<kWriteResidual>(o_rc, at, row_max, row_sum, o, o_res, lse, row_stride, m0, S, D);
}

}  // namespace sm90
}  // namespace jevo
