// Device helpers shared by the forward and backward kernels: predicated global -> shared tile
// loads, shared -> register mma loops, accumulator layout views and quad reductions.
#pragma once

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm80.hpp>

#include <cmath>

namespace jevo {
using namespace cute;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Copies a [rows, cols] tile, row-major with `row_stride` elements between rows, into the
// (swizzled) shared tile `smem` with 16-byte cp.async. Rows >= rows_valid and columns >=
// cols_valid are zero-filled, so partial tiles and padded head dims need no special case later.
// cols_valid must be a multiple of 8 and the source 16-byte aligned (checked by the handler).
// The trip count is static and each thread keeps one column chunk, so the loop unrolls into
// straight-line copies whose addresses differ by constants.
template <int kNThreads, typename SmemTensor, typename Element>
CUTE_DEVICE void load_tile_async(SmemTensor& smem, const Element* gmem, int64_t row_stride,
                                 int rows_valid, int cols_valid, int tid) {
  constexpr int kRows = decltype(size<0>(smem))::value;
  constexpr int kCols = decltype(size<1>(smem))::value;
  constexpr int kChunksPerRow = kCols / 8;
  static_assert(kNThreads % kChunksPerRow == 0 && (kRows * kChunksPerRow) % kNThreads == 0,
                "every thread copies the same number of chunks of one column");
  constexpr int kRowStep = kNThreads / kChunksPerRow;
  using Copy = SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>;
  const int r0 = tid / kChunksPerRow;
  const int col = (tid % kChunksPerRow) * 8;
  const bool col_valid = col < cols_valid;
  const Element* src0 = gmem + r0 * row_stride + col;
#pragma unroll
  for (int i = 0; i < kRows / kRowStep; ++i) {
    const int r = r0 + i * kRowStep;
    const bool valid = col_valid && r < rows_valid;
    Copy::copy(*reinterpret_cast<const uint128_t*>(valid ? src0 + i * kRowStep * row_stride : gmem),
               *reinterpret_cast<uint128_t*>(&smem(r, col)), valid);
  }
}

// Stages rows m0.. and columns n0.. of a row-major [S, S] matrix (bias or fp32 partial) into a
// shared [kRows, kCols] tile whose rows are kStride elements apart; zeros outside the matrix.
// 16-byte cp.async when every row start is 16-byte aligned, plain loads otherwise.
template <int kRows, int kCols, int kStride, int kNThreads, typename T>
CUTE_DEVICE void load_square_tile(T* staged, const T* src, int m0, int n0, int S, int tid) {
  constexpr int kPerChunk = 16 / sizeof(T);
  if (S % kPerChunk == 0) {
    constexpr int kChunksPerRow = kCols / kPerChunk;
    static_assert(kNThreads % kChunksPerRow == 0 && (kRows * kChunksPerRow) % kNThreads == 0,
                  "every thread copies the same number of chunks of one column");
    constexpr int kRowStep = kNThreads / kChunksPerRow;
    using Copy = SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>;
    const int r0 = tid / kChunksPerRow;
    const int col = (tid % kChunksPerRow) * kPerChunk;
    const bool col_valid = n0 + col < S;
    const T* src0 = src + int64_t(m0 + r0) * S + n0 + col;
#pragma unroll
    for (int i = 0; i < kRows / kRowStep; ++i) {
      const int r = r0 + i * kRowStep;
      const bool valid = col_valid && m0 + r < S;
      Copy::copy(*reinterpret_cast<const uint128_t*>(valid ? src0 + int64_t(i) * kRowStep * S : src),
                 *reinterpret_cast<uint128_t*>(staged + r * kStride + col), valid);
    }
  } else {
    static_assert(kNThreads % kCols == 0 && (kRows * kCols) % kNThreads == 0);
    constexpr int kRowStep = kNThreads / kCols;
    const int r0 = tid / kCols, col = tid % kCols;
#pragma unroll 4
    for (int i = 0; i < kRows / kRowStep; ++i) {
      const int r = r0 + i * kRowStep;
      const bool valid = m0 + r < S && n0 + col < S;
      staged[r * kStride + col] = valid ? src[int64_t(m0 + r) * S + n0 + col] : T(0.f);
    }
  }
}

CUTE_DEVICE void cp_async_fence() { cute::cp_async_fence(); }
template <int N>
CUTE_DEVICE void cp_async_wait() { cute::cp_async_wait<N>(); }

// acc += A * B over the K slices, both operands read slice by slice from shared memory so that
// only one slice of each lives in registers.
template <typename Acc, typename RA, typename RB, typename SA, typename SB, typename TiledMma,
          typename CopyA, typename CopyB, typename ThrCopyA, typename ThrCopyB>
CUTE_DEVICE void gemm_ss(Acc& acc, RA& rA, RB& rB, SA const& sA, SB const& sB, TiledMma& mma,
                         CopyA const& copy_a, CopyB const& copy_b, ThrCopyA const& thr_a,
                         ThrCopyB const& thr_b) {
  Tensor rA_view = thr_a.retile_D(rA);
  Tensor rB_view = thr_b.retile_D(rB);
  constexpr int kSlices = decltype(size<2>(rA))::value;
  cute::copy(copy_a, sA(_, _, 0), rA_view(_, _, 0));
  cute::copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
#pragma unroll
  for (int i = 0; i < kSlices; ++i) {
    if (i + 1 < kSlices) {
      cute::copy(copy_a, sA(_, _, i + 1), rA_view(_, _, i + 1));
      cute::copy(copy_b, sB(_, _, i + 1), rB_view(_, _, i + 1));
    }
    cute::gemm(mma, rA(_, _, i), rB(_, _, i), acc);
  }
}

// acc += A * B with A already in registers and B read slice by slice from shared memory.
template <typename Acc, typename RA, typename RB, typename SB, typename TiledMma, typename CopyB,
          typename ThrCopyB>
CUTE_DEVICE void gemm_rs(Acc& acc, RA const& rA, RB& rB, SB const& sB, TiledMma& mma,
                         CopyB const& copy_b, ThrCopyB const& thr_b) {
  Tensor rB_view = thr_b.retile_D(rB);
  constexpr int kSlices = decltype(size<2>(rA))::value;
  cute::copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
#pragma unroll
  for (int i = 0; i < kSlices; ++i) {
    if (i + 1 < kSlices) cute::copy(copy_b, sB(_, _, i + 1), rB_view(_, _, i + 1));
    cute::gemm(mma, rA(_, _, i), rB(_, _, i), acc);
  }
}

// The m16n8k16 accumulator layout ((2, 2), MMA_M, MMA_N) seen as (rows, cols) =
// ((2, MMA_M), (2, MMA_N)): the first value mode holds a column pair, the second a row pair.
template <typename Layout>
CUTE_HOST_DEVICE auto acc_rowcol_layout(Layout acc) {
  static_assert(decltype(rank(acc))::value == 3);
  static_assert(decltype(size<0>(acc))::value == 4);
  auto l = logical_divide(acc, Shape<_2>{});
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// An accumulator [M, N] reinterpreted as the A operand [M, K=N] of the next m16n8k16 mma:
// two neighbouring n8 accumulator tiles form one k16 operand tile.
template <typename Layout>
CUTE_HOST_DEVICE auto acc_as_a_layout(Layout acc) {
  static_assert(decltype(size<0>(acc))::value == 4);
  static_assert(decltype(size<2>(acc))::value % 2 == 0);
  auto l = logical_divide(acc, Shape<Underscore, Underscore, _2>{});
  return make_layout(make_layout(get<0>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

// Converts a float fragment to the element type, value by value, keeping its layout.
template <typename Element, typename Frag>
CUTE_DEVICE auto convert_fragment(Frag const& frag) {
  Tensor out = make_tensor<Element>(frag.layout());
#pragma unroll
  for (int i = 0; i < size(frag); ++i) out(i) = static_cast<Element>(frag(i));
  return out;
}

// The 4 lanes of a quad share the rows of an mma accumulator.
CUTE_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
CUTE_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

}  // namespace jevo
