"""offloaded_scan against jax.lax.scan on a small nonlinear body: same outputs, same gradients
for the carry and the floating-point inputs, integer inputs and constants passed through."""

import jax
import jax.numpy as jnp
import numpy as np

from jevo.nn.offload import offloaded_scan


def _body(carry, x, consts):
  a, b = carry
  a = jnp.tanh(a @ x["w"] + consts["shift"]) * b[..., :1]
  b = b * jax.nn.sigmoid(x["g"]) + jnp.sum(a, axis=-1, keepdims=True)
  return (a, b), x["count"] + 1  # an integer output, not differentiated


def _inputs(length=5):
  keys = jax.random.split(jax.random.key(0), 5)
  carry = (jax.random.normal(keys[0], (3, 4)), jax.random.normal(keys[1], (3, 2)))
  xs = dict(w=0.5 * jax.random.normal(keys[2], (length, 4, 4)),
            g=jax.random.normal(keys[3], (length, 3, 2)),
            count=jnp.arange(length, dtype=jnp.int32))
  consts = dict(shift=jax.random.normal(keys[4], (4,)))
  return carry, xs, consts


def _loss(scan):
  def loss(carry, xs, consts):
    (a, b), ys = scan(carry, xs, consts)
    return jnp.sum(jnp.sin(a)) + jnp.sum(b ** 2), ys
  return loss


def test_values_and_gradients_equal_a_plain_scan():
  carry, xs, consts = _inputs()
  plain = lambda c, x, k: jax.lax.scan(lambda c, x: _body(c, x, k), c, x)
  ours = lambda c, x, k: offloaded_scan(_body, c, x, k)
  (l0, ys0), g0 = jax.value_and_grad(_loss(plain), argnums=(0, 1), has_aux=True,
                                     allow_int=True)(
      carry, xs, consts)
  (l1, ys1), g1 = jax.jit(jax.value_and_grad(_loss(ours), argnums=(0, 1), has_aux=True,
                                             allow_int=True))(
      carry, xs, consts)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  np.testing.assert_array_equal(ys1, ys0)
  np.testing.assert_array_equal(ys1, np.arange(1, 6))
  for name in ("w", "g"):
    np.testing.assert_allclose(g1[1][name], g0[1][name], rtol=1e-5, atol=1e-6)
  for a, b in zip(g1[0], g0[0]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert g1[1]["count"].dtype == jax.dtypes.float0
  assert float(jnp.max(jnp.abs(g0[1]["w"]))) > 1e-3  # the gradients are not trivially zero


def test_constants_get_zero_cotangents_and_forward_needs_no_host_copies():
  carry, xs, consts = _inputs(length=3)
  g = jax.grad(lambda k: _loss(lambda c, x, k: offloaded_scan(_body, c, x, k))(
      carry, xs, k)[0])(consts)
  np.testing.assert_array_equal(g["shift"], 0.0)
  jaxpr = jax.make_jaxpr(lambda c, x, k: offloaded_scan(_body, c, x, k))(carry, xs, consts)
  assert "device_put" not in str(jaxpr)
