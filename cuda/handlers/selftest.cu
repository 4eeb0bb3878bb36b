// jevo_selftest: out = alpha * x + y on XLA's stream. A deliberately small handler that proves
// the whole path (build, registration, launch on XLA's stream, errors as ffi::Error) and that
// the tests use to check that the library works.
#include "ffi_helpers.h"
#include "handlers/registry.h"

namespace jevo {
namespace {

__global__ void AxpyKernel(int64_t n, float alpha, const float* x, const float* y, float* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = alpha * x[i] + y[i];
  }
}

ffi::Error SelftestImpl(cudaStream_t stream, float alpha, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> out) {
  if (x.element_count() != y.element_count()) {
    return ffi::Error::InvalidArgument("jevo_selftest: x and y must have the same size, got " +
                                       std::to_string(x.element_count()) + " and " +
                                       std::to_string(y.element_count()));
  }
  int64_t n = static_cast<int64_t>(x.element_count());
  if (n == 0) return ffi::Error::Success();
  int blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 4096));
  AxpyKernel<<<blocks, 256, 0, stream>>>(n, alpha, x.typed_data(), y.typed_data(), out->typed_data());
  return LastLaunchError("jevo_selftest launch");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JevoSelftest, SelftestImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Attr<float>("alpha")
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>(),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jevo
