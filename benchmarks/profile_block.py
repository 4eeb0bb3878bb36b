"""Profiles one Evoformer block's training step (forward recomputed under remat, backward) on the
device: writes a jax.profiler trace and the optimised HLO of the step, for
`benchmarks/summarize_profile.py` to turn into a table of where the device time goes.

One block at AlphaFold's sizes in bf16 with fp32 parameters, dropout on, as the 48-block stack
runs it (`remat="block"`).

    python benchmarks/profile_block.py --shape 128x256 --out /tmp/prof
    python benchmarks/summarize_profile.py /tmp/prof
"""

from __future__ import annotations

import argparse
import os

from common import parse_shape, write_profile  # benchmarks/ is the script's directory


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", type=parse_shape, default=parse_shape("128x256"),
                      help="N_SEQxN_RES")
  parser.add_argument("--implementation", default=None, choices=["cuda", "xla_chunked", "xla"])
  parser.add_argument("--steps", type=int, default=2, help="traced steps (after 2 warm-up)")
  parser.add_argument("--out", required=True, help="directory for the trace and the HLO")
  args = parser.parse_args(argv)

  # Without command buffers each kernel is attributed to its own HLO operation in the trace.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_gpu_enable_command_buffer=")
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jevo.nn import EvoformerBlock

  n_seq, n_res = args.shape
  block = EvoformerBlock(dtype=jnp.bfloat16, implementation=args.implementation,
                         rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(1), 2)
  m = jax.random.normal(keys[0], (n_seq, n_res, 256), jnp.bfloat16)
  z = jax.random.normal(keys[1], (n_res, n_res, 128), jnp.bfloat16)
  msa_mask = jnp.ones((n_seq, n_res), bool)
  pair_mask = jnp.ones((n_res, n_res), bool)
  graphdef, params, rest = nnx.split(block, nnx.Param, ...)

  dropout_key = jax.random.key(2)

  @jax.checkpoint
  def forward(params, rest, m, z):
    return nnx.merge(graphdef, params, rest)(m, z, msa_mask, pair_mask, rngs=dropout_key)

  def loss(params, rest, m, z):
    m_out, z_out = forward(params, rest, m, z)
    return (jnp.sum(jnp.square(m_out.astype(jnp.float32)))
            + jnp.sum(jnp.square(z_out.astype(jnp.float32))))

  step = jax.jit(jax.grad(loss, argnums=(0, 2, 3)))
  compiled = step.lower(params, rest, m, z).compile()
  for _ in range(2):
    jax.block_until_ready(compiled(params, rest, m, z))
  write_profile(args.out, f"block_{n_seq}x{n_res}", compiled, (params, rest, m, z), args.steps)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
