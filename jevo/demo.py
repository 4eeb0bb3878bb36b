"""`python -m jevo.demo`: MSA row attention with pair bias on the best backend available here.

Prints the backend chosen, the shape, forward and forward+backward times (jitted, median of a
few runs) and the difference from the "xla" reference backend on the same inputs. Runs on a CPU
in seconds; on a GPU with the compiled kernels it runs them.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jevo
from jevo.bench.measure import median_ms
from jevo.ops import resolve_implementation


def make_inputs(b, n, s, h, d, dtype, seed=0):
  """Random q, k, v `[B, N, S, H, D]`, a key mask and a pair bias, as MSA row attention has."""
  kq, kk, kv, km, kb = jax.random.split(jax.random.key(seed), 5)
  q, k, v = (jax.random.normal(key, (b, n, s, h, d), dtype) for key in (kq, kk, kv))
  mask = jax.random.bernoulli(km, 0.9, (b, n, 1, 1, s))
  bias = jax.random.normal(kb, (b, 1, h, s, s), dtype)
  return q, k, v, mask, bias


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", type=int, nargs=5, default=(1, 64, 128, 8, 32),
                      metavar=("B", "N", "S", "H", "D"),
                      help="batch, MSA rows, residues, heads, head dim (default: %(default)s)")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)

  q, k, v, mask, bias = make_inputs(*args.shape, jnp.dtype(args.dtype))
  backend = resolve_implementation(q, k, v, mask=mask, bias=bias)
  status = jevo.cuda_status()
  print(f"jevo {jevo.__version__} on {jax.devices()[0].platform}; CUDA kernels: "
        f"{'available' if status.available else 'unavailable (' + status.reason + ')'}")
  print(f"backend: {backend}")
  print(f"shape (B, N, S, H, D): {tuple(args.shape)}, {args.dtype}, with mask and pair bias")

  def forward(q, k, v, mask, bias, implementation=None):
    return jevo.evoformer_attention(q, k, v, mask=mask, bias=bias, implementation=implementation)

  def loss(q, k, v, bias):
    return jnp.sum(forward(q, k, v, mask, bias).astype(jnp.float32) ** 2)

  fwd = jax.jit(forward)
  fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  for name, fn, fn_args in (("forward", fwd, (q, k, v, mask, bias)),
                            ("forward+backward", fwd_bwd, (q, k, v, bias))):
    ms = median_ms(fn, fn_args, args.repeats, warmup=1)["ms"]
    print(f"{name + ':':17} {ms:9.2f} ms")

  out = fwd(q, k, v, mask, bias).astype(jnp.float32)
  ref = jax.jit(forward, static_argnames="implementation")(q, k, v, mask, bias,
                                                           implementation="xla")
  ref = ref.astype(jnp.float32)
  err = float(jnp.max(jnp.abs(out - ref)))
  print(f"max |out - xla reference| = {err:.3g} (max |reference| = "
        f"{float(jnp.max(jnp.abs(ref))):.3g})")


if __name__ == "__main__":
  main()
