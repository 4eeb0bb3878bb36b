"""Where one Evoformer block's training time goes: forward + backward of each sub-module alone.

One block at AlphaFold's sizes in bf16 (fp32 parameters), all positions valid, dropout off.
Each sub-module is jit-compiled on its own and timed for the forward plus the gradients of its
parameters and inputs; the whole block (its forward recomputed under remat, as the stack runs
it) is timed the same way, and the difference to the sum is the residual adds, dropout and the
glue between modules.

    python benchmarks/evoformer_breakdown.py --shape 512x384
    python benchmarks/evoformer_breakdown.py --shape 8x16 --implementation xla   # CPU smoke
"""

from __future__ import annotations

import argparse
import json

from common import BLOCK_SUBMODULES, block_and_inputs, median_ms, parse_shape  # benchmarks/ is the script's directory

# Which representations each sub-module reads ("m", "mz"); the others read only z.
READS = {"msa_row_attention": "mz", "msa_column_attention": "m", "msa_transition": "m",
         "outer_product_mean": "m"}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", type=parse_shape, default=parse_shape("512x384"),
                      help="N_SEQxN_RES")
  parser.add_argument("--implementation", default=None, choices=["cuda", "xla_chunked", "xla"])
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from flax import nnx

  n_seq, n_res = args.shape
  block, m, z, msa_mask, pair_mask = block_and_inputs(args.shape, args.implementation)
  block.eval()

  def timed(module, call):
    """Median ms of forward + gradients (parameters and inputs) of call(module, m, z)."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, m, z):
      out = call(nnx.merge(graphdef, params, rest), m, z)
      return sum(jnp.sum(jnp.square(o.astype(jnp.float32))) for o in jax.tree.leaves(out))

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    # Calls queued back to back, so that host dispatch overlaps the device work of small modules.
    return median_ms(step, (params, m, z), args.repeats, batch=5, warmup=2)

  calls = {
      "m": lambda mod, m, z: mod(m, msa_mask),
      "mz": lambda mod, m, z: mod(m, z, msa_mask),
      "z": lambda mod, m, z: mod(z, pair_mask),
  }
  rows = [(name, timed(getattr(block, name), calls[READS.get(name, "z")]))
          for name in BLOCK_SUBMODULES]
  whole = timed(block, jax.checkpoint(lambda mod, m, z: mod(m, z, msa_mask, pair_mask)))
  total = sum(ms for _, ms in rows)
  rows.append(("rest (adds, dropout, glue; whole block under remat minus the sum)", whole - total))
  rows.append(("whole block under remat", whole))

  print(f"| sub-module ({n_seq} x {n_res}, {jax.devices()[0].device_kind}) | fwd+bwd ms | share |")
  print("|---|---|---|")
  for name, ms in rows:
    print(f"| {name} | {ms:.2f} | {100 * ms / whole:.0f}% |")
  print(json.dumps(dict(shape=args.shape, device=jax.devices()[0].device_kind,
                        rows=dict(rows))))


if __name__ == "__main__":
  main()
