"""Finds the compiled CUDA library once, at import, and registers its FFI targets with XLA.

`cuda_status()` says whether jevo's CUDA kernels can run here and, if not, why.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os

import jax

# A library built elsewhere (for example by Bazel) can be named explicitly; read once, at import.
LIBRARY_ENV = "JEVO_CUDA_LIBRARY"

# The XLA FFI targets of the attention kernels, as cuda/binding.cc registers them.
FORWARD_TARGET = "jevo_attention_fwd"
BACKWARD_TARGET = "jevo_attention_bwd"


@dataclasses.dataclass(frozen=True)
class CudaStatus:
  """Whether jevo's CUDA kernels are usable in this process."""

  available: bool
  reason: str
  library: str | None = None
  architectures: str | None = None

  def __bool__(self) -> bool:
    return self.available


def _load_module():
  path = os.environ.get(LIBRARY_ENV)
  if path:
    spec = importlib.util.spec_from_file_location("jevo._jevo_cuda", path)
    if spec is None or spec.loader is None:
      raise ImportError(f"{LIBRARY_ENV}={path!r} is not a loadable Python extension")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  return importlib.import_module("jevo._jevo_cuda")


def _register() -> tuple[CudaStatus, frozenset[str]]:
  try:
    module = _load_module()
  except ImportError as err:
    return CudaStatus(False, f"the CUDA library was not built or cannot be loaded ({err}); "
                      "reinstall with a CUDA toolkit (nvcc) on PATH"), frozenset()
  names = []
  for name, capsule in module.registrations().items():
    jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    names.append(name)
  library = getattr(module, "__file__", None)
  archs = getattr(module, "cuda_architectures", None)
  return CudaStatus(True, "the CUDA library is loaded", library, archs), frozenset(names)


_LIBRARY_STATUS, REGISTERED_TARGETS = _register()


def _has_cuda_device() -> bool:
  try:
    return any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    return False


def cuda_status() -> CudaStatus:
  """Reports whether the CUDA kernels can run: library built and loaded, and a CUDA device present."""
  if not _LIBRARY_STATUS.available:
    return _LIBRARY_STATUS
  if not _has_cuda_device():
    return dataclasses.replace(_LIBRARY_STATUS, available=False,
                               reason="the CUDA library is loaded but JAX sees no CUDA device "
                               f"(devices: {[d.platform for d in jax.devices()]})")
  return _LIBRARY_STATUS
