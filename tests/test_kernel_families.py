"""The kernel families' single list (cuda/kernels/generate.py): the generated instantiations and
header on disk are what the generator writes now, and a built library reports the same families.
Runs without a GPU."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNELS = ROOT / "cuda" / "kernels"

pytestmark = pytest.mark.skipif(not (KERNELS / "generate.py").is_file(),
                                reason="needs the source tree (cuda/kernels/generate.py)")


def _generator(where: pathlib.Path):
  """generate.py loaded so that it writes under `where` instead of next to itself."""
  copy = where / "generate.py"
  shutil.copy(KERNELS / "generate.py", copy)
  spec = importlib.util.spec_from_file_location("jevo_kernel_generator", copy)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tree(root: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
          if p.is_file() and p.suffix in (".cu", ".h")}


def test_generated_files_are_up_to_date(tmp_path):
  gen = _generator(tmp_path)
  gen.main()
  assert _tree(tmp_path) == _tree(KERNELS), "run python cuda/kernels/generate.py and commit"


def test_every_family_has_its_sources_and_launchers(tmp_path):
  gen = _generator(tmp_path)
  for family in gen.FAMILIES:
    for direction in family.directions:
      assert (ROOT / "cuda" / "attention" / family.name / f"{direction}_launch.h").is_file()
      for tag in gen.ELEMENTS:
        for d in gen.HEAD_DIMS:
          assert (KERNELS / family.name / f"{direction}_{tag}_d{d}.cu").is_file()
  # The first family implements everything: it is what the others fall back to.
  assert set(gen.FAMILIES[0].directions) == set(gen.DIRECTIONS)


def test_library_reports_the_generator_families(tmp_path):
  from jevo import _cuda_lib
  if not _cuda_lib.kernel_families():
    pytest.skip(f"no CUDA library loaded: {_cuda_lib.cuda_status().reason}")
  gen = _generator(tmp_path)
  got = {f.name: (f.cuda_arch, f.directions) for f in _cuda_lib.kernel_families()}
  want = {f.name: (f.arch, f.directions) for f in gen.FAMILIES}
  assert got == want
