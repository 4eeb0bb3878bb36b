"""One Evoformer block's forward (inference) and forward + backward (training) with each
implementation of one kind of its modules (the two transitions, or the two triangle
multiplications), side by side in one process: what a fused kernel changes for a user.

    python benchmarks/implementations_in_block.py --shape 512x384 --shape 128x768
    python benchmarks/implementations_in_block.py --modules triangle_multiplications \
        --implementations xla pallas_forward --shape 128x768
    python benchmarks/implementations_in_block.py --shape 8x16 --implementations xla  # CPU smoke
"""

from __future__ import annotations

import argparse
import json

from common import block_and_inputs, median_ms, parse_shape  # benchmarks/ is the script's directory

# The block's sub-modules each choice of --modules sets, with the representation each reads.
MODULES = {
    "transitions": (("msa_transition", "m"), ("pair_transition", "z")),
    "triangle_multiplications": (("triangle_multiplication_outgoing", "z"),
                                 ("triangle_multiplication_incoming", "z")),
}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", type=parse_shape, action="append", default=None,
                      help="N_SEQxN_RES (repeatable; default 512x384)")
  parser.add_argument("--modules", choices=sorted(MODULES), default="transitions",
                      help="which modules' implementation changes")
  parser.add_argument("--implementations", nargs="+", default=["xla", "default"],
                      help="their implementations: xla, pallas_forward (and pallas for the "
                           "transitions), or default (None: what the modules run)")
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jevo.ops.transition import resolve_implementation

  def runs(module, x, implementation):
    """What the module runs undifferentiated, as it resolves `implementation` itself."""
    if args.modules == "transitions":
      return resolve_implementation(x, module.linear_1.kernel[...], implementation)
    return module.resolved_implementation(x)

  rows = []
  for shape in args.shape or [parse_shape("512x384")]:
    block, m, z, msa_mask, pair_mask = block_and_inputs(shape, None)
    block.eval()
    for name in args.implementations:
      implementation = None if name == "default" else name
      chosen = {}
      for name_, reads in MODULES[args.modules]:
        module = getattr(block, name_)
        module.implementation = implementation
        chosen[name_] = runs(module, {"m": m, "z": z}[reads], implementation)
      graphdef, params, rest = nnx.split(block, nnx.Param, ...)

      def forward(params, m, z):
        return nnx.merge(graphdef, params, rest)(m, z, msa_mask, pair_mask)

      def loss(params, m, z):
        out = jax.checkpoint(forward)(params, m, z)
        return sum(jnp.sum(jnp.square(o.astype(jnp.float32))) for o in out)

      fwd = median_ms(jax.jit(forward), (params, m, z), args.repeats, batch=5, warmup=2)
      train = median_ms(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (params, m, z),
                        args.repeats, batch=5, warmup=2)
      rows.append(dict(shape=f"{shape[0]}x{shape[1]}", implementation=name, runs=chosen,
                       forward_ms=round(fwd, 3), forward_backward_ms=round(train, 3)))
      print(json.dumps(rows[-1]), flush=True)

  print(f"\n| shape | {args.modules} | runs | block forward ms | block fwd+bwd (remat) ms |")
  print("|---|---|---|---|---|")
  for r in rows:
    runs = ", ".join(r["runs"].values())
    print(f"| {r['shape']} | {r['implementation']} | {runs} | {r['forward_ms']} | "
          f"{r['forward_backward_ms']} |")


if __name__ == "__main__":
  main()
