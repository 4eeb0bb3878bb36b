"""jevo's PEP 517 build backend: scikit-build-core, deciding first whether to build CUDA.

pyproject.toml names this module (backend-path cuda/packaging). Before handing over to
scikit-build-core it decides whether the CUDA library is built:

- not when JEVO_CUDA=0 is set or -C cmake.define.JEVO_BUILD_CUDA=OFF is given, nor when no CUDA
  compiler is found (CUDACXX, nvcc on PATH, $CUDA_PATH/bin, $CUDAToolkit_ROOT/bin,
  $CUDA_HOME/bin), nor when nvcc is found but no GPU is visible (`nvidia-smi -L`), unless
  JEVO_CUDA=1 or JEVO_CUDA_ARCHS asks for the build (a release wheel, a cluster's login node).
  The wheel is then pure Python (py3-none-any; CMake does not run) and its build environment
  needs none of the CUDA build's requirements.
- otherwise scikit-build-core runs CMake (cuda/CMakeLists.txt), and the build environment also
  gets [tool.jevo] cuda-build-requires (pybind11, nvidia-cutlass, jaxlib) from pyproject.toml.

pip shows a build backend's output only with -v. So that a user sees what the build does (or
that it builds no kernels, and why), this backend finds a place that the user sees, the
terminal (/dev/tty) or else pip's own stderr, and names it in JEVO_BUILD_NOTIFY for the CMake
build (cuda/packaging/progress.sh) to write its progress lines to. Nothing is written there when
pip shows the output anyway (-v), when pip is quiet (-q) or when JEVO_BUILD_NOTIFY is set
already (set it empty to turn this off).
"""

from __future__ import annotations

import os
import shutil
import sys


def _skbuild():
  from scikit_build_core import build

  return build

_OFF = ("0", "off", "false", "no", "n")
_ON = ("1", "on", "true", "yes", "y")
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))


def _setting(config_settings, key):
  value = (config_settings or {}).get(key)
  if isinstance(value, list):  # pip passes a repeated -C key as a list
    value = value[-1] if value else None
  return value


def find_nvcc(config_settings=None, environ=None):
  """The CUDA compiler CMake would use, or None. Looks where CMake looks, and in $CUDA_HOME."""
  environ = os.environ if environ is None else environ
  explicit = _setting(config_settings, "cmake.define.CMAKE_CUDA_COMPILER") or environ.get("CUDACXX")
  if explicit:
    return shutil.which(explicit, path=environ.get("PATH")) or (
        explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None)
  found = shutil.which("nvcc", path=environ.get("PATH", os.defpath))
  if found:
    return found
  for var in ("CUDA_PATH", "CUDAToolkit_ROOT", "CUDA_HOME"):
    root = environ.get(var)
    if root:
      candidate = os.path.join(root, "bin", "nvcc")
      if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
        return candidate
  return None


def cuda_build_plan(config_settings=None, environ=None):
  """(build, why): whether the CUDA library is built, and a sentence saying why (not)."""
  environ = os.environ if environ is None else environ
  define = _setting(config_settings, "cmake.define.JEVO_BUILD_CUDA")
  env = environ.get("JEVO_CUDA", "")
  required = False
  if define is not None and str(define).strip().lower() in _OFF:
    return False, f"-C cmake.define.JEVO_BUILD_CUDA={define} was given"
  if define is not None and str(define).strip().lower() in _ON:
    required = True
  elif env.strip().lower() in _OFF:
    return False, f"JEVO_CUDA={env} is set"
  elif env.strip().lower() in _ON:
    required = True
  nvcc = find_nvcc(config_settings, environ)
  if nvcc is None:
    if required:  # CMake stops with an error that says so
      return True, "the CUDA library was asked for, but no nvcc was found"
    hint = ""
    for root in ("/usr/local/cuda", "/opt/cuda"):
      if os.path.isfile(os.path.join(root, "bin", "nvcc")):
        hint = f" (a CUDA toolkit is in {root}: add {root}/bin to PATH)"
        break
    return False, ("no CUDA compiler (nvcc) was found on PATH or in $CUDACXX, $CUDA_PATH, "
                   "$CUDA_HOME" + hint)
  archs = environ.get("JEVO_CUDA_ARCHS") or _setting(config_settings,
                                                      "cmake.define.JEVO_CUDA_ARCHS")
  if not required and not archs and not gpu_visible(environ):
    # The kernels could not run here, and compiling them takes minutes: built only when asked
    # (a wheel for other machines, a login node of a GPU cluster).
    return False, (f"nvcc ({nvcc}) was found but no GPU is visible (nvidia-smi -L lists none); "
                   "set JEVO_CUDA=1 (or JEVO_CUDA_ARCHS) to build the CUDA library anyway")
  return True, f"nvcc: {nvcc}"


def gpu_visible(environ=None) -> bool:
  """Whether `nvidia-smi -L` (on the given PATH) lists a GPU."""
  import subprocess
  environ = os.environ if environ is None else environ
  smi = shutil.which("nvidia-smi", path=environ.get("PATH", os.defpath))
  if smi is None:
    return False
  try:
    out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return out.returncode == 0 and "GPU" in out.stdout


# --- Where the user sees messages ----------------------------------------------------------------

def _cmdline(pid):
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
  except OSError:
    return []


def _frontend_shows_output(args, environ):
  """Whether the frontend (pip) passes the build's output on, or was asked to be quiet."""
  if environ.get("PIP_VERBOSE", "0") not in ("", "0") or environ.get("PIP_QUIET", "0") not in ("", "0"):
    return True
  for a in args:
    if a in ("--verbose", "--quiet") or (a.startswith("-") and not a.startswith("--")
                                         and len(a) > 1 and set(a[1:]) <= {"v", "q"}):
      return True
  return False


def notify_target(environ=None):
  """Where messages for the user go ("" for nowhere beyond the build's own output)."""
  environ = os.environ if environ is None else environ
  if "JEVO_BUILD_NOTIFY" in environ:
    return environ["JEVO_BUILD_NOTIFY"]
  if not sys.platform.startswith("linux"):
    return ""
  try:
    if os.isatty(2):
      return ""  # the frontend passes our stderr straight to a terminal
  except OSError:
    pass
  parent = os.getppid()
  if _frontend_shows_output(_cmdline(parent), environ):
    return ""
  parent_err = f"/proc/{parent}/fd/2"
  try:
    ours, theirs = os.fstat(2), os.stat(parent_err)
    if (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino):
      return ""  # the frontend writes where we write
  except OSError:
    pass
  try:
    with open("/dev/tty", "a"):
      return "/dev/tty"
  except OSError:
    pass
  if not _safe_to_append(parent):
    return ""
  try:
    with open(parent_err, "a"):
      return parent_err
  except OSError:
    return ""


def _safe_to_append(pid):
  """Whether writing to pid's stderr from here keeps its output intact: a pipe, a terminal or a
  file it appends to. (A file opened without O_APPEND, as `>` opens it, would have our lines
  overwritten by the frontend's next write at its own offset.)"""
  import stat

  try:
    mode = os.stat(f"/proc/{pid}/fd/2").st_mode
    if not stat.S_ISREG(mode):
      return True
    with open(f"/proc/{pid}/fdinfo/2") as f:
      for line in f:
        if line.startswith("flags:"):
          return bool(int(line.split()[1], 8) & os.O_APPEND)
  except (OSError, ValueError):
    pass
  return False


def say(message, environ=None):
  environ = os.environ if environ is None else environ
  print(f"jevo: {message}", file=sys.stderr, flush=True)
  target = environ.get("JEVO_BUILD_NOTIFY", "")
  if target:
    prefix = "\r" if target == "/dev/tty" else ""
    try:
      with open(target, "a") as f:
        f.write(f"{prefix}jevo: {message}\n")
    except OSError:
      pass


# --- Settings ------------------------------------------------------------------------------------

def cuda_build_requires():
  """[tool.jevo] cuda-build-requires of pyproject.toml."""
  try:
    import tomllib
  except ImportError:  # Python 3.10: scikit-build-core depends on tomli there
    import tomli as tomllib
  with open(os.path.join(_ROOT, "pyproject.toml"), "rb") as f:
    return list(tomllib.load(f)["tool"]["jevo"]["cuda-build-requires"])


def _prepare(config_settings, *, announce):
  settings = dict(config_settings or {})
  build, why = cuda_build_plan(settings)
  if not build:
    # No CMake: a pure-Python wheel (py3-none-any).
    settings["wheel.cmake"] = "false"
    settings["wheel.platlib"] = "false"
  if announce:
    target = os.environ["JEVO_BUILD_NOTIFY"] = notify_target()
    if target == "/dev/tty":
      try:  # off pip's "Building ... (pyproject.toml) ..." line, which stays as it is
        with open(target, "a") as f:
          f.write("\n")
      except OSError:
        pass
    if not build:
      say(f"the CUDA kernels are not built: {why}. Installing the pure-JAX package: backends "
          "xla and xla_chunked, on any device (jevo.cuda_status() says why the kernels are "
          "unavailable). To build them, reinstall with nvcc on PATH (CUDA 12 or 13).")
  return settings, build


# --- PEP 517 hooks -------------------------------------------------------------------------------

def get_requires_for_build_wheel(config_settings=None):
  settings, build = _prepare(config_settings, announce=False)
  extra = cuda_build_requires() if build else []
  return list(_skbuild().get_requires_for_build_wheel(settings)) + extra


def get_requires_for_build_editable(config_settings=None):
  settings, build = _prepare(config_settings, announce=False)
  extra = cuda_build_requires() if build else []
  return list(_skbuild().get_requires_for_build_editable(settings)) + extra


def get_requires_for_build_sdist(config_settings=None):
  return list(_skbuild().get_requires_for_build_sdist(config_settings))


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
  settings, _ = _prepare(config_settings, announce=False)
  return _skbuild().prepare_metadata_for_build_wheel(metadata_directory, settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
  settings, _ = _prepare(config_settings, announce=False)
  return _skbuild().prepare_metadata_for_build_editable(metadata_directory, settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
  settings, _ = _prepare(config_settings, announce=True)
  return _skbuild().build_wheel(wheel_directory, settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
  settings, _ = _prepare(config_settings, announce=True)
  return _skbuild().build_editable(wheel_directory, settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
  return _skbuild().build_sdist(sdist_directory, config_settings)
