"""Numerics shared by the pure-JAX backends (`xla`, `xla_chunked`), canonical layout only.

Logits, softmax and the P @ V accumulation run in fp32 whatever the input dtype (fp64 for fp64
inputs). A masked key gets probability exactly 0 (it is selected out, never added as a large
negative number), and a row whose keys are all masked gets output 0 and a log-normaliser of
+inf, so that probabilities recomputed as exp(s - shift - log_norm) are 0 there too: no NaN in
either direction.

Logits are carried divided by `logit_unit(scale)`, which is 1 for |scale| <= 1 (the usual
D ** -0.5): nothing changes there. A larger scale would make scale * q.k overflow, or make one
rounding step of the logits worth more than the whole softmax; divided by |scale| they stay
of the size of q.k, and the scale comes back only in the exponent of a number <= 0, where
overflow to -inf is harmless (its exponential is 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype of logits, softmax and accumulation: fp32, or fp64 for fp64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def logit_unit(scale: float) -> float:
  """What the logits are carried divided by: 1 for |scale| <= 1, else |scale|."""
  return max(1.0, abs(scale))


def logits(q, k, bias, *, scale, precision):
  """(scale * q.k + bias) / logit_unit(scale): q `[B, N, Sq, H, D]`, k `[B, N, S, H, D]`, bias
  `[B, H, Sq, S]`. Returns `[B, N, H, Sq, S]` in `compute_dtype(q.dtype)`.
  """
  acc = compute_dtype(q.dtype)
  unit = logit_unit(scale)
  s = jnp.einsum("bnqhd,bnkhd->bnhqk", q, k, precision=precision,
                 preferred_element_type=acc) * acc.type(scale / unit)
  if bias is not None:
    b = bias[:, None].astype(acc)
    s = s + (b if unit == 1.0 else b / acc.type(unit))
  if unit != 1.0:
    # One stored copy for the row maximum and every exponent: computed again inside another
    # fusion, a multiply-add may be contracted to one FMA and round differently, and scaled
    # back by a large unit one rounding step is worth more than the whole softmax.
    s = jax.lax.optimization_barrier(s)
  return s


def exponent(s, shift, unit: float):
  """The exponent of a probability, (s - shift) * unit, for logits in units of `unit`."""
  d = s - shift
  return d if unit == 1.0 else d * d.dtype.type(unit)


def key_mask(mask):
  """The `[B, N, S]` key mask in the logits' layout `[B, N, 1, 1, S]`, or None."""
  return None if mask is None else mask[:, :, None, None, :]


def softmax_attend(s, v, mask, *, unit, precision):
  """softmax(s * unit) @ v over the last axis of s, with masking.

  s: `[B, N, H, Sq, S]` logits from `logits` (in units of `unit`); v: `[B, N, S, H, D]`; mask:
  `[B, N, S]` bool or None. Returns out `[B, N, Sq, H, D]` and the row statistics, each
  `[B, N, H, Sq]`, all in s.dtype: shift (the row maximum of s, 0 on empty rows) and log_norm
  (log of the shifted row sum, +inf on empty rows), with
  P = exp(exponent(s, shift, unit) - log_norm). They are kept apart rather than summed into
  one log-sum-exp because a bias of +-1e4 makes the shift that large, and rounding the sum to
  fp32 would cost P about 1e-3 of relative accuracy in the backward pass.
  """
  km = key_mask(mask)
  if km is not None:
    s = jnp.where(km, s, -jnp.inf)
  # Softmax is invariant to the shift, so it carries no gradient; a row whose logits are all
  # -inf (masked, or bias -inf) is shifted by 0 instead of -inf to keep exp() finite.
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(m > -jnp.inf, m, 0.0)
  p = jnp.exp(exponent(s, m, unit))
  l = jnp.sum(p, axis=-1)
  nonempty = l > 0
  out = jnp.einsum("bnhqk,bnkhd->bnqhd", p, v.astype(s.dtype), precision=precision,
                   preferred_element_type=s.dtype)
  out = out / jnp.swapaxes(jnp.where(nonempty, l, 1.0), -1, -2)[..., None]
  log_norm = jnp.where(nonempty, jnp.log(jnp.where(nonempty, l, 1.0)), jnp.inf)
  return out, (m[..., 0], log_norm)
