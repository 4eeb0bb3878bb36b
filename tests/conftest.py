"""Skips tests marked `gpu` where jevo's CUDA kernels cannot run, saying why; gives the planner's
tests a plan cache of their own (`own_plan_cache`)."""

from __future__ import annotations

import pytest

import jevo


def pytest_collection_modifyitems(config, items):
  del config
  status = jevo.cuda_status()
  if status.available:
    return
  skip = pytest.mark.skip(reason=f"jevo CUDA kernels unavailable: {status.reason}")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="module")
def own_plan_cache(tmp_path_factory):
  """One plan cache for the module that uses it, away from the user's."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    yield
