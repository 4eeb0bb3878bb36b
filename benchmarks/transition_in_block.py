"""One Evoformer block's forward (inference) and forward + backward (training) with each
implementation of its two transitions, side by side in one process: what `fused_transition`'s
default ("pallas_forward" at c <= 128 on a GPU) changes for a user.

    python benchmarks/transition_in_block.py --shape 512x384 --shape 128x768
    python benchmarks/transition_in_block.py --shape 8x16 --implementations xla   # CPU smoke
"""

from __future__ import annotations

import argparse
import json

from common import block_and_inputs, median_ms, parse_shape  # benchmarks/ is the script's directory


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", type=parse_shape, action="append", default=None,
                      help="N_SEQxN_RES (repeatable; default 512x384)")
  parser.add_argument("--implementations", nargs="+", default=["xla", "default"],
                      help="transition implementations: xla, pallas, pallas_forward, or "
                           "default (None: what the modules run)")
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jevo.ops.transition import resolve_implementation

  rows = []
  for shape in args.shape or [parse_shape("512x384")]:
    block, m, z, msa_mask, pair_mask = block_and_inputs(shape, None)
    block.eval()
    for name in args.implementations:
      implementation = None if name == "default" else name
      for t in (block.msa_transition, block.pair_transition):
        t.implementation = implementation
      chosen = {t: resolve_implementation(x, getattr(block, t).linear_1.kernel[...],
                                          implementation)
                for t, x in (("msa_transition", m), ("pair_transition", z))}
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

  print("\n| shape | transitions | runs (msa, pair) | block forward ms | block fwd+bwd (remat) ms |")
  print("|---|---|---|---|---|")
  for r in rows:
    runs = ", ".join(r["runs"].values())
    print(f"| {r['shape']} | {r['implementation']} | {runs} | {r['forward_ms']} | "
          f"{r['forward_backward_ms']} |")


if __name__ == "__main__":
  main()
