"""Shared pieces of jevo's modules: AlphaFold's initializers, LayerNorm, mask and shape checks."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jevo.nn.layer_norm import LayerNorm
from jevo.ops.varying import match_varying_axes

Initializer = Any  # a jax.nn.initializers-style callable: (key, shape, dtype) -> array

LAYER_NORM_EPS = 1e-5

# The name of every linear layer's output, for jax.checkpoint policies that save by name
# (`jax.checkpoint_policies.save_only_these_names(LINEAR_OUTPUT_NAME)`).
LINEAR_OUTPUT_NAME = "jevo_linear_output"

# AlphaFold's initializers (supplement 1.11.4): "linear" (LeCun, truncated normal), "relu" (He),
# Glorot-uniform for attention projections, "final" (zeros) for layers that write into a
# residual stream, so that every block starts as the identity.
linear_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
relu_init = nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
glorot_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
final_init = nnx.initializers.zeros


def layer_norm(num_features: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs) -> LayerNorm:
  # The two-pass variance: residual streams can carry large means, where E[x^2] - E[x]^2 cancels.
  return LayerNorm(num_features, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


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
  `nnx.Linear` itself.

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
  return [y] if len(layers) == 1 else list(_split_last(y, tuple(l.out_features for l in layers)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
          precision: jax.lax.PrecisionLike = None) -> jax.Array:
  """`x @ kernel + bias` over the last axis of x, as `nnx.Linear` computes it.

  Its gradient computes the output's cotangent once and reads that one array for dx, dkernel
  and dbias. (Left to autodiff, XLA fused each bias gradient's reduction with a recomputation
  of the elementwise backward that produced the cotangent, in fusions of many outputs that
  ran at a tenth of the memory bandwidth: 0.6 ms of one Evoformer block's 8.5 ms at
  128 x 256 on an H200.)

  `jax.checkpoint` policies see this call as one custom VJP, not as a `dot_general`, so
  `dots_saveable` does not keep its output; `project` names it `LINEAR_OUTPUT_NAME`, which
  `jax.checkpoint_policies.save_only_these_names` can keep instead.
  """
  y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
  return y if bias is None else y + bias


def _dense_fwd(x, kernel, bias, precision):
  return dense(x, kernel, bias, precision), (x, kernel, bias is not None)


def _dense_bwd(precision, residuals, g):
  x, kernel, has_bias = residuals
  # The barrier keeps XLA from fusing the cotangent's producer into each of its readers.
  g = jax.lax.optimization_barrier(g)
  dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dkernel = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), precision=precision)
  dbias = jnp.sum(g2, axis=0, dtype=jnp.float32).astype(g.dtype) if has_bias else None
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype), dbias


dense.defvjp(_dense_fwd, _dense_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _split_last(y: jax.Array, sizes: tuple[int, ...]) -> tuple[jax.Array, ...]:
  """`y` cut along its last axis into pieces of `sizes`; the gradient is one concatenation.

  (The gradient of slicing is a padded copy per piece, summed, which XLA compiled into one slow
  transposing fusion.)"""
  return tuple(jnp.split(y, np.cumsum(sizes)[:-1].tolist(), axis=-1))


def _split_last_fwd(y, sizes):
  return _split_last(y, sizes), None


def _split_last_bwd(sizes, _, cotangents):
  return (jnp.concatenate(cotangents, axis=-1),)


_split_last.defvjp(_split_last_fwd, _split_last_bwd)


def pair_bias_init(c_z: int) -> Initializer:
  """AlphaFold's initializer of the pair -> per-head bias projection: normal(1/sqrt(c_z))."""
  return nnx.initializers.normal(stddev=c_z ** -0.5)


def check_positive(name: str, value: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_chunk_size(chunk_size: int | None) -> None:
  if chunk_size is not None:
    check_positive("chunk_size", chunk_size)


def check_input(name: str, x: jax.Array, min_ndim: int, channels: int, what: str) -> None:
  """Checks rank and channel count of an activation; `what` names the expected layout."""
  if x.ndim < min_ndim:
    raise ValueError(f"{name} must have shape {what}, got shape {x.shape}")
  if x.shape[-1] != channels:
    raise ValueError(f"{name} must have {channels} channels in its last axis ({what}), "
                     f"got shape {x.shape}")


def check_mask(name: str, mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
  """Returns `mask` as bool broadcast to `shape` (all True when None); 1 / True = valid."""
  if mask is None:
    return jnp.ones(shape, bool)
  mask = jnp.asarray(mask)
  try:
    return jnp.broadcast_to(mask != 0, shape)
  except ValueError:
    raise ValueError(f"{name} must be broadcastable to {shape}, got shape {mask.shape}") from None


def check_same_leading(name: str, x: jax.Array, other_name: str, other: jax.Array) -> None:
  if x.shape[:-3] != other.shape[:-3]:
    raise ValueError(f"{name} and {other_name} must share their batch dims, got shapes "
                     f"{x.shape} and {other.shape}")
