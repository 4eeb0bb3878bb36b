"""Shared (row- or column-wise) dropout on one shard, with the masks of a single device.

`nnx.Dropout` draws one Bernoulli mask of the update's shape with its `broadcast_dims` set to 1.
Here the same mask is drawn, from the same key, for the whole unpadded array on every device,
padded like the array and cut to this device's shard; so a DAP run drops exactly what a
single-device run of the same module with the same key drops. The mask is small: the shared
axis has size 1 (`[*B, 1, N_res, c]` or `[*B, N_res, 1, c]`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jevo.nn.dropout import is_active
from jevo.parallel.layout import DapAxis


def shared_dropout(dropout: nnx.Dropout, update: jax.Array, key: jax.Array | None, *,
                   shape: Sequence[int], split_axis: int, ax: DapAxis) -> jax.Array:
  """`dropout(whole_update, rngs=key)` restricted to this device's shard `update`.

  Args:
    dropout: the block's `nnx.Dropout` (its rate, `broadcast_dims` and mode are used).
    update: this device's shard of the padded update, split along `split_axis`.
    key: the dropout key; None draws one from the module's own stream, as `nnx.Dropout` does.
    shape: the shape of the whole update before padding (the single-device shape).
    split_axis: the axis of `update` that is split over `ax`.
    ax: the DAP axis.
  """
  if dropout.deterministic is None:
    raise ValueError("the block's nnx.Dropout has deterministic=None; call .train() or .eval() "
                     "on the block first")
  if not is_active(dropout):
    return update
  if dropout.rate >= 1.0:
    return jnp.zeros_like(update)
  if key is None:
    if dropout.rngs is None:
      raise ValueError("dropout is on (training mode) but no dropout key was given and the "
                       "block was built without rngs for dropout: pass rngs= or call .eval()")
    key = dropout.rngs()
  ndim = update.ndim
  shared = {d % ndim for d in dropout.broadcast_dims}
  keep = 1.0 - dropout.rate
  mask_shape = tuple(1 if d in shared else n for d, n in enumerate(shape))
  mask = jax.random.bernoulli(key, p=keep, shape=mask_shape)
  split = split_axis % ndim
  padded = [n * ax.size if d == split else n for d, n in enumerate(update.shape)]
  mask = jnp.pad(mask, [(0, 0) if d in shared else (0, padded[d] - mask_shape[d])
                        for d in range(ndim)])
  if split not in shared:
    mask = ax.local(mask, split)
  mask = jnp.broadcast_to(mask, update.shape)
  return jax.lax.select(mask, update / keep, jnp.zeros_like(update))
