// Device code shared by the backward kernels of every family: the row statistics and softmax
// gradient of a tile, the stores of P, dS and the gradients, the bias-gradient partial's
// read-modify-write, the dQ kernel's visiting order, and the partials' reduction.
#pragma once

#include <cuda_runtime.h>

#include "attention/grid.h"
#include "attention/logits.h"
#include "attention/params.h"
#include "attention/tile_utils.h"

namespace jevo {

// What one dK/dV CTA reads and writes: the (b, n, head) of its grid position, its key tile
// n0.., and the [S, D] slices of that (b, n, head), token rows row_stride elements apart.
template <typename Element, int kBlockN>
struct DkdvSlice {
  int S, D, n0;
  int64_t bn, b, h, row_stride, base;  // bn = b * N + n
  const Element *q, *k, *v, *dout, *bias;
  const uint8_t* mask;
  const float *lse, *delta;

  CUTE_DEVICE explicit DkdvSlice(const BwdParams& p) {
    const AttentionShape& sh = p.shape;
    S = static_cast<int>(sh.seq);
    D = static_cast<int>(sh.head_dim);
    const TileCoord tc = decode_tile_coord((S + kBlockN - 1) / kBlockN, sh.heads);
    bn = tc.outer;
    h = tc.head;
    b = bn / sh.n;
    n0 = tc.tile * kBlockN;
    row_stride = sh.heads * sh.head_dim;
    base = bn * sh.seq * row_stride + h * sh.head_dim;
    q = static_cast<const Element*>(p.q) + base;
    k = static_cast<const Element*>(p.k) + base;
    v = static_cast<const Element*>(p.v) + base;
    dout = static_cast<const Element*>(p.dout) + base;
    mask = p.mask ? p.mask + bn * sh.seq : nullptr;
    bias = p.bias ? static_cast<const Element*>(p.bias) + (b * sh.heads + h) * sh.seq * sh.seq : nullptr;
    lse = p.lse + (bn * sh.heads + h) * sh.seq;
    delta = p.delta + (bn * sh.heads + h) * sh.seq;
  }
};

// What one dQ / bias-gradient CTA reads and writes: the (b, chunk of N, head) of its grid
// position, its query tile m0.., the n of its chunk, the bias plane and the chunk's fp32
// partial of the bias gradient.
template <typename Element, int kBlockM, bool kHasBias>
struct DqSlice {
  int S, D, m0;
  int64_t b, h, row_stride, n_begin, n_end;
  const Element* bias;
  float* dbias;

  CUTE_DEVICE explicit DqSlice(const BwdParams& p) {
    const AttentionShape& sh = p.shape;
    S = static_cast<int>(sh.seq);
    D = static_cast<int>(sh.head_dim);
    const TileCoord tc = decode_tile_coord((S + kBlockM - 1) / kBlockM, sh.heads);
    const int64_t chunk = tc.outer % p.n_chunks;
    b = tc.outer / p.n_chunks;
    m0 = tc.tile * kBlockM;
    h = tc.head;
    row_stride = sh.heads * sh.head_dim;
    n_begin = chunk * sh.n / p.n_chunks;
    n_end = (chunk + 1) * sh.n / p.n_chunks;
    bias = kHasBias ? static_cast<const Element*>(p.bias) + (b * sh.heads + h) * sh.seq * sh.seq : nullptr;
    dbias = kHasBias ? p.dbias_partial + ((chunk * sh.batch + b) * sh.heads + h) * sh.seq * sh.seq : nullptr;
  }
  // The offset of row 0 of (b, n, h) in q, k, v, dout and dq.
  CUTE_DEVICE int64_t offset(const AttentionShape& sh, int64_t n) const {
    return (b * sh.n + n) * sh.seq * row_stride + h * sh.head_dim;
  }
};

// The saved log-sum-exp (times log2(e)) and delta = rowsum(dO * O) of this thread's rows of a
// query tile, loaded a step before they are needed so that the loads' latency is hidden.
template <int kRows>
struct RowStats {
  float lse_log2[kRows];
  float delta[kRows];

  template <int kNWarps>
  CUTE_DEVICE void load(const float* lse, const float* delta_rows, int m0, int S,
                        AccCoords<kNWarps> const& at) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int qi = m0 + at.row(r);
      // Rows past S (and fully masked rows, whose LSE is +inf) get P = 0.
      lse_log2[r] = qi < S ? lse[qi] * kLog2e : INFINITY;
      delta[r] = qi < S ? delta_rows[qi] : 0.f;
    }
  }
};

// P = exp(s - lse) for the rows of one tile, in place in s (the logits).
template <typename STensor, int kRows>
CUTE_DEVICE void probs_from_logits(STensor& s, RowStats<kRows> const& stats) {
  static_assert(decltype(size<0>(s))::value == kRows);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int c = 0; c < decltype(size<1>(s))::value; ++c) {
      s(r, c) = exp2f(fmaf(s(r, c), kLog2e, -stats.lse_log2[r]));
    }
  }
}

// dS = P * (dP - delta) for the rows of one tile, in place in dp; p holds P.
template <typename PTensor, typename DPTensor, int kRows>
CUTE_DEVICE void dscores_from_probs(PTensor const& p, DPTensor& dp, RowStats<kRows> const& stats) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int c = 0; c < decltype(size<1>(p))::value; ++c) {
      dp(r, c) = p(r, c) * (dp(r, c) - stats.delta[r]);
    }
  }
}

// P = exp(s - lse) and dS = P * (dP - delta) for the rows of one tile, in place in s and dp.
template <typename STensor, typename DPTensor, int kRows>
CUTE_DEVICE void softmax_grad(STensor& s, DPTensor& dp, RowStats<kRows> const& stats) {
  probs_from_logits(s, stats);
  dscores_from_probs(s, dp, stats);
}

// Writes the (rows, cols) view of an fp32 accumulator tile to a shared [kBlockM, kBlockN] tile
// in the element type, two neighbouring columns (one 32-bit word) at a time.
template <typename Element, int kNWarps, typename RowCol, typename SmemTensor>
CUTE_DEVICE void store_tile_pairs(RowCol const& rc, AccCoords<kNWarps> const& at, SmemTensor& smem) {
#pragma unroll
  for (int r = 0; r < size<0>(rc); ++r) {
#pragma unroll
    for (int c = 0; c < size<1>(rc); c += 2) {
      cutlass::Array<Element, 2> pair;  // columns col and col + 1 share a 16-byte swizzle chunk
      pair[0] = static_cast<Element>(rc(r, c));
      pair[1] = static_cast<Element>(rc(r, c + 1));
      *reinterpret_cast<cutlass::Array<Element, 2>*>(&smem(at.row(r), at.col(c))) = pair;
    }
  }
}

// Writes an fp32 [rows, head dim] accumulator, given as its (rows, cols) view, times `scale` to
// rows row0.. of a [S, D] slice with `row_stride` between rows, two neighbouring head-dim values
// at a time.
// Rows whose bit in `keep` (bit j: row row0 + j) is clear are written as zeros, whatever the
// accumulator holds there (even inf or NaN).
template <int kNWarps, typename RowCol, typename Element>
CUTE_DEVICE void store_rows(RowCol const& rc, AccCoords<kNWarps> const& at, Element* out,
                            int64_t row_stride, int row0, int S, int D, float scale,
                            uint64_t keep = ~uint64_t(0)) {
#pragma unroll
  for (int r = 0; r < size<0>(rc); ++r) {
    const int row = row0 + at.row(r);
    if (row >= S) continue;
    const bool kept = (keep >> at.row(r)) & 1;
#pragma unroll
    for (int c = 0; c < size<1>(rc); c += 2) {
      const int d = at.col(c);  // d and d + 1 are both < D or both >= D (D % 8 == 0)
      if (d < D) {
        cutlass::Array<Element, 2> pair;
        pair[0] = static_cast<Element>(kept ? rc(r, c) * scale : 0.f);
        pair[1] = static_cast<Element>(kept ? rc(r, c + 1) * scale : 0.f);
        *reinterpret_cast<cutlass::Array<Element, 2>*>(out + int64_t(row) * row_stride + d) = pair;
      }
    }
  }
}

// Writes a dK/dV CTA's gradients, given as the (rows, cols) views of their fp32 accumulators:
// dK = scale * dS^T Q and dV = P^T dO for the key rows n0.. of its slice.
// keep: the CTA's keys whose rows are written as computed (bit j: key n0 + j); the others are
// written as zeros (see the sm90 dK/dV kernel, which leaves masked keys' rows unmasked).
template <typename Element, int kBlockN, int kNWarps, typename RowColK, typename RowColV>
CUTE_DEVICE void store_dk_dv(RowColK const& dk, RowColV const& dv, AccCoords<kNWarps> const& at,
                             const BwdParams& p, const DkdvSlice<Element, kBlockN>& slice,
                             uint64_t keep = ~uint64_t(0)) {
  store_rows(dk, at, static_cast<Element*>(p.dk) + slice.base, slice.row_stride, slice.n0, slice.S,
             slice.D, p.scale, keep);
  store_rows(dv, at, static_cast<Element*>(p.dv) + slice.base, slice.row_stride, slice.n0, slice.S,
             slice.D, 1.f, keep);
}

// partial[m0.., n0..] = (first ? 0 : old) + db for this thread's elements of a tile, where old
// is the staged copy of the partial tile (use_staged) or the partial itself. Whole tiles of an
// even S take two neighbouring columns (8 bytes) at a time and skip the bounds checks.
template <int kBlockM, int kBlockN, int kStride, int kNWarps, typename RowCol>
CUTE_DEVICE void accumulate_partial(RowCol const& db, AccCoords<kNWarps> const& at, float* partial,
                                    const float* staged, bool first, bool use_staged, int m0, int n0,
                                    int S) {
  if (m0 + kBlockM <= S && n0 + kBlockN <= S && S % 2 == 0) {
#pragma unroll
    for (int r = 0; r < size<0>(db); ++r) {
      const int row = at.row(r);
      float* out = partial + int64_t(m0 + row) * S + n0;
#pragma unroll
      for (int c = 0; c < size<1>(db); c += 2) {
        const int col = at.col(c);
        float2 old = make_float2(0.f, 0.f);
        if (!first) {
          old = use_staged ? *reinterpret_cast<const float2*>(staged + row * kStride + col)
                           : *reinterpret_cast<const float2*>(out + col);
        }
        *reinterpret_cast<float2*>(out + col) = make_float2(old.x + db(r, c), old.y + db(r, c + 1));
      }
    }
    return;
  }
#pragma unroll
  for (int r = 0; r < size<0>(db); ++r) {
    const int qi = m0 + at.row(r);
#pragma unroll
    for (int c = 0; c < size<1>(db); ++c) {
      const int kj = n0 + at.col(c);
      if (qi < S && kj < S) {
        const float old = first        ? 0.f
                          : use_staged ? staged[at.row(r) * kStride + at.col(c)]
                                       : partial[int64_t(qi) * S + kj];
        partial[int64_t(qi) * S + kj] = old + db(r, c);
      }
    }
  }
}

// The order in which the dQ / bias-gradient kernel visits its chunk's (n, key tile) pairs: the n
// of the chunk kGroup at a time; for each group, every key tile, and within it each n of the
// group. A step's dS tiles are summed over the group in registers before the one
// read-modify-write of the fp32 bias-gradient partial.
template <int kGroup>
struct DqSchedule {
  struct Step {
    int64_t n0;  // the group's first n
    int size, nb, sub, group, parity;  // group size, key tile, n0 + sub is the n, group index, step parity
  };
  int64_t n_begin, n_end;
  int n_blocks;

  CUTE_HOST_DEVICE static int group_size(int64_t left) {
    return left < kGroup ? static_cast<int>(left) : kGroup;
  }
  CUTE_HOST_DEVICE Step first() const { return Step{n_begin, group_size(n_end - n_begin), 0, 0, 0, 0}; }
  CUTE_HOST_DEVICE Step advance(Step st) const {
    st.parity ^= 1;
    if (++st.sub < st.size) return st;
    st.sub = 0;
    if (++st.nb < n_blocks) return st;
    st.nb = 0;
    st.n0 += st.size;
    st.size = group_size(n_end - st.n0);
    ++st.group;
    return st;
  }
  // A step's partial tile may be prefetched a step early unless the step before wrote that very
  // tile (one key tile and a group of one n: consecutive read-modify-writes of one tile).
  CUTE_HOST_DEVICE bool staged_rmw(const Step& st) const { return n_blocks > 1 || st.size > 1; }
  // Whether step st's loads include the partial tile its read-modify-write will read.
  CUTE_HOST_DEVICE bool stages_partial(const Step& st) const {
    return st.sub + 1 == st.size && st.n0 != n_begin && staged_rmw(st);
  }
};

template <typename Element>
__global__ void reduce_dbias_kernel(const float* partial, int64_t n_chunks, int64_t count,
                                    Element* dbias) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    float sum = 0.f;
    for (int64_t c = 0; c < n_chunks; ++c) sum += partial[c * count + i];
    dbias[i] = static_cast<Element>(sum);
  }
}


// Launches the bias gradient's reduction over the chunks' partials (nothing without a bias).
template <typename Element>
cudaError_t launch_reduce_dbias(const BwdParams& p, cudaStream_t stream) {
  if (p.bias == nullptr) return cudaSuccess;
  const AttentionShape& sh = p.shape;
  const int64_t count = sh.batch * sh.heads * sh.seq * sh.seq;
  const int64_t blocks = (count + 255) / 256 < 65536 ? (count + 255) / 256 : 65536;
  reduce_dbias_kernel<Element><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      p.dbias_partial, p.n_chunks, count, static_cast<Element*>(p.dbias));
  return cudaGetLastError();
}

}  // namespace jevo
