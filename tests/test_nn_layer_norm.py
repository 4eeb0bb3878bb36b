"""jevo's memory-lean LayerNorm and ReLU: same values and gradients as Flax's / JAX's, and a
backward pass that keeps no float32 copy (LayerNorm) or boolean mask (ReLU) of the activations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from jevo.nn.layer_norm import LayerNorm
from jevo.ops.activation import relu
from jevo.ops.layer_norm import layer_norm


def _pair(c, dtype, seed=0):
  ours = LayerNorm(c, dtype=dtype, rngs=nnx.Rngs(0))
  flax_ln = nnx.LayerNorm(c, epsilon=1e-5, use_fast_variance=False, dtype=dtype,
                          rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(seed), 2)
  for ln in (ours, flax_ln):  # the same non-trivial parameters in both
    ln.scale[...] = 1 + 0.5 * jax.random.normal(keys[0], (c,))
    ln.bias[...] = jax.random.normal(keys[1], (c,))
  return ours, flax_ln


def _input(shape, seed=1, offset=0.0, spread=1.0):
  return offset + spread * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _reference(x, scale, bias, cot, eps=1e-5):
  """Float64 NumPy LayerNorm and its vector-Jacobian product."""
  x, scale, bias, cot = (np.asarray(a, np.float64) for a in (x, scale, bias, cot))
  mean = x.mean(-1, keepdims=True)
  rstd = 1 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
  x_hat = (x - mean) * rstd
  g_hat = cot * scale
  dx = rstd * (g_hat - g_hat.mean(-1, keepdims=True)
               - x_hat * (g_hat * x_hat).mean(-1, keepdims=True))
  rows = tuple(range(x.ndim - 1))
  return x_hat * scale + bias, dx, (cot * x_hat).sum(rows), cot.sum(rows)


@pytest.mark.parametrize("shape,offset,spread", [((3, 7, 37), 0.0, 1.0),
                                                 ((5, 129), 1e3, 1e-2),   # large mean
                                                 ((2, 3, 64), 0.0, 300.0)])
def test_values_and_gradients_are_as_accurate_as_flax_in_float32(shape, offset, spread):
  ours, flax_ln = _pair(shape[-1], jnp.float32)
  x = _input(shape, offset=offset, spread=spread)
  cot = _input(shape, seed=2)
  want = _reference(x, ours.scale[...], ours.bias[...], cot)

  def errors(ln):
    graphdef, params = nnx.split(ln)
    out, pull = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
    dp, dx = pull(cot)
    got = (out, dx, dp["scale"][...], dp["bias"][...])
    return [float(np.max(np.abs(np.asarray(g, np.float64) - w)) / (np.max(np.abs(w)) + 1e-30))
            for g, w in zip(got, want)]

  for name, ours_err, flax_err in zip(("out", "dx", "dscale", "dbias"), errors(ours),
                                      errors(flax_ln)):
    # Relative to the largest reference value; a large mean costs both the same input bits.
    assert ours_err <= max(2 * flax_err, 1e-5), (name, ours_err, flax_err)


def test_bfloat16_matches_flax_within_rounding():
  ours, flax_ln = _pair(96, jnp.bfloat16)
  x = _input((4, 11, 96), offset=3.0).astype(jnp.bfloat16)
  a, b = ours(x), flax_ln(x)
  assert a.dtype == b.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                             rtol=2e-2, atol=2e-2)
  ga = jax.grad(lambda x: jnp.sum(jnp.square(ours(x).astype(jnp.float32))))(x)
  gb = jax.grad(lambda x: jnp.sum(jnp.square(flax_ln(x).astype(jnp.float32))))(x)
  np.testing.assert_allclose(np.asarray(ga, np.float32), np.asarray(gb, np.float32),
                             rtol=5e-2, atol=5e-2 * float(jnp.max(jnp.abs(gb.astype(jnp.float32)))))


def test_backward_keeps_no_float32_copy_of_a_bfloat16_input():
  x = _input((64, 48, 32)).astype(jnp.bfloat16)
  scale, bias = jnp.ones((32,), jnp.bfloat16), jnp.zeros((32,), jnp.bfloat16)
  saved = saved_residuals(lambda x, s, b: layer_norm(x, s, b, 1e-5, jnp.bfloat16), x, scale, bias)
  big = [aval for aval, _ in saved if aval.size >= x.size]
  assert big and all(aval.dtype == jnp.bfloat16 for aval in big), saved
  # Flax's LayerNorm, for contrast, keeps float32 activations: the property is not vacuous.
  flax_ln = nnx.LayerNorm(32, use_fast_variance=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  flax_saved = saved_residuals(lambda x: flax_ln(x), x)
  assert any(aval.dtype == jnp.float32 and aval.size >= x.size for aval, _ in flax_saved)


def test_relu_matches_jax_and_keeps_no_mask():
  x = _input((6, 33)).at[0, :3].set(0.0)  # exact zeros take the zero gradient, as in jax.nn
  cot = _input((6, 33), seed=3)
  out_a, pull_a = jax.vjp(relu, x)
  out_b, pull_b = jax.vjp(jax.nn.relu, x)
  np.testing.assert_array_equal(out_a, out_b)
  np.testing.assert_array_equal(pull_a(cot)[0], pull_b(cot)[0])
  assert all(aval.dtype != jnp.bool_ for aval, _ in saved_residuals(relu, x))
