"""Skips tests marked `gpu` where jevo's CUDA kernels cannot run, saying why."""

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
