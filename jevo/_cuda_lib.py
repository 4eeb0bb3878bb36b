"""Finds the compiled CUDA library once, at import, and registers its FFI targets with XLA.

`cuda_status()` says whether jevo's CUDA kernels can run here and, if not, why, and what to do
about it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import os
import shutil

import jax

# A library built elsewhere (for example by Bazel) can be named explicitly; read once, at import.
LIBRARY_ENV = "JEVO_CUDA_LIBRARY"

# The XLA FFI targets of the attention kernels, as cuda/binding.cc registers them.
FORWARD_TARGET = "jevo_attention_fwd"
BACKWARD_TARGET = "jevo_attention_bwd"

# The fixes that the reasons below name.
INSTALL_CUDA_JAX = ('install a CUDA-enabled jax: pip install -U "jax[cuda13]" (NVIDIA driver 580 '
                    'or newer; "jax[cuda12]" for older drivers), or with jevo\'s extra: '
                    'pip install "jevo[cuda13]" (in a source tree: pip install -e ".[cuda13]")')
REBUILD_WITH_NVCC = ("reinstall jevo on a machine with the CUDA toolkit (nvcc 12 or 13 on PATH, "
                     "or CUDACXX naming it): pip install -e . from the source tree, which "
                     "compiles the kernels; or install a binary wheel of jevo")


@dataclasses.dataclass(frozen=True)
class CudaStatus:
  """Whether jevo's CUDA kernels are usable in this process; `reason` says why not, and the fix."""

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


def _installed_as_pure_wheel() -> bool:
  """Whether this jevo was installed from a pure-Python wheel (built without the CUDA library)."""
  try:
    wheel = importlib.metadata.distribution("jevo").read_text("WHEEL") or ""
  except importlib.metadata.PackageNotFoundError:
    return False
  return "Root-Is-Purelib: true" in wheel


def not_built_reason(err: ImportError, *, library_env: str | None = None,
                     pure_wheel: bool | None = None, nvcc: str | None = None) -> str:
  """Why the library could not be imported, with the fix."""
  if library_env:
    return (f"{LIBRARY_ENV}={library_env!r} cannot be loaded ({err}); point it at a built "
            "_jevo_cuda*.so (for example bazel-bin/_jevo_cuda.so) or unset it to use the "
            "installed library")
  missing = isinstance(err, ModuleNotFoundError) and err.name in ("jevo._jevo_cuda", None)
  if not missing:
    return (f"the CUDA library is installed but cannot be loaded ({err}); rebuild it in this "
            "environment: pip install -e . --force-reinstall --no-deps (from the source tree)")
  if pure_wheel:
    what = "jevo was installed without its CUDA library, as a pure-Python package"
  else:
    what = "the CUDA library was not built (there is no jevo/_jevo_cuda*.so)"
  if nvcc:
    return (f"{what}. nvcc is on PATH now ({nvcc}), so a reinstall builds it: pip install -e . "
            "from the source tree, with JEVO_CUDA unset")
  return f"{what}, as no nvcc was found at install (nor is one on PATH now). Fix: {REBUILD_WITH_NVCC}"


@dataclasses.dataclass(frozen=True)
class KernelFamily:
  """One architecture family of kernels in the library (cuda/kernels/generate.py's FAMILIES)."""

  name: str              # "sm80", "sm90"
  value: int             # what the FFI calls' `family` attribute takes to ask for it
  cuda_arch: str         # what its sources are compiled for ("80", "90a")
  built: bool            # whether this library holds its kernels
  min_major: int         # the compute capabilities (major) it runs on
  max_major: int
  directions: tuple[str, ...]  # "fwd", "bwd": what it implements (the rest falls back to sm80)
  block_m: int           # query rows per tile
  block_n: int           # key rows per tile

  def runs_on(self, compute_capability: str) -> bool:
    """Whether this family's kernels run on a device of this compute capability ("9.0")."""
    try:
      major = int(str(compute_capability).split(".")[0])
    except ValueError:
      return False
    return self.built and self.min_major <= major <= self.max_major


def _families(module) -> tuple[KernelFamily, ...]:
  if not hasattr(module, "families"):
    return ()
  return tuple(KernelFamily(name=f["name"], value=int(f["value"]), cuda_arch=f["cuda_arch"],
                            built=bool(f["built"]), min_major=int(f["min_major"]),
                            max_major=int(f["max_major"]), directions=tuple(f["directions"]),
                            block_m=int(f["block_m"]), block_n=int(f["block_n"]))
               for f in module.families())


def _register() -> tuple[CudaStatus, frozenset[str], tuple[KernelFamily, ...]]:
  try:
    module = _load_module()
  except ImportError as err:
    reason = not_built_reason(err, library_env=os.environ.get(LIBRARY_ENV),
                              pure_wheel=_installed_as_pure_wheel(), nvcc=shutil.which("nvcc"))
    return CudaStatus(False, reason), frozenset(), ()
  names = []
  for name, capsule in module.registrations().items():
    jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    names.append(name)
  library = getattr(module, "__file__", None)
  archs = getattr(module, "cuda_architectures", None)
  return (CudaStatus(True, "the CUDA library is loaded", library, archs), frozenset(names),
          _families(module))


_LIBRARY_STATUS, REGISTERED_TARGETS, _FAMILIES = _register()


def kernel_families() -> tuple[KernelFamily, ...]:
  """The kernel families of the loaded library, oldest first (empty without the library)."""
  return _FAMILIES


def kernel_family(name: str) -> KernelFamily | None:
  """The family called `name` ("sm80", "sm90"), or None when the library has no such family."""
  return next((f for f in _FAMILIES if f.name == name), None)


def _cuda_devices():
  try:
    return [d for d in jax.devices() if d.platform == "gpu"]
  except RuntimeError:
    return []


def _has_cuda_device() -> bool:
  return bool(_cuda_devices())


def _jax_cuda_plugin_installed() -> bool:
  for name in ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_plugins.xla_cuda13",
               "jax_plugins.xla_cuda12"):
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except (ImportError, ValueError):
      continue
  return False


def no_device_reason(platforms: list[str], *, plugin_installed: bool,
                     jax_platforms: str | None = None,
                     cuda_visible_devices: str | None = None) -> str:
  """Why JAX sees no CUDA device, with the fix."""
  head = f"the CUDA library is loaded but JAX sees no CUDA device (devices: {platforms})"
  if jax_platforms and "cuda" not in jax_platforms and "gpu" not in jax_platforms:
    return f"{head}: JAX_PLATFORMS={jax_platforms!r} leaves CUDA out; unset it or add cuda"
  if cuda_visible_devices is not None and cuda_visible_devices.strip() in ("", "-1"):
    return (f"{head}: CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} hides every GPU; unset it "
            "or name the GPUs to use")
  if not plugin_installed:
    return f"{head}: this jax runs on the CPU only; {INSTALL_CUDA_JAX}"
  return (f"{head}, although jax's CUDA plugin is installed: check that `nvidia-smi` shows a GPU "
          "and that the NVIDIA driver is new enough for the plugin (580 or newer for "
          'jax[cuda13], else use "jax[cuda12]"); JAX\'s own warning at start-up says more')


def _arch_runs_on(arch: str, major: int, minor: int) -> bool | None:
  """Whether code for CMake architecture `arch` ("80-real", "90a-real", "86") runs on a device
  of compute capability major.minor; None when it cannot tell ("native", "all")."""
  base, _, kind = arch.strip().partition("-")
  digits = "".join(c for c in base if c.isdigit())
  suffix = base[len(digits):]
  if not digits or len(digits) < 2 or suffix not in ("", "a", "f"):
    return None
  a_major, a_minor = int(digits[:-1]), int(digits[-1])
  if suffix == "a":  # architecture-specific: that exact device only
    return (a_major, a_minor) == (major, minor)
  if kind in ("", "virtual"):  # PTX: JIT-compiled for any newer device
    if (major, minor) >= (a_major, a_minor):
      return True
  return a_major == major and minor >= a_minor  # SASS: same major, same or newer minor


def unsupported_device_reason(architectures: str | None, capabilities: list[str]) -> str | None:
  """Why the loaded library's code cannot run on these devices (compute capabilities "9.0"),
  with the fix; None when it can (or when that cannot be told)."""
  if not architectures:
    return None
  archs = [a for a in architectures.replace(";", ",").split(",") if a.strip()]
  bad = []
  for cap in sorted(set(capabilities)):
    try:
      major, minor = (int(x) for x in cap.split("."))
    except ValueError:
      continue
    runs = [_arch_runs_on(a, major, minor) for a in archs]
    if None in runs:
      return None
    if not any(runs):
      bad.append((cap, major, minor))
  if not bad:
    return None
  caps = ", ".join(c for c, _, _ in bad)
  if all(major < 8 for _, major, _ in bad):
    return (f"the GPU (compute capability {caps}) is older than the kernels support (8.0, "
            "Ampere, or newer); use implementation='xla_chunked' there")
  wanted = ";".join(f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
                    for _, major, minor in bad if major >= 8)
  return (f"the CUDA library was built for {architectures}, which cannot run on this GPU "
          f"(compute capability {caps}); rebuild for it: JEVO_CUDA_ARCHS=\"{wanted}\" pip "
          "install -e . (from the source tree; by default the build targets the GPUs it sees)")


def cuda_status() -> CudaStatus:
  """Reports whether the CUDA kernels can run: library built and loaded, a CUDA device present,
  and the library built for that device. When not, `reason` says why and how to fix it."""
  if not _LIBRARY_STATUS.available:
    return _LIBRARY_STATUS
  devices = _cuda_devices()
  if not devices:
    try:
      platforms = [d.platform for d in jax.devices()]
    except RuntimeError:
      platforms = []
    reason = no_device_reason(platforms, plugin_installed=_jax_cuda_plugin_installed(),
                              jax_platforms=os.environ.get("JAX_PLATFORMS"),
                              cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    return dataclasses.replace(_LIBRARY_STATUS, available=False, reason=reason)
  caps = [c for c in (getattr(d, "compute_capability", None) for d in devices) if c]
  reason = unsupported_device_reason(_LIBRARY_STATUS.architectures, caps)
  if reason is not None:
    return dataclasses.replace(_LIBRARY_STATUS, available=False, reason=reason)
  return _LIBRARY_STATUS
