"""Prints where the build finds its Python-side inputs, one `key=value` per line.

Run by the repository rule in cuda_configure.bzl with the Python interpreter the build uses, so the
headers come from the same environment that will import the library (as CMake does in
cuda/CMakeLists.txt). Exits 1 after listing everything that is missing.
"""

import os
import sys
import sysconfig

found = {}
missing = []


def _check(key, directory, header, hint, what):
  if directory and os.path.isfile(os.path.join(directory, header)):
    found[key] = directory
  elif directory:
    missing.append(f"{what}: {header} not found in {directory}; {hint}")
  else:
    missing.append(f"{what}: not installed; {hint}")


# XLA FFI headers of the installed jaxlib; older jax has no jax.ffi.include_dir(), the same
# fallback as cuda/CMakeLists.txt.
ffi_dir = None
try:
  import jax

  ffi_dir = jax.ffi.include_dir()
except Exception:  # noqa: BLE001 -- any failure here is reported through the check below.
  try:
    import jaxlib

    ffi_dir = os.path.join(os.path.dirname(jaxlib.__file__), "include")
  except ImportError:
    pass
_check("ffi_include", ffi_dir, "xla/ffi/api/ffi.h", "pip install jax", "XLA FFI headers (jaxlib)")

# CUTLASS/CuTe headers of the nvidia-cutlass wheel.
cutlass_dir = None
try:
  import cutlass_library

  cutlass_dir = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
except ImportError:
  pass
_check("cutlass_include", cutlass_dir, "cute/tensor.hpp", "pip install nvidia-cutlass",
       "CUTLASS headers (nvidia-cutlass)")

pybind11_dir = None
try:
  import pybind11

  pybind11_dir = pybind11.get_include()
except ImportError:
  pass
_check("pybind11_include", pybind11_dir, "pybind11/pybind11.h", "pip install pybind11", "pybind11")

_check("python_include", sysconfig.get_paths().get("include"), "Python.h",
       "install the Python development headers (Debian: python3-dev)", "Python headers")

found["python"] = sys.executable
found["python_version"] = ".".join(map(str, sys.version_info[:3]))

for key, value in sorted(found.items()):
  print(f"{key}={value}")
if missing:
  print(f"with the Python interpreter {sys.executable}:", file=sys.stderr)
  for line in missing:
    print(f"  {line}", file=sys.stderr)
  sys.exit(1)
