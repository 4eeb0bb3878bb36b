// Host entry points of the attention kernels, one explicit instantiation per (architecture
// family, element type, padded head dim) in cuda/kernels/<family>/*.cu, written by
// cuda/kernels/generate.py.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "attention/params.h"
#include "attention/tiles.h"

namespace jevo {

// The forward's residual output is a compile-time choice of its kernel: run(std::true_type{})
// launches the kernel that writes it (p.o_residual set), run(std::false_type{}) the other.
template <typename Run>
cudaError_t with_residual_choice(const FwdParams& p, Run&& run) {
  return p.o_residual != nullptr ? run(std::true_type{}) : run(std::false_type{});
}

// Launches `kernel` on a one-dimensional grid with `smem_bytes` of dynamic shared memory, opting
// in to more than the default 48 KiB where it needs it.
template <typename Kernel, typename... Args>
cudaError_t launch_kernel(Kernel kernel, dim3 grid, int threads, int smem_bytes, cudaStream_t stream,
                          const Args&... args) {
  if (smem_bytes > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, smem_bytes, stream>>>(args...);
  return cudaGetLastError();
}

template <Arch kArch, typename Element, int kHeadDim>
cudaError_t run_attention_fwd(const FwdParams& p, cudaStream_t stream);

template <Arch kArch, typename Element, int kHeadDim>
cudaError_t run_attention_bwd(const BwdParams& p, cudaStream_t stream);

}  // namespace jevo
