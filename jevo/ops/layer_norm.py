"""`layer_norm`: LayerNorm over the last axis whose backward pass keeps only its input and two
numbers per row.

Flax's LayerNorm differentiates through its float32 arithmetic, so autodiff keeps `x - mean`
and the normalised activations in float32 for the backward pass: three float32 copies of every
normalised tensor, 576 MiB per MSA layer norm at N_seq 512 x N_res 384 in bf16, and an Evoformer
block has 13 layer norms (as JAX lists them with `saved_residuals`). Here the backward pass
recomputes them from the input (which the block keeps anyway) and the float32 mean and
reciprocal standard deviation of each row, in the same fused pass that forms the input
gradient. Measured on an H200 under remat="block", XLA had already avoided most of those
copies: the step's peak memory and time did not change (BENCHMARKS.md).

Numerics are those of `flax.nnx.LayerNorm(use_fast_variance=False)` (`jevo.nn.LayerNorm` is that
module on this op): statistics and normalisation run in at least float32, and the result is cast
to `out_dtype`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _compute_dtype(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _normalized(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(x_hat, mean, rstd) over the last axis, in the compute dtype (two-pass variance)."""
  xf = x.astype(_compute_dtype(x.dtype))
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  centred = xf - mean
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
  return centred * rstd, mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float,
               out_dtype) -> jax.Array:
  """LayerNorm over the last axis of `x` with per-channel `scale` and `bias`, cast to `out_dtype`.

  Example:
    >>> x = jnp.arange(8.0).reshape(2, 4)
    >>> layer_norm(x, jnp.ones(4), jnp.zeros(4), 1e-5, jnp.float32).shape
    (2, 4)
  """
  return _layer_norm_fwd(x, scale, bias, eps, out_dtype)[0]


def _layer_norm_fwd(x, scale, bias, eps, out_dtype):
  x_hat, mean, rstd = _normalized(x, eps)
  ct = x_hat.dtype
  y = (x_hat * scale.astype(ct) + bias.astype(ct)).astype(out_dtype)
  return y, (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, out_dtype, residuals, g):
  x, mean, rstd, scale, bias = residuals
  ct = mean.dtype
  rows = tuple(range(x.ndim - 1))
  # The parameter gradients (sums over rows) read their own copies of the inputs. Sharing them,
  # XLA fused those sums with dx's sums over channels into one fusion, laid out channel-major
  # with float32 transposes of the whole tensor.
  g_p, x_p, mean_p, rstd_p = jax.lax.optimization_barrier((g, x, mean, rstd))
  g_p = g_p.astype(ct)
  d_scale = jnp.sum(g_p * ((x_p.astype(ct) - mean_p) * rstd_p), axis=rows).astype(scale.dtype)
  d_bias = jnp.sum(g_p, axis=rows).astype(bias.dtype)
  x_hat = (x.astype(ct) - mean) * rstd
  g = g.astype(ct)
  g_hat = g * scale.astype(ct)
  dx = rstd * (g_hat - jnp.mean(g_hat, axis=-1, keepdims=True)
               - x_hat * jnp.mean(g_hat * x_hat, axis=-1, keepdims=True))
  return dx.astype(x.dtype), d_scale, d_bias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)

