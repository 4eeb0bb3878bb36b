"""`DS4Sci_EvoformerAttention`: DeepSpeed's calling convention on top of evoformer_attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jevo
import reference
from cases import to_f64

B, N, S, H, D = 2, 3, 20, 2, 16


def _inputs(dtype=jnp.bfloat16, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((B, N, S, H, D), np.float32), dtype)
             for _ in range(3))
  mask = rng.random((B, N, S)) < 0.8
  mask[:, :, 0] = True  # no fully masked row: DeepSpeed and jevo differ only there
  pair = jnp.asarray(rng.standard_normal((B, 1, H, S, S), np.float32), dtype)
  return q, k, v, mask, pair


def _openfold_mask_bias(mask, dtype, inf=1e9):
  """What OpenFold passes: inf * (mask - 1), as [B, N, 1, 1, S]."""
  return (inf * (jnp.asarray(mask, jnp.float32) - 1))[:, :, None, None, :].astype(dtype)


def _want(q, k, v, mask=None, bias=None):
  return reference.attention(to_f64(q), to_f64(k), to_f64(v),
                             mask=None if mask is None else mask[:, :, None, None, :],
                             bias=None if bias is None else to_f64(bias))


def _assert_close(out, want, dtype):
  tol = {jnp.bfloat16: 2e-2, jnp.float16: 3e-3, jnp.float32: 1e-5}[dtype]
  np.testing.assert_allclose(to_f64(out), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, inf", [(jnp.bfloat16, 1e9), (jnp.float16, 1e9),
                                        (jnp.float16, 3e4), (jnp.float32, 1e9)],
                         ids=["bf16", "fp16_overflows_to_-inf", "fp16_3e4", "fp32"])
def test_openfold_mask_and_pair_bias(dtype, inf):
  q, k, v, mask, pair = _inputs(dtype)
  out = jevo.DS4Sci_EvoformerAttention(q, k, v, [_openfold_mask_bias(mask, dtype, inf), pair])
  assert out.shape == q.shape and out.dtype == dtype
  _assert_close(out, _want(q, k, v, mask, pair), dtype)


def test_general_additive_mask_bias_is_applied_exactly():
  """Finite, nonzero values in biases[0] are added to the logits, not rounded into a mask."""
  q, k, v, mask, pair = _inputs(jnp.float32)
  rng = np.random.default_rng(5)
  additive = rng.standard_normal((B, N, 1, 1, S)).astype(np.float32)
  mask_bias = jnp.where(jnp.asarray(mask)[:, :, None, None, :], additive, -1e9)
  out = jax.jit(jevo.DS4Sci_EvoformerAttention)(q, k, v, [mask_bias, pair])
  # The reference adds both terms: a [B, N, H, S, S] bias, masked keys handled by the mask.
  want = reference.attention(to_f64(q), to_f64(k), to_f64(v), mask=mask[:, :, None, None, :],
                             bias=to_f64(pair) + additive.astype(np.float64))
  np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("biases", ["none", "empty", "mask_only", "pair_only", "both_tuple"])
def test_bias_list_forms(biases):
  q, k, v, mask, pair = _inputs(jnp.float32)
  mask_bias = _openfold_mask_bias(mask, jnp.float32)
  given, want_mask, want_bias = {
      "none": ([None, None], None, None),
      "empty": ([], None, None),
      "mask_only": ([mask_bias], mask, None),
      "pair_only": ([None, pair], None, pair),
      "both_tuple": ((mask_bias, pair), mask, pair),
  }[biases]
  before = list(given)
  out = jevo.DS4Sci_EvoformerAttention(q, k, v, given)
  # DeepSpeed pads the caller's list with None; this one leaves it as it was.
  assert len(given) == len(before) and all(a is b for a, b in zip(given, before))
  _assert_close(out, _want(q, k, v, want_mask, want_bias), jnp.float32)


def test_gradients_match_reference():
  q, k, v, mask, pair = _inputs(jnp.float32)
  mask_bias = _openfold_mask_bias(mask, jnp.float32)
  d_out = jnp.asarray(np.random.default_rng(9).standard_normal((B, N, S, H, D)), jnp.float32)

  def loss(q, k, v, pair):
    return jnp.sum(jevo.DS4Sci_EvoformerAttention(q, k, v, [mask_bias, pair]) * d_out)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, pair)
  want = reference.attention_vjp(to_f64(q), to_f64(k), to_f64(v), to_f64(d_out),
                                 mask=mask[:, :, None, None, :], bias=to_f64(pair))
  for got, expected in zip(grads, want):
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)


def test_gradient_of_mask_bias_raises():
  q, k, v, mask, pair = _inputs(jnp.float32)
  mask_bias = _openfold_mask_bias(mask, jnp.float32)
  loss = lambda mb: jnp.sum(jevo.DS4Sci_EvoformerAttention(q, k, v, [mb, pair]))  # noqa: E731
  with pytest.raises(ValueError, match=r"biases\[0\] is a mask bias and has no gradient"):
    jax.grad(loss)(mask_bias)


def test_vmap():
  q, k, v, mask, pair = _inputs(jnp.float32)
  mask_bias = _openfold_mask_bias(mask, jnp.float32)
  direct = jevo.DS4Sci_EvoformerAttention(q, k, v, [mask_bias, pair])
  # Map over B, calling with B = 1 each time.
  one = lambda q, k, v, mb, pb: jevo.DS4Sci_EvoformerAttention(  # noqa: E731
      q[None], k[None], v[None], [mb[None], pb[None]])[0]
  mapped = jax.vmap(one)(q, k, v, mask_bias, pair)
  np.testing.assert_allclose(np.asarray(mapped), np.asarray(direct), rtol=1e-5, atol=1e-6)


BAD_CALLS = {
    "rank": (lambda q, mb, pb: (q[0], [mb, pb]), ValueError, r"Q must be \[B, N, S, H, D\]"),
    "too_many": (lambda q, mb, pb: (q, [mb, pb, pb]), ValueError,
                 r"biases takes at most two entries .* got 3"),
    "not_a_list": (lambda q, mb, pb: (q, mb), TypeError, r"biases must be a list or tuple"),
    "mask_bias_shape": (lambda q, mb, pb: (q, [mb[:, :, :, :, :-1], pb]), ValueError,
                        r"biases\[0\] \(mask bias\) must have shape \(2, 3, 1, 1, 20\), "
                        r"got \(2, 3, 1, 1, 19\)"),
    "pair_bias_shape": (lambda q, mb, pb: (q, [mb, pb[:, :, :1]]), ValueError,
                        r"biases\[1\] \(pair bias\) must have shape \(2, 1, 2, 20, 20\)"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_calls_raise_clear_errors(name):
  make, error, pattern = BAD_CALLS[name]
  q, k, v, mask, pair = _inputs(jnp.float32)
  q_arg, biases = make(q, _openfold_mask_bias(mask, jnp.float32), pair)
  with pytest.raises(error, match=r"DS4Sci_EvoformerAttention: " + pattern):
    jevo.DS4Sci_EvoformerAttention(q_arg, k, v, biases)
