"""Evoformer and extra-MSA stacks with Dynamic Axial Parallelism: one `shard_map` around the scan.

The MSA and pair representations are split once on entry and joined once on exit; between
blocks they stay split (rows layout), so the only communication inside the scan is each block's
own (see `jevo.parallel.block`). The stack's stacked parameters, `remat` setting (runs of remat
choices, such as a `jevo.plan.Plan` gives, included) and per-block dropout keys are used exactly
as `EvoformerStack.__call__` uses them.
"""

from __future__ import annotations

import jax
from flax import nnx

from jevo.nn import _common as c
from jevo.nn.block import NUM_DROPOUT_KEYS, check_block_inputs
from jevo.nn.dropout import RngsLike, draws_from_own_streams, dropout_keys, one_key
from jevo.nn.stack import (EvoformerStack, ExtraMSAStack, checkpointed_block, join_blocks,
                           remat_runs, slice_blocks)
from jevo.parallel import mesh as mesh_lib
from jevo.parallel.block import block_on_shard
from jevo.parallel.layout import DapAxis
from jevo.parallel.sharded import Masks, Sizes, run_sharded
from jevo.parallel.validation import check_module

StackLike = EvoformerStack | ExtraMSAStack


def stack_on_shard(stack: StackLike, m: jax.Array, z: jax.Array, masks: Masks,
                   keys: jax.Array | None, ax: DapAxis, sizes: Sizes, *,
                   chunk_size: c.BlockChunkSize) -> tuple[jax.Array, jax.Array]:
  """All blocks of `stack` on this device's shards (rows layout in and out).

  keys: one dropout key per block, or None to draw from the blocks' own streams (whose
  advanced state is written back to `stack.blocks`).
  """
  graphdef, params, rest = nnx.split(stack.blocks, nnx.Param, ...)

  def one_block(m, z, params_i, rest_i, key_i):
    block = nnx.merge(graphdef, params_i, rest_i)
    m, z = block_on_shard(block, m, z, masks, dropout_keys(key_i, NUM_DROPOUT_KEYS), ax, sizes,
                          chunk_size=chunk_size)
    return m, z, nnx.split(block, nnx.Param, ...)[2]

  new_rests = []
  for start, count, remat in remat_runs(stack.remat, stack.num_blocks):  # one scan per run
    run_block = checkpointed_block(one_block, remat)

    def step(carry, xs, run_block=run_block):
      m, z, rest_i = run_block(*carry, *xs)
      return (m, z), rest_i

    (m, z), run_rest = jax.lax.scan(step, (m, z), slice_blocks((params, rest, keys), start,
                                                               count))
    new_rests.append(run_rest)
  new_rest = join_blocks(new_rests)
  nnx.update(stack.blocks, new_rest)
  return m, z


def dap_evoformer_stack(stack: StackLike, m: jax.Array, z: jax.Array,
                        msa_mask: jax.Array | None = None, pair_mask: jax.Array | None = None,
                        *, mesh: mesh_lib.MeshLike | None = None,
                        axis: str = mesh_lib.DEFAULT_AXIS, rngs: RngsLike = None,
                        chunk_size: c.BlockChunkSize = None) -> tuple[jax.Array, jax.Array]:
  """`stack(m, z, msa_mask, pair_mask, rngs=rngs, chunk_size=chunk_size)`, spread over `axis`.

  `stack` is an `EvoformerStack` or an `ExtraMSAStack` (then `m` is the extra MSA). Same
  arguments, parameters and results as calling the stack itself (including its `remat`
  setting and, for the same `rngs`, the same dropout masks), computed with Dynamic Axial
  Parallelism over the devices of mesh axis `axis`; `mesh` defaults to the one set by
  `jax.set_mesh`. m and z are split along N_seq and along pair rows for the whole stack;
  sizes that do not divide by the axis size are padded and masked. Works under `jax.jit`,
  `jax.grad` and across processes (a mesh over the devices of all hosts).

  Example:
    >>> mesh = jevo.parallel.make_dap_mesh()
    >>> step = jax.jit(lambda m, z, mm, pm, key: dap_evoformer_stack(
    ...     stack, m, z, mm, pm, mesh=mesh, rngs=key))
  """
  check_module("stack", stack, (EvoformerStack, ExtraMSAStack))
  msa_mask, pair_mask = check_block_inputs(m, z, msa_mask, pair_mask, stack.c_m, stack.c_z)
  if chunk_size is None:  # an inference plan's chunk (jevo.plan)
    chunk_size = stack.default_chunk_size
  c.check_block_chunk_size(chunk_size)
  keys = None if rngs is None else jax.random.split(one_key(rngs), stack.num_blocks)

  def body(stack, m, z, masks, keys, ax, sizes):
    return stack_on_shard(stack, m, z, masks, keys, ax, sizes, chunk_size=chunk_size)

  return run_sharded(body, stack, m, z, msa_mask, pair_mask, keys, mesh=mesh, axis=axis,
                     write_back=rngs is None and draws_from_own_streams(stack))


def dap_extra_msa_stack(stack: ExtraMSAStack, e: jax.Array, z: jax.Array,
                        msa_mask: jax.Array | None = None, pair_mask: jax.Array | None = None,
                        **kwargs) -> tuple[jax.Array, jax.Array]:
  """`dap_evoformer_stack` for an `ExtraMSAStack`: e `[*B, N_extra, N_res, c_e]`, z as usual.

  Example:
    >>> e, z = dap_extra_msa_stack(extra_stack, e, z, extra_msa_mask, pair_mask, mesh=mesh)
  """
  check_module("stack", stack, (ExtraMSAStack,))
  return dap_evoformer_stack(stack, e, z, msa_mask, pair_mask, **kwargs)
