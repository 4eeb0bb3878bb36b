"""Host checks of kernel logic that can be run without a GPU (tests/native/*.cu, compiled for
the host with nvcc): the sm90 kernels' hand-written shared-memory addresses against the CuTe
layouts that wgmma reads, and the dQ kernels' visiting order of their (n, key tile) pairs. Needs
nvcc and the CUTLASS headers (the nvidia-cutlass wheel, or the copy a CUDA build of jevo staged
in build/)."""

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
@pytest.mark.parametrize("check,passed", [("smem_layouts", "mismatches: 0"),
                                          ("dq_schedule", "violations: 0")])
def test_host_check(check, passed, tmp_path):
  exe = tmp_path / check
  build = subprocess.run(
      ["nvcc", "-std=c++17", "--expt-relaxed-constexpr", "-I", str(ROOT / "cuda"),
       "-I", str(_cutlass_include()), "-o", str(exe), str(ROOT / "tests" / "native" / f"{check}.cu")],
      capture_output=True, text=True, timeout=600)
  assert build.returncode == 0, build.stderr[-3000:]
  run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
  assert run.returncode == 0 and passed in run.stdout, run.stdout
