"""Forward time of the attention kernels with a random key mask (10% of keys masked, as in the
profile benchmark's cases) against no mask and a padding mask (the last keys masked, as
AlphaFold's inputs are): tiles whose keys are all there and unmasked skip the mask's selects.

    python benchmarks/mask_density.py --implementations cuda_sm80 cuda_sm90
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jevo
from jevo.bench import implementations, measure, presets

CASES = {case.name: case for case in presets.PRESETS["kernels"].attention}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--cases", nargs="+", default=["msa_row", "tri_384"], choices=sorted(CASES))
  p.add_argument("--implementations", nargs="+", default=["cuda"])
  p.add_argument("--repeats", type=int, default=20)
  args = p.parse_args(argv)
  print("| case | implementation | random 10% mask | padding mask (last 5% of keys) | no mask |")
  print("|---|---|---|---|---|")
  for name in args.cases:
    case = CASES[name]
    q, k, v, mask, bias = implementations.random_inputs(case, 0, jnp.bfloat16)
    s = case.shape[2]
    padding = jax.device_put(np.broadcast_to(np.arange(s) < s - s // 20, mask.shape))
    for impl in args.implementations:
      fwd = jax.jit(lambda q, k, v, m, b, impl=impl: jevo.evoformer_attention(
          q, k, v, mask=m, bias=b, implementation=impl))
      times = [measure.median_ms(fwd, (q, k, v, m, bias), args.repeats, batch=5)["ms"]
               for m in (mask, padding, None)]
      print(f"| {name} | {impl} | " + " | ".join(f"{t:.3f}" for t in times) + " |")


if __name__ == "__main__":
  main()
