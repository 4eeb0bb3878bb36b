"""The sm90 kernels' hand-written shared-memory addresses match the CuTe layouts that wgmma
reads (tests/native/smem_layouts.cu, compiled for the host with nvcc). Needs nvcc and the CUTLASS
headers (the nvidia-cutlass wheel, or the copy a CUDA build of jevo staged in build/)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cutlass_include():
  try:
    import cutlass_library
  except ImportError:
    staged = sorted(ROOT.glob("build/*/deps/cutlass/include"))
    return staged[0] if staged else None
  return pathlib.Path(cutlass_library.__file__).parent / "source" / "include"


@pytest.mark.skipif(shutil.which("nvcc") is None or _cutlass_include() is None
                    or not (ROOT / "cuda" / "attention").is_dir(),
                    reason="needs nvcc, the CUTLASS headers and the source tree")
def test_pair_stores_match_the_wgmma_layouts(tmp_path):
  exe = tmp_path / "smem_layouts"
  build = subprocess.run(
      ["nvcc", "-std=c++17", "--expt-relaxed-constexpr", "-I", str(ROOT / "cuda"),
       "-I", str(_cutlass_include()), "-o", str(exe), str(ROOT / "tests" / "native" / "smem_layouts.cu")],
      capture_output=True, text=True, timeout=600)
  assert build.returncode == 0, build.stderr[-3000:]
  run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
  assert run.returncode == 0 and "mismatches: 0" in run.stdout, run.stdout
