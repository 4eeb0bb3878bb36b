"""A CPU stand-in for jevo's CUDA kernels: `cuda_backend.Kernels` computed by the "xla" backend.

It takes and returns what the FFI calls do (an absent mask or bias as a `(0,)` array; the
forward's log-sum-exp `[B, N, H, S]` in fp32 and its bf16 output residual; the backward's
dq, dk, dv and dbias, dbias summed over the N rows it is given), so that
`cuda_backend.attention(..., kernels=STAND_IN)` runs the CUDA backend's own path (custom VJP,
vmap rules, partitioning) anywhere, with only the per-device kernel calls swapped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jevo.ops import cuda_backend, xla, xla_common

_PRECISION = jax.lax.Precision.HIGHEST


def _absent_as_none(mask, bias):
  return (None if mask.size == 0 else mask), (None if bias.size == 0 else bias)


def _forward(q, k, v, mask, bias, scale):
  mask, bias = _absent_as_none(mask, bias)
  s = xla_common.logits(q, k, bias, scale=scale, precision=_PRECISION)
  unit = xla_common.logit_unit(scale)
  out, (shift, log_norm) = xla_common.softmax_attend(s, v, mask, unit=unit, precision=_PRECISION)
  return out, (shift * unit + log_norm).astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def forward(scale, family, with_residual):
  del family

  def call(q, k, v, mask, bias):
    exact, lse = _forward(q, k, v, mask, bias, scale)
    out = exact.astype(q.dtype)
    if not with_residual:
      return out, lse
    return out, lse, (exact - out.astype(exact.dtype)).astype(cuda_backend.RESIDUAL_DTYPE)

  return call


@functools.lru_cache(maxsize=None)
def backward(scale, family):
  del family

  def call(q, k, v, mask, bias, dout, lse, delta):
    del lse, delta  # recomputed by autodiff of the reference
    m, b = _absent_as_none(mask, bias)
    if b is None:
      attend = lambda q, k, v: xla.attention(q, k, v, m, None, scale=scale, deterministic=False)
      dq, dk, dv = jax.vjp(attend, q, k, v)[1](dout)
      return dq, dk, dv, jnp.zeros((0,), q.dtype)
    attend = lambda q, k, v, b: xla.attention(q, k, v, m, b, scale=scale, deterministic=False)
    return jax.vjp(attend, q, k, v, b)[1](dout)

  return call


STAND_IN = cuda_backend.Kernels(forward, backward)
