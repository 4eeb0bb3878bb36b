// The Python module jevo._jevo_cuda: hands each FFI handler to Python as a PyCapsule, to be
// registered with jax.ffi.register_ffi_target(name, capsule, platform="CUDA").
#include <pybind11/pybind11.h>

#include "handlers/registry.h"
#include "kernels/families.h"


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
  // The kernel families (cuda/kernels/generate.py): which were built, what each implements,
  // the compute capabilities it runs on and the tile sizes that callers size work by.
  m.def("families", []() {
    py::list out;
    for (const jevo::FamilyInfo& f : jevo::kFamilies) {
      py::dict d;
      d["name"] = f.name;
      d["value"] = static_cast<int>(f.arch);
      d["cuda_arch"] = f.cuda_arch;
      d["built"] = f.built;
      d["min_major"] = f.min_major;
      d["max_major"] = f.max_major;
      py::list directions;
      if (f.fwd) directions.append("fwd");
      if (f.bwd) directions.append("bwd");
      d["directions"] = directions;
      d["block_m"] = f.block_m;
      d["block_n"] = f.block_n;
      out.append(d);
    }
    return out;
  });
}
