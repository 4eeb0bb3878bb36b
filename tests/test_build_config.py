"""The build configuration: pyproject's metadata and extras, the build backend's decision whether
to build CUDA, the CMake helpers (architectures, stable header copies), and cuda_status's
reasons, each of which names a fix. None of it compiles anything."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import time

import pytest

try:
  import tomllib
except ImportError:  # Python 3.10
  tomllib = pytest.importorskip("tomli")

from jevo import _cuda_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "cuda" / "packaging"


def _pyproject():
  with open(ROOT / "pyproject.toml", "rb") as f:
    return tomllib.load(f)


def _backend():
  spec = importlib.util.spec_from_file_location("jevo_build_backend",
                                                PACKAGING / "jevo_build_backend.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_extras():
  extras = _pyproject()["project"]["optional-dependencies"]
  assert extras["bench"] == ["matplotlib"]
  assert extras["peers"] == ["colabfold-kernels", "cuequivariance-jax",
                             "cuequivariance-ops-jax-cu13", "matplotlib"]
  assert any(r.startswith("jax[cuda13]") for r in extras["cuda13"])
  assert any(r.startswith("jax[cuda12]") for r in extras["cuda12"])
  assert "pytest>=7" in extras["test"]


def test_metadata():
  project = _pyproject()["project"]
  assert project["authors"] == [{"name": "jevo developers"}]
  assert project["license"] == "Apache-2.0"
  assert project["license-files"] == ["LICENSE"]
  assert project["urls"]
  assert any(c.startswith("Environment :: GPU :: NVIDIA CUDA") for c in project["classifiers"])


def test_build_system_uses_the_in_tree_backend():
  pyproject = _pyproject()
  system = pyproject["build-system"]
  assert system["build-backend"] == "jevo_build_backend"
  assert (ROOT / system["backend-path"][0] / "jevo_build_backend.py").is_file()
  # The CUDA build's own requirements are added only when it runs.
  assert not any("cutlass" in r or "jaxlib" in r for r in system["requires"])
  cuda = pyproject["tool"]["jevo"]["cuda-build-requires"]
  assert {r.split(">")[0] for r in cuda} == {"pybind11", "nvidia-cutlass", "jaxlib"}


def test_readme_test_command_is_what_ci_runs():
  command = 'pip install -e ".[test]" && python -m pytest -q'
  assert command in (ROOT / "README.md").read_text().splitlines()
  assert command in (ROOT / ".ci" / "run").read_text()


def _fake_nvcc(tmp_path):
  bindir = tmp_path / "cuda" / "bin"
  bindir.mkdir(parents=True)
  nvcc = bindir / "nvcc"
  nvcc.write_text("#!/bin/sh\nexit 0\n")
  nvcc.chmod(0o755)
  return nvcc


def _fake_nvidia_smi(bindir, gpus="GPU 0: NVIDIA H200 (UUID: GPU-0)"):
  smi = bindir / "nvidia-smi"
  smi.write_text(f"#!/bin/sh\necho '{gpus}'\n")
  smi.chmod(0o755)
  return smi


def test_backend_builds_cuda_when_nvcc_and_a_gpu_are_found(tmp_path):
  backend = _backend()
  nvcc = _fake_nvcc(tmp_path)
  _fake_nvidia_smi(nvcc.parent)
  build, why = backend.cuda_build_plan({}, {"PATH": str(nvcc.parent)})
  assert build and str(nvcc) in why
  build, _ = backend.cuda_build_plan({}, {"PATH": str(nvcc.parent),
                                          "CUDA_HOME": str(nvcc.parent.parent)})
  assert build


def test_backend_skips_cuda_without_a_visible_gpu_unless_asked(tmp_path):
  backend = _backend()
  nvcc = _fake_nvcc(tmp_path)
  build, why = backend.cuda_build_plan({}, {"PATH": str(nvcc.parent)})
  assert not build and "no GPU is visible" in why and "JEVO_CUDA=1" in why
  _fake_nvidia_smi(nvcc.parent, gpus="")  # nvidia-smi present, listing no GPU
  assert not backend.cuda_build_plan({}, {"PATH": str(nvcc.parent)})[0]
  assert backend.cuda_build_plan({}, {"PATH": str(nvcc.parent), "JEVO_CUDA": "1"})[0]
  assert backend.cuda_build_plan({}, {"PATH": str(nvcc.parent), "JEVO_CUDA_ARCHS": "90a"})[0]
  assert backend.cuda_build_plan({"cmake.define.JEVO_CUDA_ARCHS": "80"},
                                 {"PATH": str(nvcc.parent)})[0]


def test_backend_skips_cuda_without_nvcc_or_when_asked(tmp_path):
  backend = _backend()
  build, why = backend.cuda_build_plan({}, {"PATH": str(tmp_path)})
  assert not build and "nvcc" in why
  nvcc_path = str(_fake_nvcc(tmp_path).parent)
  build, why = backend.cuda_build_plan({}, {"PATH": nvcc_path, "JEVO_CUDA": "0"})
  assert not build and "JEVO_CUDA=0" in why
  build, why = backend.cuda_build_plan({"cmake.define.JEVO_BUILD_CUDA": "OFF"},
                                       {"PATH": nvcc_path})
  assert not build and "JEVO_BUILD_CUDA=OFF" in why
  # Asked for explicitly: CMake runs (and stops with an error that says nvcc is missing).
  build, _ = backend.cuda_build_plan({}, {"PATH": str(tmp_path / "none"), "JEVO_CUDA": "1"})
  assert build


def test_backend_makes_a_pure_wheel_without_cuda(tmp_path, monkeypatch):
  backend = _backend()
  monkeypatch.setenv("PATH", str(tmp_path))
  monkeypatch.delenv("CUDACXX", raising=False)
  for var in ("CUDA_PATH", "CUDA_HOME", "CUDAToolkit_ROOT"):
    monkeypatch.delenv(var, raising=False)
  settings, build = backend._prepare({}, announce=False)
  assert not build
  assert settings["wheel.cmake"] == "false" and settings["wheel.platlib"] == "false"
  if importlib.util.find_spec("scikit_build_core") is not None:
    assert not any("cutlass" in r for r in backend.get_requires_for_build_wheel({}))


def test_backend_notify_respects_pip_verbosity():
  backend = _backend()
  assert backend._frontend_shows_output(["pip", "install", "-v", "."], {})
  assert backend._frontend_shows_output(["pip", "install", "-qq", "."], {})
  assert backend._frontend_shows_output(["pip", "install", "."], {"PIP_VERBOSE": "1"})
  assert not backend._frontend_shows_output(["pip", "install", "-e", ".[test]"], {})
  assert backend.notify_target({"JEVO_BUILD_NOTIFY": ""}) == ""


def _cmake(*args):
  cmake = shutil.which("cmake")
  if cmake is None:
    pytest.skip("cmake is not installed")
  result = subprocess.run([cmake, *args, "-P", str(PACKAGING / "jevo.cmake")],
                          capture_output=True, text=True, check=True)
  return result.stderr.strip()


def test_cmake_architectures_of_visible_gpus():
  assert _cmake("-DJEVO_ACTION=archs", "-DCAPS=9.0;8.6;7.5;9.0;10.0") == \
      "90a-real;86-real;100-real"
  assert _cmake("-DJEVO_ACTION=archs", "-DCAPS=") == ""


def test_cmake_architectures_given_by_the_user():
  assert _cmake("-DJEVO_ACTION=normalize", "-DSPEC=sm_80, 9.0a 86-virtual native") == \
      "80-real;90a-real;86-virtual;native"
  assert _cmake("-DJEVO_ACTION=normalize", "-DSPEC=80;90a") == "80-real;90a-real"


def test_cmake_stages_headers_keeping_unchanged_files_untouched(tmp_path):
  src, dst = tmp_path / "src", tmp_path / "dst"
  (src / "cute" / "arch").mkdir(parents=True)
  (src / "cute" / "arch" / "mma.hpp").write_text("mma\n")
  (src / "cutlass.h").write_text("v1\n")
  _cmake("-DJEVO_ACTION=stage", f"-DSRC={src}", f"-DDST={dst}")
  assert (dst / "cute" / "arch" / "mma.hpp").read_text() == "mma\n"
  old = time.time() - 3600
  for f in (dst / "cute" / "arch" / "mma.hpp", dst / "cutlass.h"):
    os.utime(f, (old, old))
  # A new build environment: same contents, new files (new mtimes); one header changed, one gone.
  (src / "cute" / "arch" / "mma.hpp").write_text("mma\n")
  (src / "cutlass.h").write_text("v2\n")
  (dst / "stale.h").write_text("gone upstream\n")
  _cmake("-DJEVO_ACTION=stage", f"-DSRC={src}", f"-DDST={dst}")
  assert os.stat(dst / "cute" / "arch" / "mma.hpp").st_mtime == pytest.approx(old)
  assert (dst / "cutlass.h").read_text() == "v2\n"
  assert os.stat(dst / "cutlass.h").st_mtime > old + 60
  assert not (dst / "stale.h").exists()


def _progress_state(tmp_path, total: int, kernels: int, seconds_ago: int = 0, **lists):
  """The progress script's state directory: file counts, a start time, and list files (a line
  per file started or finished)."""
  if shutil.which("sh") is None:
    pytest.skip("no sh")
  state = tmp_path / "state"
  state.mkdir()
  (state / "total").write_text(f"{total}\n")
  (state / "kernels").write_text(f"{kernels}\n")
  (state / "start").write_text(f"{int(time.time()) - seconds_ago}\n")
  for name, lines in lists.items():
    (state / name).write_text("x\n" * lines)
  return state


def test_progress_script_says_and_runs_the_command(tmp_path):
  state = _progress_state(tmp_path, 2, 1)
  notify = tmp_path / "notify.log"
  env = dict(os.environ, JEVO_BUILD_NOTIFY=str(notify))
  out = tmp_path / "out.o"
  rc = subprocess.run(["sh", str(PACKAGING / "progress.sh"), "compile", str(state), "sh", "-c",
                       f"touch {out}", "-c", "/x/cuda/kernels/fwd_bf16_d64.cu"], env=env).returncode
  assert rc == 0 and out.exists()
  assert "jevo: [1/2] compiling kernels/fwd_bf16_d64.cu" in notify.read_text()
  rc = subprocess.run(["sh", str(PACKAGING / "progress.sh"), "compile", str(state), "false",
                       "-c", "/x/cuda/binding.cc"], env=env).returncode
  assert rc == 1
  assert "compiling binding.cc failed" in notify.read_text()


# --- cuda_status: every reason names a fix ------------------------------------------------------

def test_status_reason_names_a_fix_here():
  status = _cuda_lib.cuda_status()
  if status.available:
    pytest.skip("the CUDA kernels are available here")
  assert "pip install" in status.reason or "unset" in status.reason or "xla_chunked" in status.reason


def test_not_built_reasons():
  missing = ModuleNotFoundError("No module named 'jevo._jevo_cuda'", name="jevo._jevo_cuda")
  reason = _cuda_lib.not_built_reason(missing, pure_wheel=True, nvcc=None)
  assert "without its CUDA library" in reason and "nvcc" in reason and "pip install" in reason
  reason = _cuda_lib.not_built_reason(missing, pure_wheel=False, nvcc=None)
  assert "not built" in reason and "Fix: " in reason
  reason = _cuda_lib.not_built_reason(missing, pure_wheel=False, nvcc="/usr/local/bin/nvcc")
  assert "/usr/local/bin/nvcc" in reason and "pip install -e ." in reason
  reason = _cuda_lib.not_built_reason(ImportError("undefined symbol: foo"))
  assert "cannot be loaded" in reason and "--force-reinstall" in reason
  reason = _cuda_lib.not_built_reason(ImportError("nope"), library_env="/x/_jevo_cuda.so")
  assert "JEVO_CUDA_LIBRARY" in reason and "unset" in reason


def test_no_device_reasons():
  reason = _cuda_lib.no_device_reason(["cpu"], plugin_installed=False)
  assert 'pip install -U "jax[cuda13]"' in reason and "jax[cuda12]" in reason
  assert ".[cuda13]" in reason
  reason = _cuda_lib.no_device_reason(["cpu"], plugin_installed=True)
  assert "nvidia-smi" in reason and "driver" in reason
  reason = _cuda_lib.no_device_reason(["cpu"], plugin_installed=True, jax_platforms="cpu")
  assert "JAX_PLATFORMS" in reason
  reason = _cuda_lib.no_device_reason(["cpu"], plugin_installed=True, cuda_visible_devices="")
  assert "CUDA_VISIBLE_DEVICES" in reason


@pytest.mark.parametrize("archs,caps,runs", [
    ("80-real,90a-real", ["9.0"], True),
    ("80-real,90a-real", ["8.0", "8.6", "8.9"], True),
    ("80-real,90a-real", ["10.0"], False),
    ("90a-real", ["8.0"], False),
    ("90a-real", ["9.0"], True),
    ("80", ["12.0"], True),  # PTX for sm_80, JIT-compiled
    ("native", ["12.0"], True),
])
def test_architecture_coverage(archs, caps, runs):
  reason = _cuda_lib.unsupported_device_reason(archs, caps)
  assert (reason is None) == runs
  if reason is not None:
    assert "JEVO_CUDA_ARCHS=" in reason and "pip install" in reason


def test_old_gpu_reason():
  reason = _cuda_lib.unsupported_device_reason("80-real,90a-real", ["7.5"])
  assert "8.0" in reason and "xla_chunked" in reason


def test_progress_script_estimates_the_time_left(tmp_path):
  state = _progress_state(tmp_path, 4, 4, seconds_ago=100, started=3, started_kernels=3,
                          finished=2, finished_kernels=2)
  notify = tmp_path / "notify.log"
  env = dict(os.environ, JEVO_BUILD_NOTIFY=str(notify))
  subprocess.run(["sh", str(PACKAGING / "progress.sh"), "compile", str(state), "true", "-c",
                  "/x/cuda/kernels/bwd_bf16_d64.cu"], env=env, check=True)
  text = notify.read_text()
  # 2 of 4 kernel files done and 2 being compiled (counted as half done): 6 of 8 halves.
  assert "[4/4] compiling kernels/bwd_bf16_d64.cu, 2 done in 1m4" in text
  assert "about 0m3" in text and "left" in text
