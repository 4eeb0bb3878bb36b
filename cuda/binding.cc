// The Python module jevo._jevo_cuda: hands each FFI handler to Python as a PyCapsule, to be
// registered with jax.ffi.register_ffi_target(name, capsule, platform="CUDA").
#include <pybind11/pybind11.h>

#include "handlers/registry.h"

namespace py = pybind11;

namespace {
template <typename T>
py::capsule Capsule(T* fn) {
  return py::capsule(reinterpret_cast<void*>(fn));
}
}  // namespace

PYBIND11_MODULE(_jevo_cuda, m) {
  m.doc() = "jevo's CUDA kernels as XLA FFI handlers";
  m.def("registrations", []() {
    py::dict targets;
    targets["jevo_selftest"] = Capsule(jevo::JevoSelftest);
    targets["jevo_attention_fwd"] = Capsule(jevo::JevoAttentionFwd);
    targets["jevo_attention_bwd"] = Capsule(jevo::JevoAttentionBwd);
    return targets;
  });
  m.attr("cuda_architectures") = JEVO_CUDA_ARCHS;
}
