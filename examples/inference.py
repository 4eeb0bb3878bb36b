"""Evoformer inference on long sequences: the stack in eval mode, chunked along independent axes.

`chunk_size` bounds the memory of the transitions, the outer product mean, the triangle
multiplications and every attention to `chunk_size` rows at a time; with a memory-lean
attention backend the whole 48-block stack at N_res = 2048 fits one GPU. Prints the time of a
compiled forward pass and the peak device memory. Parameters are fresh (each block starts as
the identity) unless `--params` names an AlphaFold `params_model_*.npz`.

    python examples/inference.py                                                   # tiny, CPU
    python examples/inference.py --alphafold --n-res 2048 --chunk-size 128         # on a GPU
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jevo.nn import EvoformerStack
from jevo.nn.alphafold_params import load_alphafold_params
from jevo.ops import backends

TINY = dict(blocks=2, n_seq=8, n_res=24, chunk_size=5, stack=dict(
    c_m=32, c_z=16, num_heads_msa=2, c_hidden_msa_att=8, num_heads_pair=2, c_hidden_pair_att=8,
    c_hidden_opm=8, c_hidden_mul=16))
ALPHAFOLD = dict(blocks=48, n_seq=512, n_res=2048, chunk_size=128, stack=dict(c_m=256, c_z=128))


def main(argv=None) -> dict:
  """Parses the command line, runs the stack twice (compile, then timed) and returns stats."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--alphafold", action="store_true",
                      help="AlphaFold's sizes: 48 blocks, c_m 256, c_z 128, N_seq 512, N_res 2048")
  parser.add_argument("--implementation", choices=backends.NAMES,
                      help="attention backend (default: the best that runs the inputs)")
  parser.add_argument("--blocks", type=int)
  parser.add_argument("--n-seq", type=int)
  parser.add_argument("--n-res", type=int)
  parser.add_argument("--chunk-size", type=int, help="0 for no chunking")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                      help="compute dtype (default: float32 tiny, bfloat16 --alphafold)")
  parser.add_argument("--params", help="AlphaFold params_model_*.npz to load (with --alphafold)")
  args = parser.parse_args(argv)

  config = ALPHAFOLD if args.alphafold else TINY
  blocks = args.blocks or config["blocks"]
  n_seq, n_res = args.n_seq or config["n_seq"], args.n_res or config["n_res"]
  chunk_size = config["chunk_size"] if args.chunk_size is None else (args.chunk_size or None)
  dtype = jnp.dtype(args.dtype or ("bfloat16" if args.alphafold else "float32"))
  c_m, c_z = config["stack"]["c_m"], config["stack"]["c_z"]

  stack = EvoformerStack(blocks, **config["stack"], dtype=dtype, rngs=nnx.Rngs(0),
                         implementation=args.implementation)
  if args.params:
    load_alphafold_params(stack, args.params)
  stack.eval()
  graphdef, state = nnx.split(stack)
  keys = jax.random.split(jax.random.key(1), 2)
  m = jax.random.normal(keys[0], (n_seq, n_res, c_m), dtype)
  z = jax.random.normal(keys[1], (n_res, n_res, c_z), dtype)
  residues = jnp.arange(n_res) < n_res - n_res // 16  # some padding, as in a batch
  msa_mask = jnp.broadcast_to(residues, (n_seq, n_res))
  pair_mask = residues[:, None] & residues[None, :]

  @jax.jit
  def forward(state, m, z):
    return nnx.merge(graphdef, state)(m, z, msa_mask, pair_mask, chunk_size=chunk_size)

  print(f"{blocks} blocks, N_seq {n_seq}, N_res {n_res}, chunk_size {chunk_size}, "
        f"{dtype.name}, attention {args.implementation or 'automatic'}, "
        f"on {jax.devices()[0].device_kind}")
  start = time.perf_counter()
  jax.block_until_ready(forward(state, m, z))
  first = time.perf_counter() - start
  start = time.perf_counter()
  out_m, out_z = jax.block_until_ready(forward(state, m, z))
  stats = dict(first_s=first, forward_s=time.perf_counter() - start,
               finite=bool(jnp.isfinite(out_z.astype(jnp.float32)).all()))
  memory = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in memory:
    stats["peak_gib"] = memory["peak_bytes_in_use"] / 2**30
  print(f"first call (with compilation) {stats['first_s']:.1f} s, forward "
        f"{stats['forward_s']:.2f} s, outputs finite: {stats['finite']}"
        + (f", peak device memory {stats['peak_gib']:.1f} GiB" if "peak_gib" in stats else ""))
  return stats


if __name__ == "__main__":
  main()
