"""What the tests of the triangle multiplication's fused kernels share: a module with random
parameters, and the relative error they compare in."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from jevo.nn import TriangleMultiplication


def rel_error(a, b) -> float:
  """||a - b|| / ||b|| in float64 (Frobenius norms)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def random_module(c_z, c_hidden, dtype, implementation=None, outgoing=True, seed=0):
  """A TriangleMultiplication whose parameters are all random (the default zero or one
  initialisations would hide mistakes in the gates and the layer norms)."""
  t = TriangleMultiplication(c_z, c_hidden, outgoing=outgoing, dtype=dtype,
                             implementation=implementation, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(t)
  keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
  state = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(next(keys), p.shape, p.dtype), state)
  return nnx.merge(graphdef, state)
