"""The CMake configuration of the kernel families: the sm90 (wgmma) sources compile for the
sm_90a entries of the architecture list only, and not at all without one, while the sm80 sources
compile for every listed architecture. Configures cuda/ with CMake (a few seconds, no compile);
needs cmake, ninja and nvcc."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("cmake", "ninja", "nvcc"))
    or not (ROOT / "cuda" / "CMakeLists.txt").is_file(),
    reason="needs cmake, ninja, nvcc and the source tree")


def _configure(tmp_path, archs):
  build = tmp_path / "build"
  run = subprocess.run(
      ["cmake", "-S", str(ROOT / "cuda"), "-B", str(build), "-G", "Ninja",
       "-DJEVO_BUILD_CUDA=ON", f"-DJEVO_CUDA_ARCHS={archs}", f"-DPython_EXECUTABLE={sys.executable}"],
      capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
  return run.stdout, (build / "build.ninja").read_text()


def _archs_of(ninja: str, source: str) -> set[str]:
  """The -gencode architectures of the compile of `source` (a path ending)."""
  block = re.search(r"build [^\n]*" + re.escape(source) + r"\.o:.*?\n\n", ninja, re.S)
  assert block, f"no compile of {source}"
  return set(re.findall(r"arch=compute_(\w+),", block.group(0)))


def test_sm90_sources_compile_for_sm90a_only(tmp_path):
  _, ninja = _configure(tmp_path, "80;90a")
  assert _archs_of(ninja, "kernels/sm80/fwd_bf16_d32.cu") == {"80", "90a"}
  assert _archs_of(ninja, "kernels/sm90/fwd_bf16_d32.cu") == {"90a"}
  assert "JEVO_BUILD_SM90=1" in ninja


def test_no_sm90_sources_without_sm90a(tmp_path):
  out, ninja = _configure(tmp_path, "80")
  assert "kernels/sm90/" not in ninja
  assert "JEVO_BUILD_SM90" not in ninja
  assert "the sm90 (Hopper wgmma) kernels are not built" in out
