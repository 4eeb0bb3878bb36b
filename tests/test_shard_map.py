"""The op inside `jax.shard_map` with its type checks on: a replicated bias next to a sharded q
must give the same values and gradients as outside, the bias gradient summed over devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jevo


@pytest.mark.parametrize("implementation", ["xla", "xla_chunked", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_grad_inside_shard_map_matches_outside(implementation):
  mesh = jax.make_mesh((1,), ("x",))
  keys = jax.random.split(jax.random.key(0), 3)
  dtype = jnp.bfloat16 if implementation == "cuda" else jnp.float32  # the kernels' dtypes
  q = jax.random.normal(keys[0], (1, 4, 9, 2, 8), dtype)
  bias = jax.random.normal(keys[1], (1, 1, 2, 9, 9), dtype)
  mask = jax.random.uniform(keys[2], (1, 4, 1, 1, 9)) > 0.3

  def attend(q, bias, mask):
    return jevo.evoformer_attention(q, q, q, mask=mask, bias=bias, implementation=implementation)

  sharded = jax.shard_map(attend, mesh=mesh, in_specs=(P(None, "x"), P(), P(None, "x")),
                          out_specs=P(None, "x"))

  def loss(fn, q, bias, mask):
    return jnp.sum(fn(q, bias, mask).astype(jnp.float32) ** 2)

  qs = jax.device_put(q, NamedSharding(mesh, P(None, "x")))
  bs = jax.device_put(bias, NamedSharding(mesh, P()))
  ms = jax.device_put(mask, NamedSharding(mesh, P(None, "x")))
  got = jax.grad(lambda q, b: loss(sharded, q, b, ms), argnums=(0, 1))(qs, bs)
  want = jax.grad(lambda q, b: loss(attend, q, b, mask), argnums=(0, 1))(q, bias)
  # One device: the same arithmetic inside and outside, up to the order of a few sums.
  tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
  for g, w in zip(got, want):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * float(np.abs(w).max()))
