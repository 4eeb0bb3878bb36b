// The end of every forward kernel: normalise the accumulated output rows, write O (and, under
// differentiation, its rounding residual) and the log-sum-exp. Both kernel families hold O in
// the same per-thread layout (rows row(r), column pairs col(c), col(c) + 1; see AccCoords).
#pragma once

#include <cutlass/array.h>
#include <cutlass/numeric_types.h>

#include <cmath>

#include "attention/logits.h"
#include "attention/params.h"
#include "attention/tile_utils.h"

namespace jevo {

// o_rc: the (rows, cols) view of this thread's fp32 output accumulator; row_max, row_sum: its
// rows' running maximum (natural units) and (per-thread partial) sum of exponentials. o and
// o_res point at this (b * n, head)'s rows, lse at its [S] slice; m0 is the tile's first query.
// A fully masked row has sum 0: output 0 (residual 0), LSE +inf (so that the backward's
// exp(s - LSE) is 0 there, never NaN).
template <bool kWriteResidual, int kRows, int kNWarps, typename Element, typename ORowCol>
CUTE_DEVICE void write_forward_rows(ORowCol const& o_rc, AccCoords<kNWarps> const& at,
                                    const float (&row_max)[kRows], const float (&row_sum)[kRows],
                                    Element* o, cutlass::bfloat16_t* o_res, float* lse,
                                    int64_t row_stride, int m0, int S, int D) {
  using Residual = cutlass::bfloat16_t;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float sum = quad_sum(row_sum[r]);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int qi = m0 + at.row(r);
    if (qi < S) {
#pragma unroll
      for (int c = 0; c < size<1>(o_rc); c += 2) {
        const int d = at.col(c);  // d and d + 1, both < D or both >= D (D % 8 == 0)
        if (d < D) {
          const float o0 = o_rc(r, c) * inv, o1 = o_rc(r, c + 1) * inv;
          cutlass::Array<Element, 2> pair;
          pair[0] = static_cast<Element>(o0);
          pair[1] = static_cast<Element>(o1);
          *reinterpret_cast<cutlass::Array<Element, 2>*>(o + int64_t(qi) * row_stride + d) = pair;
          if constexpr (kWriteResidual) {
            // Exact in fp32 (Sterbenz): the rounding is within a factor of two of o0.
            cutlass::Array<Residual, 2> res;
            res[0] = static_cast<Residual>(o0 - static_cast<float>(pair[0]));
            res[1] = static_cast<Residual>(o1 - static_cast<float>(pair[1]));
            *reinterpret_cast<cutlass::Array<Residual, 2>*>(o_res + int64_t(qi) * row_stride + d) = res;
          }
        }
      }
      if ((threadIdx.x & 3) == 0) lse[qi] = sum > 0.f ? row_max[r] + __logf(sum) : INFINITY;
    }
  }
}

}  // namespace jevo
