"""The DAP mesh: building one, finding the ambient one, placing arrays on it, `shard_map`.

DAP runs over one axis of a `jax.sharding.Mesh`. The mesh may span several processes (built
after `jax.distributed.initialize`, from `jax.devices()`); nothing here depends on where the
devices are. Other axes of the mesh, if any, are not used: the work is replicated over them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

if hasattr(jax, "shard_map"):
  _shard_map = jax.shard_map
else:  # JAX releases before jax.shard_map
  from jax.experimental.shard_map import shard_map as _shard_map

MeshLike = Mesh | AbstractMesh

DEFAULT_AXIS = "dap"


def make_dap_mesh(num_devices: int | None = None, *, axis: str = DEFAULT_AXIS,
                  devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis `axis` over `devices` (default: all devices of all processes).

  `num_devices` takes the first that many of them. After `jax.distributed.initialize`,
  `jax.devices()` lists every process's devices, so the default mesh spans all hosts.

  Example:
    >>> mesh = make_dap_mesh()            # every device, axis "dap"
    >>> mesh = make_dap_mesh(2)           # the first two
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_devices is None:
    num_devices = len(devices)
  if (not isinstance(num_devices, int) or isinstance(num_devices, bool)
      or not 0 < num_devices <= len(devices)):
    raise ValueError(f"num_devices must be an int in [1, {len(devices)}] (the number of devices "
                     f"available), got {num_devices!r}")
  if not isinstance(axis, str) or not axis:
    raise ValueError(f"axis must be a non-empty str, got {axis!r}")
  return jax.make_mesh((num_devices,), (axis,), devices=devices[:num_devices])


def resolve_mesh(mesh: MeshLike | None, axis: str) -> tuple[MeshLike, int]:
  """`mesh`, or the ambient one (`jax.set_mesh`), and the size of its axis `axis`."""
  if mesh is None:
    mesh = _ambient_mesh()
    if mesh is None:
      raise ValueError("mesh is None and no mesh is set: pass mesh= (e.g. "
                       "jevo.parallel.make_dap_mesh()) or call inside `with jax.set_mesh(mesh):`")
  elif not isinstance(mesh, (Mesh, AbstractMesh)):
    raise TypeError(f"mesh must be a jax.sharding.Mesh or AbstractMesh, got "
                    f"{type(mesh).__name__}")
  if axis not in mesh.axis_names:
    raise ValueError(f"axis must name an axis of the mesh, one of {tuple(mesh.axis_names)}, "
                     f"got {axis!r}")
  return mesh, mesh.shape[axis]


def _ambient_mesh() -> MeshLike | None:
  # The mesh of `with jax.set_mesh(mesh):`, as seen inside and outside `jax.jit`.
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def is_explicit(mesh: MeshLike, axis: str) -> bool:
  """Whether `axis` of `mesh` is an Explicit axis (sharding in types) rather than Auto."""
  types = getattr(mesh, "axis_types", None)
  if types is None:
    return False
  return types[tuple(mesh.axis_names).index(axis)] == jax.sharding.AxisType.Explicit


def place(x: jax.Array, mesh: MeshLike, axis: str, spec: PartitionSpec) -> jax.Array:
  """`x` laid out as `spec` on `mesh`: `jax.reshard` for an Explicit axis, else a constraint."""
  if is_explicit(mesh, axis):
    return jax.reshard(x, NamedSharding(mesh, spec))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shard_map(f, *, mesh: MeshLike, in_specs, out_specs):
  """`jax.shard_map` (or its experimental predecessor), manual over every axis of `mesh`, with
  its check of which values vary across devices on."""
  return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
