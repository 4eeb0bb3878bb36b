"""Runs a per-shard computation of (m, z) under `shard_map`: padding, layouts, module state.

The MSA `m [*B, N_seq, N_res, c_m]` and the pair `z [*B, N_res, N_res, c_z]` enter and leave
the per-shard function in rows layout (split along N_seq and along pair rows). N_seq and N_res
are padded with zeros up to multiples of the axis size, with the padding masked out, and the
padding is cut off again afterwards. The module's parameters and other state (dropout RNG
streams) are replicated; state that the computation changes is written back to the module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from jevo.nn._common import check_mask
from jevo.parallel import mesh as mesh_lib
from jevo.parallel.layout import DapAxis, pad_to, padded_size


class Masks(NamedTuple):
  """The bool masks of one shard (True = valid), in the layouts the block needs them."""

  msa_rows: jax.Array   # [*B, N_seq/n, N_res]
  msa_cols: jax.Array   # [*B, N_seq, N_res/n]
  pair_rows: jax.Array  # [*B, N_res/n, N_res]
  pair_cols: jax.Array  # [*B, N_res, N_res/n]


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The unpadded sizes of the whole problem (the single-device shapes)."""

  batch: tuple[int, ...]
  n_seq: int
  n_res: int

  def msa(self, channels: int) -> tuple[int, ...]:
    return self.batch + (self.n_seq, self.n_res, channels)

  def pair(self, channels: int) -> tuple[int, ...]:
    return self.batch + (self.n_res, self.n_res, channels)


# body(module, m_rows, z_rows, masks, replicated, ax, sizes) -> (m_rows, z_rows)
ShardFn = Callable[[nnx.Module, jax.Array, jax.Array, Masks, Any, DapAxis, Sizes],
                   tuple[jax.Array, jax.Array]]


def run_sharded(body: ShardFn, module: nnx.Module, m: jax.Array, z: jax.Array,
                msa_mask: jax.Array | None, pair_mask: jax.Array | None, replicated: Any, *,
                mesh: mesh_lib.MeshLike | None, axis: str,
                write_back: bool) -> tuple[jax.Array, jax.Array]:
  """`body` on every shard of (m, z) over mesh axis `axis`; returns the whole (m, z).

  `replicated` (a pytree of arrays, e.g. dropout keys) reaches every shard whole. With
  `write_back`, the module's non-parameter state after `body` (advanced RNG streams) is written
  back to `module`.
  """
  mesh, n = mesh_lib.resolve_mesh(mesh, axis)
  sizes = Sizes(tuple(m.shape[:-3]), m.shape[-3], m.shape[-2])
  n_seq, n_res = padded_size(sizes.n_seq, n), padded_size(sizes.n_res, n)
  msa_mask = pad_to(check_mask("msa_mask", msa_mask, m.shape[:-1]), {-2: n_seq, -1: n_res})
  pair_mask = pad_to(check_mask("pair_mask", pair_mask, z.shape[:-1]), {-2: n_res, -1: n_res})
  m = pad_to(m, {-3: n_seq, -2: n_res})
  z = pad_to(z, {-3: n_res, -2: n_res})

  b = (None,) * len(sizes.batch)
  rows, mask_rows, mask_cols = P(*b, axis, None, None), P(*b, axis, None), P(*b, None, axis)

  def place(x, spec):
    return mesh_lib.place(x, mesh, axis, spec)

  graphdef, params, state = nnx.split(module, nnx.Param, ...)

  def per_shard(params, state, replicated, m, z, *masks):
    local = nnx.merge(graphdef, params, state)
    m, z = body(local, m, z, Masks(*masks), replicated, DapAxis(axis, n), sizes)
    return m, z, nnx.split(local, nnx.Param, ...)[2]

  run = mesh_lib.shard_map(
      per_shard, mesh=mesh,
      in_specs=(P(), P(), P(), rows, rows, mask_rows, mask_cols, mask_rows, mask_cols),
      out_specs=(rows, rows, P()))
  m, z, state = run(params, state, replicated, place(m, rows), place(z, rows),
                    place(msa_mask, mask_rows), place(msa_mask, mask_cols),
                    place(pair_mask, mask_rows), place(pair_mask, mask_cols))
  if write_back:
    nnx.update(module, state)
  return (_unpad(m, (sizes.n_seq, sizes.n_res), mesh, axis),
          _unpad(z, (sizes.n_res, sizes.n_res), mesh, axis))


def _unpad(x: jax.Array, sizes: tuple[int, int], mesh, axis: str) -> jax.Array:
  """`x [*B, R, C, c]` cut to `[*B, *sizes, c]`."""
  if x.shape[-3:-1] == sizes:
    return x  # no padding: stays split along its rows
  if mesh_lib.is_explicit(mesh, axis):
    # An Explicit axis cannot split a dimension unevenly: gather, then cut.
    x = mesh_lib.place(x, mesh, axis, P())
  return x[..., :sizes[0], :sizes[1], :]
