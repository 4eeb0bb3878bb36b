"""Numerics shared by the pure-JAX backends (`xla`, `xla_chunked`), canonical layout only.

Logits, softmax and the P @ V accumulation run in fp32 whatever the input dtype. A masked key
gets probability exactly 0 (it is selected out, never added as a large negative number), and a
row whose keys are all masked gets output 0 and a log-normaliser of +inf, so that probabilities
recomputed as exp(s - shift - log_norm) are 0 there too: no NaN in either direction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def logits(q, k, bias, *, scale, precision):
  """scale * q.k (+ bias) in fp32: q `[B, N, Sq, H, D]`, k `[B, N, S, H, D]`, bias `[B, H, Sq, S]`.

  Returns `[B, N, H, Sq, S]`.
  """
  s = jnp.einsum("bnqhd,bnkhd->bnhqk", q, k, precision=precision,
                 preferred_element_type=F32) * F32(scale)
  if bias is not None:
    s = s + bias[:, None].astype(F32)
  return s


def key_mask(mask):
  """The `[B, N, S]` key mask in the logits' layout `[B, N, 1, 1, S]`, or None."""
  return None if mask is None else mask[:, :, None, None, :]


def softmax_attend(s, v, mask, *, precision):
  """softmax(s) @ v over the last axis of s, with masking; fp32 results.

  s: `[B, N, H, Sq, S]` fp32 logits; v: `[B, N, S, H, D]`; mask: `[B, N, S]` bool or None.
  Returns out `[B, N, Sq, H, D]` (fp32) and the row statistics, each `[B, N, H, Sq]` fp32:
  shift (the row maximum, 0 on empty rows) and log_norm (log of the shifted row sum, +inf on
  empty rows), with P = exp(s - shift - log_norm). They are kept apart rather than summed into
  one log-sum-exp because a bias of +-1e4 makes the shift that large, and rounding the sum to fp32
  would cost P about 1e-3 of relative accuracy in the backward pass.
  """
  km = key_mask(mask)
  if km is not None:
    s = jnp.where(km, s, -jnp.inf)
  # Softmax is invariant to the shift, so it carries no gradient; a row whose logits are all
  # -inf (masked, or bias -inf) is shifted by 0 instead of -inf to keep exp() finite.
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(m > -jnp.inf, m, 0.0)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1)
  nonempty = l > 0
  out = jnp.einsum("bnhqk,bnkhd->bnqhd", p, v.astype(F32), precision=precision,
                   preferred_element_type=F32)
  out = out / jnp.swapaxes(jnp.where(nonempty, l, 1.0), -1, -2)[..., None]
  log_norm = jnp.where(nonempty, jnp.log(jnp.where(nonempty, l, 1.0)), jnp.inf)
  return out, (m[..., 0], log_norm)
