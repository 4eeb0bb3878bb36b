"""A jit-compiled training step of an Evoformer stack: optax AdamW, a distogram loss, dropout on.

The stack updates a synthetic MSA and pair representation; a linear distogram head (symmetrised,
as AlphaFold's) is trained with cross-entropy against random distance bins over the valid
residue pairs. The step is a pure function of (params, optimizer state, batch, key), so it
compiles once; dropout keys are explicit.

    python examples/train_step.py                                   # tiny sizes, CPU, seconds
    python examples/train_step.py --alphafold --implementation cuda # AlphaFold's sizes, on a GPU
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jevo.nn import OFFLOAD_COMPILER_OPTIONS, EvoformerStack
from jevo.ops import backends

NUM_BINS = 64

# Tiny sizes run on a CPU in seconds; AlphaFold's are the module defaults (c_m 256, c_z 128,
# 8 x 32 MSA heads, 4 x 32 pair heads, ...) with 48 blocks and a training crop.
TINY = dict(blocks=2, n_seq=8, n_res=16, stack=dict(
    c_m=32, c_z=16, num_heads_msa=2, c_hidden_msa_att=8, num_heads_pair=2, c_hidden_pair_att=8,
    c_hidden_opm=8, c_hidden_mul=16))
ALPHAFOLD = dict(blocks=48, n_seq=128, n_res=256, stack=dict(c_m=256, c_z=128))


class DistogramModel(nnx.Module):
  """Evoformer stack -> symmetrised distogram logits `[*, N_res, N_res, NUM_BINS]`."""

  def __init__(self, num_blocks: int, *, stack_kwargs: dict, rngs: nnx.Rngs):
    self.evoformer = EvoformerStack(num_blocks, rngs=rngs, **stack_kwargs)
    self.distogram = nnx.Linear(stack_kwargs["c_z"], NUM_BINS, rngs=rngs)

  def __call__(self, batch: dict, *, rngs=None) -> jax.Array:
    _, z = self.evoformer(batch["msa"], batch["pair"], batch["msa_mask"], batch["pair_mask"],
                          rngs=rngs)
    logits = self.distogram(z.astype(jnp.float32))
    return logits + jnp.swapaxes(logits, -2, -3)


def loss_fn(model: DistogramModel, batch: dict, key: jax.Array) -> jax.Array:
  logits = model(batch, rngs=key)
  errors = optax.softmax_cross_entropy_with_integer_labels(logits, batch["bins"])
  mask = batch["pair_mask"].astype(jnp.float32)
  return jnp.sum(errors * mask) / (jnp.sum(mask) + 1e-8)


def synthetic_batch(key: jax.Array, n_seq: int, n_res: int, c_m: int, c_z: int, dtype) -> dict:
  """Random embedded MSA and pair, masks with the last eighth of the residues padded."""
  k = jax.random.split(key, 4)
  residues = jnp.arange(n_res) < n_res - max(1, n_res // 8)
  msa_mask = (jax.random.uniform(k[2], (n_seq, n_res)) > 0.1) & residues
  bins = jax.random.randint(k[3], (n_res, n_res), 0, NUM_BINS)
  return dict(msa=jax.random.normal(k[0], (n_seq, n_res, c_m), dtype),
              pair=jax.random.normal(k[1], (n_res, n_res, c_z), dtype),
              msa_mask=msa_mask, pair_mask=residues[:, None] & residues[None, :],
              bins=jnp.minimum(bins, bins.T))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    compiler_options: dict | None = None):
  """The compiled step: (params, opt_state, rest, batch, key) -> (params, opt_state, loss)."""

  @functools.partial(jax.jit, donate_argnums=(0, 1), compiler_options=compiler_options)
  def train_step(params, opt_state, rest, batch, key):
    def loss_of(params):
      return loss_fn(nnx.merge(graphdef, params, rest), batch, key)

    loss, grads = jax.value_and_grad(loss_of)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def main(argv=None) -> list[float]:
  """Parses the command line, trains for `--steps` steps and returns the losses."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--alphafold", action="store_true",
                      help="AlphaFold's sizes: 48 blocks, c_m 256, c_z 128, N_seq 128, N_res 256")
  parser.add_argument("--implementation", choices=backends.NAMES,
                      help="attention backend (default: the best that runs the inputs)")
  parser.add_argument("--blocks", type=int, help="override the number of blocks")
  parser.add_argument("--n-seq", type=int, help="override N_seq")
  parser.add_argument("--n-res", type=int, help="override N_res")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                      help="compute dtype (default: float32 tiny, bfloat16 --alphafold)")
  parser.add_argument("--remat", choices=["none", "block", "offload"],
                      help="rematerialisation (default: none tiny, block --alphafold)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  config = ALPHAFOLD if args.alphafold else TINY
  blocks = args.blocks or config["blocks"]
  n_seq, n_res = args.n_seq or config["n_seq"], args.n_res or config["n_res"]
  dtype = jnp.dtype(args.dtype or ("bfloat16" if args.alphafold else "float32"))
  stack_kwargs = dict(config["stack"], dtype=dtype,
                      remat=args.remat or ("block" if args.alphafold else "none"),
                      implementation=args.implementation)

  key = jax.random.key(args.seed)
  model = DistogramModel(blocks, stack_kwargs=stack_kwargs, rngs=nnx.Rngs(args.seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(args.lr, weight_decay=1e-4)
  opt_state = tx.init(params)
  # Commit the state to device memory as the step returns it: otherwise a step whose residuals
  # live in host memory (remat="offload") returns state typed with an explicit memory kind and
  # the second step compiles again.
  on_device = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device")
  params, opt_state, rest = jax.device_put((params, opt_state, rest), on_device)
  train_step = make_train_step(
      graphdef, tx, OFFLOAD_COMPILER_OPTIONS if stack_kwargs["remat"] == "offload" else None)
  batch = synthetic_batch(jax.random.fold_in(key, 0), n_seq, n_res, stack_kwargs["c_m"],
                          stack_kwargs["c_z"], dtype)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"{blocks} blocks, N_seq {n_seq}, N_res {n_res}, {num_params / 1e6:.2f} M params, "
        f"{dtype.name}, remat {stack_kwargs['remat']}, "
        f"attention {args.implementation or 'automatic'}, "
        f"on {jax.devices()[0].device_kind}")
  losses = []
  for step in range(args.steps):
    start = time.perf_counter()
    params, opt_state, loss = train_step(params, opt_state, rest, batch,
                                         jax.random.fold_in(key, step + 1))
    losses.append(float(loss))  # waits for the step
    note = " (includes compilation)" if step == 0 else ""
    print(f"step {step}: loss {losses[-1]:.4f}, {1e3 * (time.perf_counter() - start):.1f} ms{note}")
  return losses


if __name__ == "__main__":
  main()
