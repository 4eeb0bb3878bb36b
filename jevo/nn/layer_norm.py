"""`LayerNorm`: `flax.nnx.LayerNorm` computed by `jevo.ops.layer_norm`, whose backward pass keeps
no float32 copies of the activations (see that module for why)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jevo.ops.layer_norm import layer_norm
from jevo.ops.varying import match_varying_axes


class LayerNorm(nnx.LayerNorm):
  """`nnx.LayerNorm` over the last axis (same parameters, `scale` and `bias`, and the numerics
  of `use_fast_variance=False`: inputs, scale and bias cast to `dtype` first) computed by
  `jevo.ops.layer_norm.layer_norm`.

  Example:
    >>> ln = LayerNorm(8, rngs=nnx.Rngs(0))
    >>> ln(jnp.arange(16.0).reshape(2, 8)).shape
    (2, 8)
  """

  def __init__(self, num_features: int, *, epsilon: float = 1e-5, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(num_features, epsilon=epsilon, use_fast_variance=False, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    scale, bias = self.scale[...], self.bias[...]
    dtype = self.dtype or jnp.result_type(x, scale, bias)
    # Under shard_map a replicated scale must vary like x, so that its cotangent is summed.
    x, scale, bias = match_varying_axes(*(a.astype(dtype) for a in (x, scale, bias)))
    return layer_norm(x, scale, bias, self.epsilon, dtype)
