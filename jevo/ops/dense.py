"""`dense`: x @ kernel + bias with a hand-written backward pass, and `split_last`, which cuts a
product of side-by-side kernels into its pieces. Ops on plain arrays; `jevo.nn`'s linear layers
are built on them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# The checkpoint name (`jax.ad_checkpoint.checkpoint_name`) of every linear layer's output, for
# checkpoint policies (`jevo.nn.policies`).
LINEAR_OUTPUT_NAME = "jevo_linear_output"


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
          precision: jax.lax.PrecisionLike = None) -> jax.Array:
  """`x @ kernel + bias` over the last axis of x, as `flax.nnx.Linear` computes it.

  Its gradient computes the output's cotangent once and reads that one array for dx, dkernel
  and dbias. (Left to autodiff, XLA fused each bias gradient's reduction with a recomputation
  of the elementwise backward that produced the cotangent, in fusions of many outputs that
  ran at a tenth of the memory bandwidth: 0.6 ms of one Evoformer block's 8.5 ms at
  128 x 256 on an H200.)

  `jax.checkpoint` policies see this call as one custom VJP, not as a `dot_general`, so
  `dots_saveable` does not keep its output; `jevo.nn`'s linear layers name it
  `jevo.nn.LINEAR_OUTPUT_NAME`, which `jevo.nn.policies.save_linear_outputs` keeps instead.

  Example:
    >>> dense(jnp.ones((2, 4)), jnp.ones((4, 3)), jnp.zeros(3)).shape
    (2, 3)
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
def split_last(y: jax.Array, sizes: tuple[int, ...]) -> tuple[jax.Array, ...]:
  """`y` cut along its last axis into pieces of `sizes`; the gradient is one concatenation.

  (The gradient of slicing is a padded copy per piece, summed, which XLA compiled into one slow
  transposing fusion.)

  Example:
    >>> [p.shape for p in split_last(jnp.ones((2, 5)), (2, 3))]
    [(2, 2), (2, 3)]
  """
  return tuple(jnp.split(y, np.cumsum(sizes)[:-1].tolist(), axis=-1))


def _split_last_fwd(y, sizes):
  return split_last(y, sizes), None


def _split_last_bwd(sizes, _, cotangents):
  return (jnp.concatenate(cotangents, axis=-1),)


split_last.defvjp(_split_last_fwd, _split_last_bwd)
