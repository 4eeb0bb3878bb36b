"""Sharding rules for the attention kernels' custom calls.

An FFI custom call is opaque to XLA's partitioner: under `jax.jit` with inputs sharded over
devices, XLA would gather q, k, v, the mask and the bias onto every device and run the whole op
on each. The op is independent over the batch B, over N and over the heads H, so `shard_kernel`
makes a per-device kernel call partitionable over those: each device runs the kernel on its own
block and nothing is gathered. The attended axis S and the head dim D are never split: where a
caller shards them, those axes, and only those, are gathered (the kernels need every key of a
row, and the whole head dim, on one device).

Each array of a call is described by a layout, one letter per dimension:

    b  the batch (leading batch dims flattened)    shardable
    n  the axis attention runs independently over  shardable
    h  heads                                       shardable
    i  queries, j  keys (both S)                   never split
    d  head dim                                    never split

so q is "bnihd", k and v "bnjhd", the mask "bnj", the bias "bhij" and the log-sum-exp "bnhi".
A result whose layout has no "n" while the operands have one (the bias gradient, "bhij") is a
sum over N: with N sharded, each device sums its own rows and the partial sums are added over
N's mesh axes, in fp32. An absent mask or bias is a `(0,)` placeholder and stays replicated.
Which axes B, N and H keep is read off q's sharding; the other operands are resharded to match.

Two mechanisms, by the kind of mesh axes:

- Explicit axes (`jax.sharding.AxisType.Explicit`, the default of `jax.make_mesh`): shardings
  are part of the types at trace time, so the call becomes a `jax.shard_map` over the axes
  that split B, N and H. (On a mesh that mixes Explicit and Auto axes, only the Explicit ones
  split the blocks.)
- Auto axes (`jax.sharding.Mesh(...)`, shardings given to `jax.jit` or `device_put` only):
  XLA's partitioner decides shardings after tracing, so the call becomes a
  `jax.experimental.custom_partitioning` call with a Shardy sharding rule (and, for the older
  GSPMD partitioner, the equivalent propagation callback). It sits inside a small primitive of
  our own whose lowering picks the plain kernel call instead for `jax.export` (a
  custom-partitioned call holds a Python callback that cannot be serialised; an exported
  artefact is partitioned by whoever compiles it), inside `shard_map` (the kernel sees
  per-device blocks there already) and on one device (nothing to partition).

Like any custom-partitioned call, the auto-axes one needs the devices when it is lowered, so
a multi-device program over Auto axes lowers only where its devices are known (JAX says
"AbstractMesh cannot be used when jaxpr contains primitives that require devices"
otherwise): it exports from shardings on a concrete mesh, but not from an `AbstractMesh`,
and `Exported.serialize(vjp_order=1)`, whose VJP JAX exports over the abstract shardings it
recorded, fails for it. Over Explicit axes all of these work. (An exported program, partitioned
by whoever compiles it, holds the plain kernel calls, which XLA gathers for, as before.)
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

try:
  from jax.extend.core import Primitive
except ImportError:  # older spelling
  from jax.core import Primitive

# The layout letters that may stay sharded; every other letter is gathered when sharded.
SHARDABLE = ("b", "n", "h")
# Results without this letter are sums over it.
SUMMED = "n"
PLACEHOLDER = "z"


class Layouts(NamedTuple):
  """The layouts of a call's operands and results; `like[i]` is the operand whose sharding
  result i takes in the end (None: the shardable letters' sharding)."""

  operands: tuple[str, ...]
  results: tuple[str, ...]
  like: tuple[int | None, ...]


def _with_placeholders(layouts: Layouts, operand_shapes, result_shapes) -> Layouts:
  """The layouts with the `(0,)` stand-ins for an absent mask or bias marked as such."""
  def mark(names, shapes):
    out = []
    for name, shape in zip(names, shapes):
      if tuple(shape) == (0,):
        out.append(PLACEHOLDER)
      elif len(name) != len(shape):
        raise ValueError(f"layout {name!r} does not fit an array of shape {tuple(shape)}")
      else:
        out.append(name)
    return tuple(out)
  return layouts._replace(operands=mark(layouts.operands, operand_shapes),
                          results=mark(layouts.results, result_shapes))


def sharding_rule(layouts: Layouts) -> tuple[str, dict]:
  """The Shardy rule string of a call and its keyword arguments: B, N and H are passthrough
  factors; queries, keys, the head dim and the placeholders' dimension need replication."""
  counter = iter(range(len(layouts.operands) + len(layouts.results)))

  def factors(layout):
    return [f"{PLACEHOLDER}{next(counter)}"] if layout == PLACEHOLDER else list(layout)

  operands = [factors(x) for x in layouts.operands]
  results = [factors(x) for x in layouts.results]
  replicated = []
  for names in operands + results:
    for name in names:
      if name not in SHARDABLE and name not in replicated:
        replicated.append(name)  # in order of first appearance, as Shardy wants them
  rule = (", ".join(" ".join(f) for f in operands) + " -> "
          + ", ".join(" ".join(f) for f in results))
  return rule, {"need_replication_factors": tuple(replicated)}


def factor_axes(mesh_shape, spec, shape, layout: str) -> dict[str, tuple[str, ...]]:
  """The mesh axes each shardable letter keeps, read off one array's partition spec (q's).

  A letter keeps its axes only when they divide its size: XLA would pad uneven blocks, and the
  padding rows would be summed into the bias gradient with the real ones. Axes that shard S or
  D are dropped, which gathers along those axes only.
  """
  spec = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  axes = {}
  for letter, entry, size in zip(layout, spec, shape):
    if letter not in SHARDABLE or entry is None:
      continue
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    if names and size % math.prod(mesh_shape[name] for name in names) == 0:
      axes[letter] = names
  return axes


def spec_for(layout: str, axes: dict) -> P:
  """The partition spec of an array of `layout` given the letters' axes."""
  if layout == PLACEHOLDER:
    return P(None)
  return P(*(_entry(axes.get(letter)) for letter in layout))


def _entry(names):
  if not names:
    return None
  return names[0] if len(names) == 1 else tuple(names)


def summed_axes(layout: str, layouts: Layouts, axes: dict) -> tuple[str, ...]:
  """The mesh axes a result is summed over: N's, for a result without N of a call whose
  operands have N."""
  if layout == PLACEHOLDER or SUMMED in layout:
    return ()
  if not any(SUMMED in x for x in layouts.operands if x != PLACEHOLDER):
    return ()
  return tuple(axes.get(SUMMED, ()))


def _psum_fp32(x, axis_names):
  """x summed over the mesh axes `axis_names`, added in fp32 (the kernels' accumulation type)."""
  acc = jnp.promote_types(x.dtype, jnp.float32)
  return jax.lax.psum(x.astype(acc), tuple(axis_names)).astype(x.dtype)


def _per_device(kernel, layouts: Layouts, axes: dict):
  """The kernel on one device's blocks, with the sums over N completed across devices."""
  summed = tuple(summed_axes(x, layouts, axes) for x in layouts.results)

  def per_device(*args):
    outs = tuple(kernel(*args))
    return tuple(_psum_fp32(o, names) if names else o for o, names in zip(outs, summed))

  return per_device


# ------------------------------------------------------------------------- explicit axes


def _explicit_mesh(x):
  """The abstract mesh of x's type and its Explicit axes, or (None, ()) without any."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty:
    return None, ()
  explicit = tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                   if kind == AxisType.Explicit)
  return mesh, explicit


def _shard_map_call(kernel, layouts: Layouts, mesh, args):
  aval = jax.typeof(args[0])
  axes = factor_axes(mesh.shape, aval.sharding.spec, aval.shape, layouts.operands[0])
  in_specs = tuple(spec_for(x, axes) for x in layouts.operands)
  out_specs = tuple(spec_for(x, axes) for x in layouts.results)
  # Operands sharded otherwise (S or D split, or another axis than q's) are resharded here:
  # the gather that falls back to, on the axes that cannot stay split only.
  blocks = [_reshard(x, NamedSharding(mesh, spec)) for x, spec in zip(args, in_specs)]
  used = {name for names in axes.values() for name in names}
  if used:
    # Manual over the axes that split the blocks only: the others hold whole blocks (and
    # under vmap, the mapped axis's mesh axes are not the body's to take).
    run = jax.shard_map(_per_device(kernel, layouts, axes), mesh=mesh, in_specs=in_specs,
                        out_specs=out_specs, axis_names=used, check_vma=False)
    outs = run(*blocks)
  else:
    outs = tuple(kernel(*blocks))
  # Each result as sharded as the operand it is like (out like q, dk like k, ...).
  return tuple(o if like is None else _reshard(o, jax.typeof(args[like]).sharding)
               for o, like in zip(outs, layouts.like))


def _reshard(x, sharding):
  """x resharded to `sharding` where its type says otherwise (and `sharding` has a mesh)."""
  current = jax.typeof(x).sharding
  ndim = jax.typeof(x).ndim
  if sharding.mesh.empty or _padded(current.spec, ndim) == _padded(sharding.spec, ndim):
    return x
  return jax.sharding.reshard(x, sharding)


def _padded(spec, ndim):
  spec = tuple(spec)
  return spec + (None,) * (ndim - len(spec))


# ----------------------------------------------------------------------------- auto axes


class _Partitioned:
  """A kernel and its layouts, with the custom_partitioning rules built for them."""

  def __init__(self, kernel: Callable, layouts: Layouts):
    self.kernel = kernel
    self.layouts = layouts

  def _axes(self, mesh, arg_shapes):
    ref = arg_shapes[0]
    if not isinstance(ref.sharding, NamedSharding) or mesh is None or mesh.empty:
      return {}  # no mesh to name axes on: replicated, as an opaque call would be
    return factor_axes(mesh.shape, ref.sharding.spec, ref.shape, self.layouts.operands[0])

  def partition(self, mesh, arg_shapes, result_shape):
    del result_shape
    axes = self._axes(mesh, arg_shapes)
    arg_shardings = tuple(NamedSharding(mesh, spec_for(x, axes)) for x in self.layouts.operands)
    # Results without N are replicated over N's axes: the per-device function sums them there.
    result_shardings = tuple(NamedSharding(mesh, spec_for(x, axes))
                             for x in self.layouts.results)
    return mesh, _per_device(self.kernel, self.layouts, axes), result_shardings, arg_shardings

  def infer_sharding_from_operands(self, mesh, arg_shapes, result_shape):
    # For the GSPMD partitioner (jax_use_shardy_partitioner=False); Shardy reads the rule.
    del result_shape
    axes = self._axes(mesh, arg_shapes)
    return tuple(NamedSharding(mesh, spec_for(x, axes)) for x in self.layouts.results)

  @functools.cached_property
  def custom_call(self):
    kernel = self.kernel

    def call(*args):
      return tuple(kernel(*args))

    wrapped = custom_partitioning(call)
    rule, kwargs = sharding_rule(self.layouts)
    wrapped.def_partition(partition=self.partition,
                          infer_sharding_from_operands=self.infer_sharding_from_operands,
                          sharding_rule=rule, **kwargs)
    return wrapped


@functools.lru_cache(maxsize=None)
def _partitioned(kernel, layouts: Layouts) -> _Partitioned:
  return _Partitioned(kernel, layouts)


_sharded_kernel_p = Primitive("jevo_sharded_kernel")
_sharded_kernel_p.multiple_results = True


def _impl(*args, partitioned, out_types):
  # Eagerly, as jax runs any primitive: compiled on its own, for the arguments' devices.
  return tuple(_eager(partitioned, out_types)(*args))


@functools.lru_cache(maxsize=None)
def _eager(partitioned, out_types):
  return jax.jit(lambda *xs: _sharded_kernel_p.bind(*xs, partitioned=partitioned,
                                                    out_types=out_types))


def _abstract_eval(*avals, partitioned, out_types):
  # As the FFI call's own results: no sharding of their own (the current mesh's default) and,
  # inside shard_map, no varying axes (the caller casts them, see jevo.ops.varying).
  del avals, partitioned
  return [jax.core.ShapedArray(shape, dtype) for shape, dtype in out_types]


def plain_lowering(module_context) -> bool:
  """Whether the call lowers to the kernel call itself rather than the custom-partitioned
  call: for jax.export, inside shard_map, or without several devices to partition over."""
  if getattr(module_context.lowering_parameters, "for_export", False):
    return True
  axis_context = module_context.axis_context
  if getattr(axis_context, "manual_axes", None):
    # The kernel runs on each device's own block already. (A shard_map manual over some axes
    # only leaves the others replicated here, as an opaque call would.)
    return True
  devices = getattr(axis_context, "device_assignment", None)
  if devices is None and getattr(axis_context, "num_devices", 1) > 1:
    _warn_unpartitioned()
  return devices is None or len(devices) <= 1


@functools.lru_cache(maxsize=None)
def _warn_unpartitioned():
  warnings.warn("jevo: JAX lowered a program of several devices without telling the attention "
                "kernels' calls its devices; they run unpartitioned, on inputs gathered onto "
                "every device (this JAX keeps the list of primitives that need devices "
                "elsewhere than jevo.ops.partitioning looks)", RuntimeWarning, stacklevel=2)


def _lowering(ctx, *args, partitioned, out_types):
  del out_types
  if plain_lowering(ctx.module_context):
    fn = lambda *xs: tuple(partitioned.kernel(*xs))
  else:
    fn = partitioned.custom_call
  return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)


_sharded_kernel_p.def_impl(_impl)
_sharded_kernel_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(_sharded_kernel_p, _lowering)
# As for custom_partitioning's own primitive: the lowering needs the device assignment (which
# JAX passes only to programs holding such a primitive) to build the partitioner's mesh. JAX
# has no public spelling of this; if it moves, the lowering warns (`_warn_unpartitioned`).
try:
  from jax._src import dispatch as _dispatch
  _dispatch.prim_requires_devices_during_lowering.add(_sharded_kernel_p)
except (ImportError, AttributeError):
  pass


# ------------------------------------------------------------------------------ the call


def shard_kernel(kernel: Callable, operands: Sequence[str], results: Sequence[str],
                 like: Sequence[int | None] | None = None) -> Callable:
  """`kernel(*arrays) -> tuple of arrays` as a call partitioned over B, N and H.

  `operands` and `results` are the arrays' layouts (see the module docstring); `like[i]` names
  the operand whose sharding result i ends with under Explicit axes (out like q, dq like q,
  ...). The kernel is called on per-device blocks; it must compute each block independently of
  the others, except that a result without "n" is the sum over N of its rows' contributions.
  """
  like = tuple(like) if like is not None else (None,) * len(results)
  base = Layouts(tuple(operands), tuple(results), like)

  def call(*args):
    if len(args) != len(base.operands):
      raise TypeError(f"expected {len(base.operands)} operands, got {len(args)}")
    out_types = tuple(jax.eval_shape(
        kernel, *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args)))
    layouts = _with_placeholders(base, [x.shape for x in args], [o.shape for o in out_types])
    mesh, explicit = _explicit_mesh(args[0])
    if explicit:
      return _shard_map_call(kernel, layouts, mesh, args)
    if jax.device_count() <= 1:
      # Nothing to partition over: the kernel call itself, exactly as without this module
      # (the common single-GPU case never meets the primitive below).
      return tuple(kernel(*args))
    return tuple(_sharded_kernel_p.bind(
        *args, partitioned=_partitioned(kernel, layouts),
        out_types=tuple((tuple(o.shape), jnp.dtype(o.dtype)) for o in out_types)))

  return call
