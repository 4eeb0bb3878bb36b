"""One Evoformer (or extra-MSA) block as the benchmark runs it: random bf16 inputs, the forward
in eval mode, and the training step of one block of the stack (dropout on, the forward
recomputed in the backward pass under `jax.checkpoint`, as `remat="block"` does)."""

from __future__ import annotations


def make_block(case, implementation: str):
  """(block, (m, z, msa_mask, pair_mask)) for a BlockCase, in bf16 with fp32 parameters."""
  import jax.numpy as jnp
  from flax import nnx
  from jevo.nn import EvoformerBlock, ExtraMSABlock

  cls = ExtraMSABlock if case.extra_msa else EvoformerBlock
  block = cls(dtype=jnp.bfloat16, implementation=implementation, rngs=nnx.Rngs(0),
              **case.block_kwargs)
  from jevo.bench.implementations import host_normal
  m = host_normal(1, (case.n_seq, case.n_res, block.c_m), jnp.bfloat16)
  z = host_normal(2, (case.n_res, case.n_res, block.c_z), jnp.bfloat16)
  masks = (jnp.ones((case.n_seq, case.n_res), bool), jnp.ones((case.n_res, case.n_res), bool))
  return block, (m, z) + masks


def forward_fn(case, block):
  """(fn, args) for the inference forward: eval mode (no dropout), chunked as the case says."""
  from flax import nnx
  block.eval()
  graphdef, state = nnx.split(block)

  def forward(state, m, z, msa_mask, pair_mask):
    return nnx.merge(graphdef, state)(m, z, msa_mask, pair_mask, chunk_size=case.chunk_size)

  return forward, (state,)


def sum_of_squares(*outputs):
  """The training loss every benchmark and the planner use: the sum of squares of the outputs,
  in fp32."""
  import jax.numpy as jnp
  return sum(jnp.sum(jnp.square(o.astype(jnp.float32))) for o in outputs)


def training_step_fn(block):
  """(fn, args) for one block's training step: gradients of a sum-of-squares loss with respect to
  the parameters and both representations, dropout on, the forward under `jax.checkpoint`."""
  import jax
  from flax import nnx
  block.train()
  graphdef, params, rest = nnx.split(block, nnx.Param, ...)
  dropout_key = jax.random.key(2)

  def step(params, rest, m, z, msa_mask, pair_mask):
    @jax.checkpoint
    def forward(params, m, z):
      return nnx.merge(graphdef, params, rest)(m, z, msa_mask, pair_mask, rngs=dropout_key)

    def loss(params, m, z):
      return sum_of_squares(*forward(params, m, z))

    return jax.grad(loss, argnums=(0, 1, 2))(params, m, z)

  return step, (params, rest)
