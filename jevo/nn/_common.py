"""Shared pieces of jevo's modules: AlphaFold's initializers, LayerNorm, argument checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jevo.nn.layer_norm import LayerNorm

Initializer = Any  # a jax.nn.initializers-style callable: (key, shape, dtype) -> array

LAYER_NORM_EPS = 1e-5

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


def pair_bias_init(c_z: int) -> Initializer:
  """AlphaFold's initializer of the pair -> per-head bias projection: normal(1/sqrt(c_z))."""
  return nnx.initializers.normal(stddev=c_z ** -0.5)


def check_positive(name: str, value: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_chunk_size(chunk_size: int | None) -> None:
  """Raises ValueError unless `chunk_size` is None or a positive int."""
  if chunk_size is None:
    return
  if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


# An Evoformer block's sub-modules, by the names of their attributes and profile scopes: what
# a block's per-sub-module `chunk_size` mapping may name.
BLOCK_SUB_MODULES = ("msa_row_attention", "msa_column_attention", "msa_transition",
                     "outer_product_mean", "triangle_multiplication_outgoing",
                     "triangle_multiplication_incoming", "triangle_attention_starting_node",
                     "triangle_attention_ending_node", "pair_transition")


# A block's `chunk_size`: one for every sub-module, or per sub-module by name.
BlockChunkSize = int | Mapping[str, int | None] | None


def check_block_chunk_size(chunk_size) -> None:
  """Raises ValueError unless `chunk_size` is what a block takes: None, a positive int (every
  sub-module chunked by it) or a mapping from names in `BLOCK_SUB_MODULES` to None or a
  positive int (the sub-modules it does not name run unchunked)."""
  if not isinstance(chunk_size, Mapping):
    if chunk_size is not None and (not isinstance(chunk_size, int)
                                   or isinstance(chunk_size, bool) or chunk_size <= 0):
      raise ValueError(f"chunk_size must be None, a positive int or a mapping from sub-module "
                       f"names to those, got {chunk_size!r}")
    return
  unknown = sorted(str(k) for k in chunk_size if k not in BLOCK_SUB_MODULES)
  if unknown:
    raise ValueError(f"chunk_size names unknown sub-modules {unknown}; known: "
                     f"{', '.join(BLOCK_SUB_MODULES)}")
  for name, size in chunk_size.items():
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
      raise ValueError(f"chunk_size[{name!r}] must be None or a positive int, got {size!r}")


def sub_module_chunk_size(chunk_size, name: str) -> int | None:
  """The chunk size of the block's sub-module `name` under a block's `chunk_size`."""
  if isinstance(chunk_size, Mapping):
    return chunk_size.get(name)
  return chunk_size


def check_input(name: str, x: jax.Array, min_ndim: int, channels: int, what: str) -> None:
  """Checks dtype, rank and channel count of an activation; `what` names the expected layout."""
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    # Integer activations would stay integer: every update added to them would be truncated.
    raise TypeError(f"{name} must be a floating-point array {what}, got dtype {dtype}; "
                    f"cast it first, e.g. {name}.astype(jnp.float32)")
  if x.ndim < min_ndim:
    raise ValueError(f"{name} must have shape {what}, got shape {x.shape}")
  if x.shape[-1] != channels:
    raise ValueError(f"{name} must have {channels} channels in its last axis ({what}), "
                     f"got shape {x.shape}")


def check_pair(name: str, z: jax.Array, c_z: int) -> None:
  """Checks a pair representation: dtype and channels as `check_input`, and square."""
  check_input(name, z, 3, c_z, "[*B, N_res, N_res, c_z]")
  if z.shape[-2] != z.shape[-3]:
    raise ValueError(f"{name} must be square in its residue axes [*B, N_res, N_res, c_z], "
                     f"got {z.shape}")


def check_mask(name: str, mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
  """Returns `mask` as bool broadcast to `shape` (all True when None); 1 / True = valid."""
  if mask is None:
    return jnp.ones(shape, bool)
  mask = jnp.asarray(mask)
  try:
    return jnp.broadcast_to(mask != 0, shape)
  except ValueError:
    raise ValueError(f"{name} must be broadcastable to {shape}, got shape {mask.shape}") from None

