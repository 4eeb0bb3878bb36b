"""The DAP axis as seen from inside `shard_map`: layout switches, gathers, ring shifts and
local slices.

Both representations are kept as `[*B, R, C, channels]` with one of R (axis -3) or C (axis -2)
split over the devices of the axis:

- "rows" layout: R split (the MSA by sequences, the pair by its first residue index);
- "columns" layout: C split (the MSA by residues, the pair by its second residue index).

`to_columns` / `to_rows` switch between them with one `all_to_all` (each device sends
`(n - 1) / n` of its shard, receives as much, and never holds more than its shard).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

ROWS, COLUMNS = -3, -2  # the split axis of each layout, in `[*B, R, C, channels]`


@dataclasses.dataclass(frozen=True)
class DapAxis:
  """A named mesh axis of `size` devices, used inside `shard_map` over it."""

  name: str
  size: int

  def index(self) -> jax.Array:
    """This device's position along the axis."""
    return jax.lax.axis_index(self.name)

  def to_columns(self, x: jax.Array) -> jax.Array:
    """`[*B, R/n, C, c]` (rows layout) -> `[*B, R, C/n, c]` (columns layout)."""
    return jax.lax.all_to_all(x, self.name, x.ndim + COLUMNS, x.ndim + ROWS, tiled=True)

  def to_rows(self, x: jax.Array) -> jax.Array:
    """`[*B, R, C/n, c]` (columns layout) -> `[*B, R/n, C, c]` (rows layout)."""
    return jax.lax.all_to_all(x, self.name, x.ndim + ROWS, x.ndim + COLUMNS, tiled=True)

  def gather(self, x: jax.Array, axis: int) -> jax.Array:
    """Every device's `x`, concatenated in device order along `axis` (a tiled all_gather).

    For tensors that each device needs whole and that are much smaller than the MSA or pair
    representation: attention biases `[*B, 1, H, N_res, N_res]`, low-channel projections.
    """
    return jax.lax.all_gather(x, self.name, axis=axis % x.ndim, tiled=True)

  def shift(self, x: jax.Array) -> jax.Array:
    """`x` of the next device on the ring: device d receives from d + 1 and sends to d - 1
    (a `ppermute`, whose gradient is the shift the other way)."""
    n = self.size
    return jax.lax.ppermute(x, self.name, [(i, (i - 1) % n) for i in range(n)])

  def local(self, x: jax.Array, axis: int) -> jax.Array:
    """This device's block of `x` (the same on every device) along `axis`."""
    n = x.shape[axis] // self.size
    return jax.lax.dynamic_slice_in_dim(x, self.index() * n, n, axis % x.ndim)


def padded_size(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is at least `n`."""
  return -(-n // multiple) * multiple


def pad_to(x: jax.Array, sizes: dict[int, int]) -> jax.Array:
  """`x` padded at the end with zeros (False) so that `x.shape[axis] == sizes[axis]`."""
  widths = [(0, 0)] * x.ndim
  for axis, size in sizes.items():
    widths[axis % x.ndim] = (0, size - x.shape[axis])
  if all(w == (0, 0) for w in widths):
    return x
  return jnp.pad(x, widths)
