"""The compiled library's status and the smallest FFI call through it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jevo
from jevo.selftest import ffi_axpy


def test_cuda_status_says_why_when_unavailable():
  status = jevo.cuda_status()
  if status.available:
    pytest.skip("the CUDA kernels are available here")
  assert not status
  assert isinstance(status.reason, str) and status.reason.strip()


def test_ffi_axpy_without_kernels_raises():
  if jevo.cuda_status().available:
    pytest.skip("the CUDA kernels are available here")
  with pytest.raises(RuntimeError, match="jevo CUDA kernels unavailable"):
    ffi_axpy(2.0, jnp.ones(3), jnp.ones(3))


@pytest.mark.gpu
def test_ffi_axpy_under_jit():
  rng = np.random.default_rng(0)
  x, y = (jnp.asarray(rng.standard_normal(1001), jnp.float32) for _ in range(2))
  out = jax.jit(lambda a, b: ffi_axpy(2.5, a, b))(x, y)
  # The kernel may fuse the multiply-add (one rounding instead of two): a few ulps of the terms.
  np.testing.assert_allclose(np.asarray(out), 2.5 * np.asarray(x) + np.asarray(y), rtol=1e-6,
                             atol=1e-6)
