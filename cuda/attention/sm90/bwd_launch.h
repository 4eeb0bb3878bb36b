// Launches the sm_90a backward: the dK/dV kernel, the dQ / bias-gradient kernel and the bias
// gradient's reduction (the sm80 family's), with their shared-memory sizes and grids, which are
// those of the sm80 backward.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

#include "attention/sm90/bwd_kernel.h"

namespace jevo {
namespace sm90 {

template <typename Kernel>
cudaError_t allow_shared_memory(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <typename Traits, int kGroup, bool kHasBias>
cudaError_t launch_dq(const BwdParams& p, unsigned m_tiles, cudaStream_t stream) {
  constexpr int kSmem = int(sizeof(DqSmem<Traits, kGroup, kHasBias>));
  auto dq = attention_bwd_dq_kernel<Traits, kGroup, kHasBias>;
  cudaError_t err = allow_shared_memory(dq, kSmem);
  if (err != cudaSuccess) return err;
  dq<<<tile_grid(m_tiles, p.shape.heads, p.shape.batch * p.n_chunks), Traits::kNThreads, kSmem,
       stream>>>(p);
  return cudaGetLastError();
}

template <typename Traits>
cudaError_t launch_bwd(const BwdParams& p, cudaStream_t stream) {
  using Element = typename Traits::Element;
  const AttentionShape& sh = p.shape;
  const unsigned m_tiles = static_cast<unsigned>((sh.seq + Traits::kBlockM - 1) / Traits::kBlockM);
  const unsigned n_tiles = static_cast<unsigned>((sh.seq + Traits::kBlockN - 1) / Traits::kBlockN);

  constexpr int kSmemDkdv = int(sizeof(DkdvSmem<Traits>));
  auto dkdv = attention_bwd_dkdv_kernel<Traits>;
  cudaError_t err = allow_shared_memory(dkdv, kSmemDkdv);
  if (err != cudaSuccess) return err;
  dkdv<<<tile_grid(n_tiles, sh.heads, sh.batch * sh.n), Traits::kNThreads, kSmemDkdv, stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  err = p.bias ? launch_dq<Traits, Traits::kDqGroup, true>(p, m_tiles, stream)
               : launch_dq<Traits, 1, false>(p, m_tiles, stream);
  if (err != cudaSuccess || p.bias == nullptr) return err;

  const int64_t count = sh.batch * sh.heads * sh.seq * sh.seq;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((count + 255) / 256, 65536));
  reduce_dbias_kernel<Element><<<blocks, 256, 0, stream>>>(
      p.dbias_partial, p.n_chunks, count, static_cast<Element*>(p.dbias));
  return cudaGetLastError();
}

}  // namespace sm90
}  // namespace jevo
