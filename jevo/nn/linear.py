"""Linear layers on `jevo.ops.dense`: `Linear` (an `nnx.Linear`) and `project`, which applies
several layers that read one input as one matrix product."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jevo.nn._common import Initializer, linear_init
from jevo.nn.policies import LINEAR_OUTPUT_NAME
from jevo.ops.dense import dense, split_last
from jevo.ops.varying import match_varying_axes

def linear(in_features: int, out_features: int, *, use_bias: bool = True,
           kernel_init: Initializer = linear_init, bias_init: Initializer = nnx.initializers.zeros,
           dtype, param_dtype, rngs: nnx.Rngs) -> "Linear":
  return Linear(in_features, out_features, use_bias=use_bias, kernel_init=kernel_init,
                bias_init=bias_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Linear(nnx.Linear):
  """`nnx.Linear` (same parameters, same numerics) whose gradient is computed by `dense`.

  Example:
    >>> Linear(4, 3, rngs=nnx.Rngs(0))(jnp.ones((2, 4))).shape
    (2, 3)
  """

  def __call__(self, x: jax.Array) -> jax.Array:
    return project(x, self)[0]


def project(x: jax.Array, *layers: nnx.Linear) -> list[jax.Array]:
  """`[layer(x) for layer in layers]`, computed as one matrix product over the layers' kernels
  placed side by side.

  One product reads `x` once, and its transpose gives dx in one product too, instead of one per
  layer plus their sum. The numerics are nn.Linear's: inputs and kernels are promoted to the
  layers' dtype, and each layer's bias is added to its own slice. Layers that differ in input
  size, dtype or precision, or that bring their own `dot_general`, are applied one by one by
  `nnx.Linear` itself. Every output is named `LINEAR_OUTPUT_NAME` for checkpoint policies.

  Example:
    >>> rngs = nnx.Rngs(0)
    >>> q, g = project(jnp.ones((2, 4)), nnx.Linear(4, 3, rngs=rngs), nnx.Linear(4, 5, rngs=rngs))
    >>> q.shape, g.shape
    ((2, 3), (2, 5))
  """
  first = layers[0]
  same = all(l.in_features == first.in_features and l.dtype == first.dtype
             and l.precision == first.precision and l.dot_general is jax.lax.dot_general
             and getattr(l, "preferred_element_type", None) is None for l in layers)
  if not same:
    return [checkpoint_name(nnx.Linear.__call__(layer, x), LINEAR_OUTPUT_NAME) for layer in layers]
  kernel = jnp.concatenate([l.kernel[...] for l in layers], axis=-1)
  bias = None
  if any(l.bias is not None for l in layers):
    # A layer without a bias gets zeros in its slice: a constant, whose gradient is dropped.
    bias = jnp.concatenate([l.bias[...] if l.bias is not None
                            else jnp.zeros((l.out_features,), l.param_dtype) for l in layers])
  x, kernel, bias = first.promote_dtype((x, kernel, bias), dtype=first.dtype)
  # Inside shard_map a replicated kernel meets a sharded x: the custom VJP needs them to vary
  # alike, and the transpose of that cast sums the kernel's gradient over the devices.
  x, kernel, bias = match_varying_axes(x, kernel, bias)
  y = checkpoint_name(dense(x, kernel, bias, first.precision), LINEAR_OUTPUT_NAME)
  return [y] if len(layers) == 1 else list(split_last(y, tuple(l.out_features for l in layers)))
