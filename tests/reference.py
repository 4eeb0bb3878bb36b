"""Float64 NumPy reference for evoformer attention: forward and backward (vector-Jacobian product).

Independent of jevo's code on purpose: the oracle for every backend, in jevo's public layout
q, k, v `[*B, N, S, H, D]`, mask broadcastable to `[*B, N, 1, 1, S]` (True = attend), bias
broadcastable to `[*B, 1, H, S, S]`. Rows with no unmasked key give output 0 and gradient 0.
"""

from __future__ import annotations

import numpy as np


def _f64(x):
  return None if x is None else np.asarray(x, dtype=np.float64)


def _probabilities(q, k, mask, bias, scale):
  """P `[*B, N, H, S, S]` (rows of masked-out keys 0, empty rows all 0)."""
  s = scale * np.einsum("...nihd,...njhd->...nhij", q, k)
  if bias is not None:
    s = s + bias  # [*B, 1, H, S, S] against [*B, N, H, S, S]
  allowed = np.ones(s.shape, bool) if mask is None else np.broadcast_to(
      np.asarray(mask, bool), s.shape)  # [*B, N, 1, 1, S] against [*B, N, H, S, S]
  s = np.where(allowed, s, -np.inf)
  m = np.max(s, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.where(allowed, np.exp(s - m), 0.0)
  total = p.sum(axis=-1, keepdims=True)
  return np.where(total > 0, p / np.where(total > 0, total, 1.0), 0.0)


def attention(q, k, v, mask=None, bias=None, scale=None):
  """The attention output `[*B, N, S, H, D]` in float64."""
  q, k, v, bias = _f64(q), _f64(k), _f64(v), _f64(bias)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  p = _probabilities(q, k, mask, bias, scale)
  return np.einsum("...nhij,...njhd->...nihd", p, v)


def _sum_to_shape(x, shape):
  """Sums `x` over the axes along which an array of `shape` was broadcast to x.shape."""
  lead = x.ndim - len(shape)
  x = x.sum(axis=tuple(range(lead)))
  axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
  return x.sum(axis=axes, keepdims=True).reshape(shape)


def attention_vjp(q, k, v, d_out, mask=None, bias=None, scale=None):
  """Gradients (dq, dk, dv, dbias) of sum(d_out * attention(...)), in float64.

  dbias has the shape of the given bias (summed over N and any broadcast axes), or is None.
  """
  bias_shape = None if bias is None else np.shape(bias)
  q, k, v, d_out, bias = _f64(q), _f64(k), _f64(v), _f64(d_out), _f64(bias)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  p = _probabilities(q, k, mask, bias, scale)
  dv = np.einsum("...nhij,...nihd->...njhd", p, d_out)
  dp = np.einsum("...nihd,...njhd->...nhij", d_out, v)
  ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
  dq = scale * np.einsum("...nhij,...njhd->...nihd", ds, k)
  dk = scale * np.einsum("...nhij,...nihd->...njhd", ds, q)
  dbias = None
  if bias_shape is not None:
    dbias = _sum_to_shape(ds.sum(axis=-4, keepdims=True), bias_shape)
  return dq, dk, dv, dbias
