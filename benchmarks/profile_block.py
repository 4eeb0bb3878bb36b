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

from common import block_and_inputs, parse_shape, without_command_buffers, write_profile  # benchmarks/ is the script's directory


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", type=parse_shape, default=parse_shape("128x256"),
                      help="N_SEQxN_RES")
  parser.add_argument("--implementation", default=None, choices=["cuda", "xla_chunked", "xla"])
  parser.add_argument("--steps", type=int, default=2, help="traced steps (after 2 warm-up)")
  parser.add_argument("--out", required=True, help="directory for the trace and the HLO")
  args = parser.parse_args(argv)

  # Without command buffers each kernel is attributed to its own HLO operation in the trace.
  os.environ["XLA_FLAGS"] = without_command_buffers(os.environ.get("XLA_FLAGS", ""))
  import jax
  import jax.numpy as jnp
  from flax import nnx

  n_seq, n_res = args.shape
  block, m, z, msa_mask, pair_mask = block_and_inputs(args.shape, args.implementation)
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
