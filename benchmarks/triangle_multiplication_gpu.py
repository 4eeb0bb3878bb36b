"""The triangle multiplication's fused input side (Pallas) on a GPU, forward only: the module
with `implementation="xla"` against `"pallas_forward"` (outputs compared, then timed), and the
input side alone (LayerNorm, the five projections, gates and mask) against XLA's and against
colabfold-kernels' fused LayerNorm + gated dual projection, which computes four of the five
projections (not the output gate's).

    python benchmarks/triangle_multiplication_gpu.py [--sizes 384 768] [--repeats 30]

Inputs: bfloat16 pair activations, float32 parameters, random pair masks with about 10% of
entries masked; c_z = c_hidden = 128 (AlphaFold's).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jevo.bench.measure import median_ms  # noqa: E402
from jevo.nn import TriangleMultiplication  # noqa: E402
from jevo.ops import gated_projections as op  # noqa: E402

C = 128


def log(*args):
  print(*args, flush=True)


def module_pair(outgoing: bool):
  """(xla module, pallas_forward module) with the same random parameters."""
  xla = TriangleMultiplication(C, C, outgoing=outgoing, dtype=jnp.bfloat16,
                               implementation="xla", rngs=nnx.Rngs(0))
  # Random parameters around the initial ones (AlphaFold's gates start at zero weights).
  params = nnx.state(xla, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  leaves = [x + 0.1 * jax.random.normal(jax.random.key(100 + i), x.shape, x.dtype)
            for i, x in enumerate(leaves)]
  nnx.update(xla, jax.tree.unflatten(tree, leaves))
  fused = TriangleMultiplication(C, C, outgoing=outgoing, dtype=jnp.bfloat16,
                                 implementation="pallas_forward", rngs=nnx.Rngs(0))
  nnx.update(fused, nnx.state(xla))
  return xla, fused


def inputs(n: int):
  z = jax.random.normal(jax.random.key(1), (n, n, C), jnp.bfloat16)
  mask = (jax.random.uniform(jax.random.key(2), (n, n)) > 0.1).astype(jnp.bfloat16)
  return z, mask


def jitted(module):
  """The module's forward as a plain jitted function of its state (nnx.jit's per-call graph
  traversal costs more host time than the kernels take at these sizes)."""
  graphdef, state = nnx.split(module)
  fn = jax.jit(lambda state, z, mask: nnx.merge(graphdef, state)(z, mask))
  return lambda z, mask: fn(state, z, mask)


def time_module(module, z, mask, repeats):
  return median_ms(jitted(module), (z, mask), repeats, batch=5)["ms"]


def input_side_args(module):
  layers = (module.left_projection, module.left_gate, module.right_projection,
            module.right_gate, module.output_gate)
  return (module.layer_norm_in.scale[...], module.layer_norm_in.bias[...],
          [l.kernel[...] for l in layers], [l.bias[...] for l in layers])


def time_input_sides(module, z, mask, repeats) -> dict:
  scale, offset, kernels, biases = input_side_args(module)
  m = mask[..., None]
  out = {}
  xla_side = jax.jit(lambda z, m: module.projections(module.layer_norm_in(z), m,
                                                     output_gate=True))
  out["jevo XLA"] = median_ms(xla_side, (z, m), repeats, batch=5)["ms"]
  fused = jax.jit(lambda z, m: op.fused(z, m, scale, offset, kernels, biases,
                                        eps=module.layer_norm_in.epsilon, dtype=jnp.bfloat16))
  out["jevo fused (5 projections)"] = median_ms(fused, (z, m), repeats, batch=5)["ms"]
  try:
    from colabfold_kernels import tri_mul
  except ImportError as err:
    log(f"colabfold-kernels not importable: {err}")
    return out
  wp = jnp.concatenate([kernels[0], kernels[2]], 1).astype(jnp.bfloat16)
  wg = jnp.concatenate([kernels[1], kernels[3]], 1).astype(jnp.bfloat16)
  bp = jnp.concatenate([biases[0], biases[2]]).astype(jnp.bfloat16)
  bg = jnp.concatenate([biases[1], biases[3]]).astype(jnp.bfloat16)
  cf = jax.jit(lambda z, mask: tri_mul.ln_gated_dual_proj(
      z, scale.astype(jnp.bfloat16), offset.astype(jnp.bfloat16), wp, bp, wg, bg, mask))
  out["colabfold fused (4 projections)"] = median_ms(cf, (z, mask), repeats, batch=5)["ms"]
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", type=int, nargs="+", default=[384, 768])
  p.add_argument("--repeats", type=int, default=30)
  args = p.parse_args(argv)
  log(jax.devices()[0].device_kind, "jax", jax.__version__)
  rows = []
  for n in args.sizes:
    z, mask = inputs(n)
    for outgoing in (True, False):
      name = f"{'outgoing' if outgoing else 'incoming'} {n}x{n}x{C}"
      try:
        xla, fused = module_pair(outgoing)
        want = jitted(xla)(z, mask).astype(jnp.float32)
        got = jitted(fused)(z, mask).astype(jnp.float32)
        err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        t_xla, t_fused = time_module(xla, z, mask, args.repeats), time_module(
            fused, z, mask, args.repeats)
        rows.append((name, "module fwd", f"xla {t_xla:.3f}", f"pallas_forward {t_fused:.3f}",
                     f"max err / max |out| {err:.2e}"))
        if outgoing:
          sides = time_input_sides(xla, z, mask, args.repeats)
          rows.append((name, "input side fwd",
                       *(f"{k} {v:.3f}" for k, v in sides.items())))
      except Exception as e:  # one failure must not hide the other results
        log(f"!! {name} failed: {type(e).__name__}: {str(e)[:1500]}")
        log("".join(traceback.format_exception(e)[-5:])[-2500:])
      for row in rows[-2:]:
        log(" | ".join(row))
  log("\n## triangle multiplication, forward ms (median)")
  for row in rows:
    log("| " + " | ".join(row) + " |")


if __name__ == "__main__":
  main()
