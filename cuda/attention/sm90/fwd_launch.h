// Launches the sm_90a forward kernel: its TMA descriptors, its shared-memory size, the opt-in
// above 48 KiB and the grid (the sm80 kernel's: a CTA per (b * n, head, tile of 64 queries),
// tiles fastest).
#pragma once

#include <cuda_runtime.h>

#include "attention/launch.h"
#include "attention/sm90/fwd_kernel.h"
#include "attention/sm90/tma.h"

namespace jevo {
namespace sm90 {

// The bias's TMA descriptor needs 16-byte row strides (S % 8 == 0): the handler runs other
// shapes with a bias on the sm80 kernel (Sm90FwdSupports in handlers/attention.cu).
template <typename Traits>
cudaError_t encode_fwd_maps(const FwdParams& p, FwdTensorMaps* maps) {
  using Element = typename Traits::Element;
  const AttentionShape& sh = p.shape;
  cudaError_t err;
  if ((err = encode_activation_map<Element>(&maps->q, p.q, sh, Traits::kBlockM, Traits::kBoxD)) ||
      (err = encode_activation_map<Element>(&maps->k, p.k, sh, Traits::kBlockN, Traits::kBoxD)) ||
      (err = encode_activation_map<Element>(&maps->v, p.v, sh, Traits::kBlockN, Traits::kBoxD))) {
    return err;
  }
  return encode_optional_bias_map<Element>(&maps->bias, p.bias, sh, Traits::kBlockM,
                                           Traits::kBlockN, maps->q);
}

template <typename Traits, bool kWriteResidual>
cudaError_t launch_fwd_kernel(const FwdParams& p, const FwdTensorMaps& maps, cudaStream_t stream) {
  constexpr int kSmem = int(sizeof(FwdSmem<Traits>));
  const int64_t m_tiles = (p.shape.seq + Traits::kBlockM - 1) / Traits::kBlockM;
  return launch_kernel(attention_fwd_kernel<Traits, kWriteResidual>,
                       tile_grid(m_tiles, p.shape.heads, p.shape.batch * p.shape.n), Traits::kNThreads,
                       kSmem, stream, p, maps);
}

template <typename Traits>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  FwdTensorMaps maps;
  cudaError_t err = encode_fwd_maps<Traits>(p, &maps);
  if (err != cudaSuccess) return err;
  return with_residual_choice(p, [&](auto residual) {
    return launch_fwd_kernel<Traits, decltype(residual)::value>(p, maps, stream);
  });
}

}  // namespace sm90
}  // namespace jevo
