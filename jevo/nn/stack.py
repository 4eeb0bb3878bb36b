"""Evoformer and extra-MSA stacks: one scan over blocks whose parameters are stacked.

Blocks are created with `nnx.vmap` (one set of stacked arrays, leading axis = block) and
applied with `jax.lax.scan`, so compile time does not grow with depth. `remat` selects what
each block keeps for the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jevo.nn import _common as c
from jevo.nn import policies
from jevo.nn.block import EvoformerBlock, ExtraMSABlock, check_block_inputs
from jevo.nn.dropout import RngsLike, draws_from_own_streams, one_key
from jevo.nn.offload import offloaded_scan
from jevo.nn.policies import BLOCK_INPUT_NAMES

RematLike = str | Callable | None

REMAT_CHOICES = ("none", "block", "offload")

# Compile a training step that uses remat="offload" with these options (jax.jit(...,
# compiler_options=OFFLOAD_COMPILER_OPTIONS)). XLA's default command buffers (CUDA graphs)
# include dynamic-slice fusions, which capture the copies between host and device memory:
# inside a graph they no longer overlap the blocks' work, which cost 1.70 s against 1.48 s
# per step at N_seq 512 x N_res 384 on an H200. Other backends ignore the option.
OFFLOAD_COMPILER_OPTIONS = {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"}

def checkpointed_block(one_block: Callable, remat: RematLike) -> Callable:
  """`one_block(m, z, *rest)` with m and z named `BLOCK_INPUT_NAMES` and wrapped as `remat`
  asks; the scans of the stacks apply their blocks through this (on one device, all but
  remat="offload", which goes through `offloaded_scan`)."""
  def named(m, z, *rest):
    return one_block(checkpoint_name(m, BLOCK_INPUT_NAMES[0]),
                     checkpoint_name(z, BLOCK_INPUT_NAMES[1]), *rest)

  if remat == "none":
    return named
  if remat == "block":
    return jax.checkpoint(named, prevent_cse=False)
  policy = policies.offload_block_inputs if remat == "offload" else remat
  return jax.checkpoint(named, policy=policy, prevent_cse=False)


def _check_one_remat(remat: RematLike) -> RematLike:
  if remat is None or remat in REMAT_CHOICES or (callable(remat) and not isinstance(remat, str)):
    return "none" if remat is None else remat
  raise ValueError(f"remat must be one of {REMAT_CHOICES}, None, a jax.checkpoint policy "
                   f"(e.g. jevo.nn.policies.save_linear_outputs) or runs of (blocks, remat) "
                   f"pairs, got {remat!r}")


def _check_remat(remat, num_blocks: int):
  """One remat for every block, or runs: a tuple of (blocks, remat) pairs, in block order,
  whose block counts add up to `num_blocks` (what a `jevo.plan.Plan` gives)."""
  if isinstance(remat, (tuple, list)):
    runs = []
    for run in remat:
      if (not isinstance(run, (tuple, list)) or len(run) != 2 or not isinstance(run[0], int)
          or isinstance(run[0], bool) or run[0] <= 0):
        raise ValueError(f"remat runs must be (blocks, remat) pairs with a positive block "
                         f"count, got {run!r}")
      runs.append((run[0], _check_one_remat(run[1])))
    total = sum(n for n, _ in runs)
    if total != num_blocks:
      raise ValueError(f"remat runs must cover the stack's {num_blocks} blocks, got runs of "
                       f"{[n for n, _ in runs]} = {total} blocks")
    return tuple(runs)
  return _check_one_remat(remat)


def remat_runs(remat, num_blocks: int) -> list[tuple[int, int, RematLike]]:
  """(first block, blocks, remat) of each run of a stack's (checked) `remat`: one run for a
  single choice, one per (blocks, remat) pair otherwise. Both the one-device scan and DAP's
  scan go through this."""
  pairs = remat if isinstance(remat, tuple) else ((num_blocks, remat),)
  runs, start = [], 0
  for count, choice in pairs:
    runs.append((start, count, choice))
    start += count
  return runs


def slice_blocks(tree, start: int, count: int):
  """Blocks [start, start + count) of stacked per-block arrays (None stays None)."""
  return jax.tree.map(lambda a: a[start:start + count], tree)


def join_blocks(parts: list):
  """The runs' stacked per-block arrays put back in block order (`slice_blocks` undone)."""
  return parts[0] if len(parts) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *parts)


class _Stack(nnx.Module):
  _block_cls: type[EvoformerBlock]

  def __init__(self, num_blocks: int, c_m: int, c_z: int, *, remat: RematLike, rngs: nnx.Rngs,
               plan=None, **block_kwargs):
    c.check_positive("num_blocks", num_blocks)
    self.num_blocks = num_blocks
    self.c_m, self.c_z = c_m, c_z
    # What a planner needs to build the same blocks (jevo.plan.plan_stack).
    self.block_config = tuple(sorted(dict(block_kwargs, c_m=c_m, c_z=c_z).items()))
    self.default_chunk_size = None
    if plan is not None:
      if plan.blocks != num_blocks:
        raise ValueError(f"plan is for {plan.blocks} blocks, the stack has {num_blocks}")
      remat = plan.stack_remat if plan.training else remat
      self.default_chunk_size = plan.chunk_size
    self.remat = _check_remat(remat, num_blocks)
    block_cls = self._block_cls

    @nnx.split_rngs(splits=num_blocks)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return block_cls(c_m, c_z, rngs=rngs, **block_kwargs)

    self.blocks = make_blocks(rngs)

  def __call__(self, m: jax.Array, z: jax.Array, msa_mask: jax.Array | None = None,
               pair_mask: jax.Array | None = None, *, rngs: RngsLike = None,
               chunk_size: c.BlockChunkSize = None) -> tuple[jax.Array, jax.Array]:
    msa_mask, pair_mask = check_block_inputs(m, z, msa_mask, pair_mask, self.c_m, self.c_z)
    if chunk_size is None:
      chunk_size = self.default_chunk_size
    c.check_block_chunk_size(chunk_size)
    graphdef, params, rest = nnx.split(self.blocks, nnx.Param, ...)
    keys = None
    if rngs is not None:
      keys = jax.random.split(one_key(rngs), self.num_blocks)

    def one_block(m, z, params_i, rest_i, key_i, masks):
      block = nnx.merge(graphdef, params_i, rest_i)
      m, z = block(m, z, *masks, rngs=key_i, chunk_size=chunk_size)
      # Dropout RNG counters advance inside the block; they come back out of the scan.
      return m, z, nnx.split(block, nnx.Param, ...)[2]

    masks = (msa_mask, pair_mask)

    def scan_body(block_fn):
      def body(carry, xs, masks):
        m, z, rest_i = block_fn(*carry, *xs, masks)
        return (m, z), rest_i
      return body

    new_rests = []
    for start, count, remat in remat_runs(self.remat, self.num_blocks):  # one scan per run
      xs = slice_blocks((params, rest, keys), start, count)
      if remat == "offload":
        # Block inputs on the host, fetched one block ahead in the backward pass.
        (m, z), run_rest = offloaded_scan(scan_body(one_block), (m, z), xs, masks)
      else:
        body = scan_body(checkpointed_block(one_block, remat))
        (m, z), run_rest = jax.lax.scan(lambda c, x: body(c, x, masks), (m, z), xs)
      new_rests.append(run_rest)
    new_rest = join_blocks(new_rests)
    if keys is None and draws_from_own_streams(self.blocks):
      nnx.update(self.blocks, new_rest)
    return m, z


class EvoformerStack(_Stack):
  """`num_blocks` Evoformer blocks, scanned; `(m, z) -> (m, z)`.

  `remat`: "none", "block" (recompute each block in the backward pass, keeping only its
  inputs), "offload" (as "block", with those inputs held in pinned host memory between the
  forward and the backward pass, so that device memory no longer grows with depth; the
  backward pass copies the next block's inputs back while it works on the current one, so
  compile the step with `compiler_options=OFFLOAD_COMPILER_OPTIONS` to keep those copies out
  of XLA's command buffers; a jitted step then returns arrays typed with memory kind "device",
  so put its first inputs there too, as `examples/train_step.py` does, or its second call
  compiles again) or a `jax.checkpoint` policy: one of `jevo.nn.policies`
  (`save_linear_outputs`, `save_all_products`, ...), which name what they keep, or any other;
  or runs of `(blocks, remat)` pairs in block order, one scan each. `plan` (a
  `jevo.plan.Plan`, from `jevo.plan.plan_stack`) sets the runs of a training plan, or the
  default `chunk_size` of an inference plan.
  Other keyword arguments (sizes, dropout, `implementation`, `dtype`, ...) go to
  `EvoformerBlock`. Call arguments as for `EvoformerBlock` (masks broadcastable to
  `[*B, N_seq, N_res]` and `[*B, N_res, N_res]`); a call-time `rngs` gives each block its own
  dropout key.

  Example:
    >>> stack = EvoformerStack(2, 32, 16, num_heads_msa=2, c_hidden_msa_att=8, num_heads_pair=2,
    ...                        c_hidden_pair_att=8, c_hidden_opm=4, c_hidden_mul=8,
    ...                        remat="block", rngs=nnx.Rngs(0))
    >>> stack.eval()
    >>> m, z = stack(jnp.ones((3, 5, 32)), jnp.ones((5, 5, 16)), chunk_size=2)
  """

  _block_cls = EvoformerBlock

  def __init__(self, num_blocks: int = 48, c_m: int = 256, c_z: int = 128, *,
               remat: RematLike = "none", rngs: nnx.Rngs, **block_kwargs):
    super().__init__(num_blocks, c_m, c_z, remat=remat, rngs=rngs, **block_kwargs)


class ExtraMSAStack(_Stack):
  """`num_blocks` extra-MSA blocks (global column attention), scanned; `(e, z) -> (e, z)`.

  Options as for `EvoformerStack`; other keyword arguments go to `ExtraMSABlock`. AlphaFold
  keeps only the pair output.

  Example:
    >>> stack = ExtraMSAStack(2, 16, 16, num_heads_msa=2, c_hidden_msa_att=8, num_heads_pair=2,
    ...                       c_hidden_pair_att=8, c_hidden_opm=4, c_hidden_mul=8,
    ...                       rngs=nnx.Rngs(0))
    >>> e, z = stack(jnp.ones((9, 5, 16)), jnp.ones((5, 5, 16)))
  """

  _block_cls = ExtraMSABlock

  def __init__(self, num_blocks: int = 4, c_e: int = 64, c_z: int = 128, *,
               remat: RematLike = "none", rngs: nnx.Rngs, **block_kwargs):
    super().__init__(num_blocks, c_e, c_z, remat=remat, rngs=rngs, **block_kwargs)
