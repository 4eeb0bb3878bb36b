"""Inputs a new user gets wrong, or edge values: each either works (checked against the float64
reference) or raises a TypeError / ValueError that names the argument and the values."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jevo
import reference
from cases import to_f64
from jevo.ops import cuda_backend
from jevo.ops.attention import forward_mode_message

B, N, S, H, D = 2, 3, 12, 2, 8
XLA_BACKENDS = ["xla", "xla_chunked"]


def _inputs(shape=(B, N, S, H, D), seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))
  mask = rng.random(shape[:-4] + (shape[-4], 1, 1, shape[-3])) < 0.7
  mask[..., 0] = True  # no fully masked row: DeepSpeed and jevo differ only there
  bias = jnp.asarray(rng.standard_normal(shape[:-4] + (1, H, S, S)), dtype)
  return q, k, v, mask, bias


# --- DS4Sci_EvoformerAttention's mask bias -------------------------------------------------------

def test_ds4sci_bool_mask_is_a_mask_not_an_additive_bias():
  q, k, v, mask, bias = _inputs()
  out = jevo.DS4Sci_EvoformerAttention(q, k, v, [jnp.asarray(mask), bias])
  want = reference.attention(to_f64(q), to_f64(k), to_f64(v), mask=mask, bias=to_f64(bias))
  np.testing.assert_allclose(to_f64(out), want, rtol=1e-5, atol=1e-5)


def test_ds4sci_mask_bias_with_math_inf_reads_nan_as_attend():
  """math.inf * (mask - 1) is NaN where mask == 1 (inf * 0) and -inf where mask == 0."""
  q, k, v, mask, bias = _inputs()
  mask_bias = math.inf * (jnp.asarray(mask, jnp.float32) - 1)
  assert bool(jnp.isnan(mask_bias).any()) and bool(jnp.isneginf(mask_bias).any())
  out = jax.jit(jevo.DS4Sci_EvoformerAttention)(q, k, v, [mask_bias, bias])
  want = reference.attention(to_f64(q), to_f64(k), to_f64(v), mask=mask, bias=to_f64(bias))
  np.testing.assert_allclose(to_f64(out), want, rtol=1e-5, atol=1e-5)


def test_ds4sci_integer_mask_is_refused():
  q, k, v, mask, _ = _inputs()
  with pytest.raises(TypeError, match=r"DS4Sci_EvoformerAttention: biases\[0\] \(mask bias\) "
                                      r"must be floating point .* or bool .*got dtype int32"):
    jevo.DS4Sci_EvoformerAttention(q, k, v, [jnp.asarray(mask, jnp.int32)])


# --- scale --------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [3.0, 50.0, 1e10, 1e30, -1e30, 1e38])
@pytest.mark.parametrize("implementation", XLA_BACKENDS)
def test_large_scales_give_the_float64_answer(scale, implementation):
  """|scale| > 1 would overflow the logits or let one rounding step swamp the softmax."""
  q, k, v, mask, bias = _inputs()
  d_out = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

  def f(q, k, v, bias):
    return jevo.evoformer_attention(q, k, v, mask=mask, bias=bias, scale=scale,
                                    implementation=implementation)

  out, pull = jax.vjp(jax.jit(f), q, k, v, bias)
  grads = pull(d_out)
  args = [to_f64(x) for x in (q, k, v)]
  want = reference.attention(*args, mask=mask, bias=to_f64(bias), scale=scale)
  want_grads = reference.attention_vjp(*args, to_f64(d_out), mask=mask, bias=to_f64(bias),
                                       scale=scale)
  np.testing.assert_allclose(to_f64(out), want, rtol=1e-4, atol=1e-4)
  for name, got, expected in zip("q k v bias".split(), grads, want_grads):
    assert np.all(np.isfinite(np.asarray(got))), name
    if abs(scale) <= 100:
      np.testing.assert_allclose(to_f64(got), expected, rtol=1e-4, atol=1e-4 * abs(scale),
                                 err_msg=name)
    # Beyond, the softmax is a hard maximum whose true dq, dk are ~0, while dq = scale * dS K
    # turns float32's rounding of dS (1e-7) into scale * 1e-7: only dv and dbias are compared.
    elif name in ("v", "bias"):
      np.testing.assert_allclose(to_f64(got), expected, rtol=1e-4, atol=1e-4, err_msg=name)


# --- empty head dim -----------------------------------------------------------------------------

@pytest.mark.parametrize("implementation", [None] + XLA_BACKENDS)
def test_head_dim_zero_gives_an_empty_output(implementation):
  q, k, v, mask, bias = _inputs(shape=(B, N, S, H, 0))
  assert jevo.evoformer_attention(q, k, v, implementation=implementation).shape == q.shape
  grad = jax.grad(lambda b: jnp.sum(jevo.evoformer_attention(
      q, k, v, mask=mask, bias=b, implementation=implementation)))(bias)
  assert not np.any(np.asarray(grad))


# --- forward-mode autodiff ----------------------------------------------------------------------

def test_forward_mode_runs_on_xla_and_matches_reverse_mode():
  q, k, v, mask, bias = _inputs(shape=(1, 2, 5, 2, 4))
  bias = bias[..., :5, :5]

  def f(q):
    return jevo.evoformer_attention(q, k, v, mask=mask[..., :5], bias=bias, implementation="xla")

  np.testing.assert_allclose(np.asarray(jax.jacfwd(f)(q)), np.asarray(jax.jacrev(f)(q)),
                             rtol=1e-5, atol=1e-6)
  dq = jnp.ones_like(q)
  _, tangent = jax.jvp(f, (q,), (dq,))
  eps = 1e-3
  numeric = (f(q + eps * dq) - f(q - eps * dq)) / (2 * eps)
  np.testing.assert_allclose(np.asarray(tangent), np.asarray(numeric), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "jit_jvp", "jit_jacfwd"])
def test_forward_mode_on_a_custom_vjp_backend_says_to_use_xla(transform):
  q, k, v, _, _ = _inputs()

  def f(q):
    return jevo.evoformer_attention(q, k, v, implementation="xla_chunked")

  jvp = lambda q: jax.jvp(f, (q,), (q,))  # noqa: E731
  jacfwd = jax.jacfwd(lambda q: jnp.sum(f(q)))
  run = dict(jvp=jvp, jacfwd=jacfwd, jit_jvp=jax.jit(jvp), jit_jacfwd=jax.jit(jacfwd))[transform]
  # Under jax.jit JAX's own message would come only when the step is compiled.
  with pytest.raises(TypeError, match=r"evoformer_attention: implementation='xla_chunked' has "
                                      r"reverse-mode derivatives only .* needs "
                                      r"implementation='xla'"):
    run(q)
  assert "cuda" in forward_mode_message("cuda")


def test_forward_mode_elsewhere_in_the_function_leaves_a_custom_vjp_backend_alone():
  """jax.jvp with respect to something the attention's inputs do not depend on gives them no
  tangent, and reverse mode still works under jit."""
  q, k, v, _, _ = _inputs()

  def f(x):
    return x * jnp.sum(jevo.evoformer_attention(q, k, v, implementation="xla_chunked"))

  out, tangent = jax.jit(lambda x: jax.jvp(f, (x,), (jnp.ones_like(x),)))(jnp.float32(2.0))
  np.testing.assert_allclose(np.asarray(tangent), np.asarray(out) / 2.0, rtol=1e-6)
  grad = jax.jit(jax.grad(lambda q: jnp.sum(jevo.evoformer_attention(
      q, k, v, implementation="xla_chunked") ** 2)))(q)
  assert grad.shape == q.shape and bool(jnp.all(jnp.isfinite(grad)))


def test_hessian_of_the_chunked_backend_equals_xla():
  """Forward over reverse differentiates the custom VJP's own rules, which are plain JAX."""
  q, k, v, mask, bias = _inputs(shape=(1, 1, 4, 1, 2))
  bias = bias[:, :, :1, :4, :4]

  def loss(q, implementation):
    out = jevo.evoformer_attention(q, k, v, mask=mask[..., :4], bias=bias,
                                   implementation=implementation)
    return jnp.sum(out ** 2)

  chunked = jax.hessian(loss)(q, "xla_chunked")
  plain = jax.hessian(loss)(q, "xla")
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(plain), rtol=1e-4, atol=1e-5)


# --- float64 ------------------------------------------------------------------------------------

@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("implementation", [None] + XLA_BACKENDS)
def test_float64_runs_on_the_xla_backends_in_float64(x64, implementation):
  del x64
  q, k, v, mask, bias = _inputs(dtype=jnp.float64)
  d_out = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape))

  def f(q, k, v, bias):
    return jevo.evoformer_attention(q, k, v, mask=mask, bias=bias, implementation=implementation)

  out, pull = jax.vjp(f, q, k, v, bias)
  assert out.dtype == jnp.float64
  args = [np.asarray(x) for x in (q, k, v)]
  np.testing.assert_allclose(np.asarray(out), reference.attention(*args, mask=mask,
                                                                  bias=np.asarray(bias)),
                             rtol=1e-12, atol=1e-12)
  want = reference.attention_vjp(*args, np.asarray(d_out), mask=mask, bias=np.asarray(bias))
  for got, expected in zip(pull(d_out), want):
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("implementation", XLA_BACKENDS)
def test_float64_check_grads(x64, implementation):
  del x64
  q, k, v, mask, bias = _inputs(shape=(1, 2, 5, 2, 4), dtype=jnp.float64)
  bias = bias[..., :5, :5]

  def f(q, k, v, bias):
    return jevo.evoformer_attention(q, k, v, mask=mask[..., :5], bias=bias,
                                    implementation=implementation)

  modes = ("fwd", "rev") if implementation == "xla" else ("rev",)
  check_grads(f, (q, k, v, bias), order=2 if implementation == "xla" else 1,
              modes=modes)


def test_float64_on_the_cuda_backend_says_why_not(monkeypatch):
  from jevo._cuda_lib import CudaStatus
  monkeypatch.setattr(cuda_backend, "cuda_status",
                      lambda: CudaStatus(available=True, reason="pretend"))
  q = jax.ShapeDtypeStruct((B, N, S, H, D), jnp.float64)
  reason = cuda_backend.unsupported_reason(q, q, q, None, None)
  assert reason is not None and "float64" in reason


# --- implementation names -----------------------------------------------------------------------

def test_auto_is_not_an_implementation_name():
  """None picks the backend; the examples offer only the names the op accepts."""
  q, k, v, _, _ = _inputs()
  with pytest.raises(ValueError, match=r"implementation must be None or one of .* got 'auto'"):
    jevo.evoformer_attention(q, k, v, implementation="auto")
