"""Pieces shared by jevo's Pallas (Triton) kernels that work on blocks of rows `[rows, c]`:
the row mask of a block, a float32 layer norm of its rows, matrix products with float32
accumulation, block specs for parameters every program reads whole, and output shapes that
vary like the inputs inside `jax.shard_map`. Imports Pallas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32
# The activations' dtypes the kernels take: their matrix products run on the tensor cores.
KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def mm(a, b):
  """a @ b accumulated in float32."""
  return jnp.dot(a, b, preferred_element_type=F32)


def row_mask(start, block_rows, rows):
  """[block_rows, 1]: True for the rows of the block that exist."""
  return (start + jnp.arange(block_rows) < rows)[:, None]


def normalize(x, eps):
  """(x_hat, rstd) of float32 rows [block, c] (two-pass variance, as jevo.ops.layer_norm)."""
  mean = jnp.mean(x, axis=1, keepdims=True)
  centred = x - mean
  rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=1, keepdims=True) + eps)
  return centred * rstd, rstd


def layer_norm(x, scale, offset, eps, dtype):
  """LayerNorm of float32 rows with float32 scale and offset, rounded once to dtype."""
  x_hat, _ = normalize(x, eps)
  return (x_hat * scale[None, :] + offset[None, :]).astype(dtype)


def vec(ref):
  """A whole parameter vector in float32."""
  return ref[...].astype(F32)


def out_struct(shape, dtype, like):
  """The ShapeDtypeStruct of a kernel output that varies (inside `jax.shard_map`) like `like`;
  the inputs were made to vary alike first."""
  aval = jax.typeof(like)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
  if manual is not None:
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual)
  vma = getattr(aval, "vma", None)  # earlier spelling
  if vma is not None:
    return jax.ShapeDtypeStruct(shape, dtype, vma=vma)
  return jax.ShapeDtypeStruct(shape, dtype)


def vector_spec(n):
  """A parameter vector every program reads whole."""
  return pl.BlockSpec((n,), lambda *_: (0,))


def matrix_spec(shape):
  """A parameter matrix every program reads whole."""
  return pl.BlockSpec(shape, lambda *_: (0, 0))
