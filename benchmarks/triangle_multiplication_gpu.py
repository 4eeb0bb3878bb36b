"""The triangle multiplication's fused kernels (Pallas) on a GPU, forward only: the module
with `implementation="xla"` against `"pallas_forward"` (outputs compared, then timed); the
input side alone (LayerNorm, the five projections, gates and mask) against XLA's and against
colabfold-kernels' fused LayerNorm + gated dual projection, which computes four of the five
projections (not the output gate's); and the output side (centre LayerNorm, output projection,
gate) fused (`jevo.ops.triangle_epilogue_pallas`) against XLA's and colabfold-kernels' fused
epilogue, with the whole forward composed of each library's two kernels; with `--chunk-sizes`,
the module chunked by rows too (XLA's chunked path against the kernels').

    python benchmarks/triangle_multiplication_gpu.py [--sizes 384 768] [--repeats 30] \
        [--chunk-sizes 192]

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


def jitted(module, chunk_size=None):
  """The module's forward as a plain jitted function of its state (nnx.jit's per-call graph
  traversal costs more host time than the kernels take at these sizes)."""
  graphdef, state = nnx.split(module)
  fn = jax.jit(lambda state, z, mask: nnx.merge(graphdef, state)(z, mask, chunk_size=chunk_size))
  return lambda z, mask: fn(state, z, mask)


def time_module(module, z, mask, repeats, chunk_size=None):
  return median_ms(jitted(module, chunk_size), (z, mask), repeats, batch=5)["ms"]


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
  four = jax.jit(lambda z, m: op.fused(z, m, scale, offset, kernels[:4], biases[:4],
                                       eps=module.layer_norm_in.epsilon, dtype=jnp.bfloat16,
                                       channel_major=True))
  out["jevo fused (4 projections)"] = median_ms(four, (z, m), repeats, batch=5)["ms"]
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


def product_cm(module, left, right):
  """The product over k, channel-major [c, N, N], of channel-major operands."""
  if module.outgoing:
    return jnp.einsum("cik,cjk->cij", left, right)
  return jnp.einsum("ckj,cki->cij", left, right)


def time_output_sides(module, z, mask, repeats) -> dict:
  """From the fused input side's channel-major left, right and gate logits to the module's
  output: XLA's product and `finish`, the product and the fused output side
  (`jevo.ops.triangle_epilogue_pallas`), and (outgoing) colabfold-kernels' fused epilogue,
  which recomputes the output gate from z; then the whole forward composed of jevo's two fused
  kernels, and of colabfold-kernels' two, beside the largest output difference; and the same
  with jevo's output gate computed in the output side from z (`triangle_epilogue_gate_from_z`,
  the input side then running four projections)."""
  from jevo.ops import triangle_epilogue_pallas as te
  scale, offset, kernels, biases = input_side_args(module)
  eps = module.layer_norm_in.epsilon
  n = z.shape[0]
  m = mask[..., None]
  input_side = jax.jit(lambda z, m: op.fused(z, m, scale, offset, kernels, biases, eps=eps,
                                             dtype=jnp.bfloat16, channel_major=True))
  left, right, gate = input_side(z, m)
  center = (module.center_norm.scale[...], module.center_norm.bias[...])
  w_out, b_out = module.output_projection.kernel[...], module.output_projection.bias[...]

  def xla_side(left, right, gate):
    return module.finish(jnp.einsum("cik,cjk->ijc" if module.outgoing else "ckj,cki->ijc",
                                    left, right), gate)

  def fused_side(left, right, gate):
    out = te.triangle_epilogue(product_cm(module, left, right).reshape(C, n * n),
                               gate.reshape(n * n, C), *center, w_out, b_out,
                               eps=module.center_norm.epsilon, dtype=jnp.bfloat16)
    return out.reshape(n, n, C)

  out, times = {}, {}
  want = jax.jit(xla_side)(left, right, gate).astype(jnp.float32)
  got = jax.jit(fused_side)(left, right, gate).astype(jnp.float32)
  out["fused err"] = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  times["output side: jevo XLA"] = median_ms(jax.jit(xla_side), (left, right, gate), repeats,
                                             batch=5)["ms"]
  times["output side: jevo fused"] = median_ms(jax.jit(fused_side), (left, right, gate),
                                               repeats, batch=5)["ms"]
  whole = jax.jit(lambda z, m: fused_side(*input_side(z, m)))
  times["module: jevo both fused"] = median_ms(whole, (z, m), repeats, batch=5)["ms"]

  # The gate computed in the output side from z: the input side runs four projections.
  four = jax.jit(lambda z, m: op.fused(z, m, scale, offset, kernels[:4], biases[:4], eps=eps,
                                       dtype=jnp.bfloat16, channel_major=True)[:2])

  def fused_side_gate_from_z(left, right, z):
    out = te.triangle_epilogue_gate_from_z(
        product_cm(module, left, right).reshape(C, n * n), z.reshape(n * n, C), scale, offset,
        kernels[4], biases[4], *center, w_out, b_out, ln_eps=eps,
        eps=module.center_norm.epsilon, dtype=jnp.bfloat16)
    return out.reshape(n, n, C)

  got = jax.jit(fused_side_gate_from_z)(left, right, z).astype(jnp.float32)
  out["gate-from-z err"] = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  times["output side: jevo fused (gate from z)"] = median_ms(
      jax.jit(fused_side_gate_from_z), (left, right, z), repeats, batch=5)["ms"]
  whole = jax.jit(lambda z, m: fused_side_gate_from_z(*four(z, m), z))
  times["module: jevo both fused, gate from z"] = median_ms(whole, (z, m), repeats,
                                                           batch=5)["ms"]
  try:
    from colabfold_kernels import tri_mul
  except ImportError as err:
    log(f"colabfold-kernels not importable: {err}")
    return {**out, **times}
  if not module.outgoing:
    return {**out, **times}
  bf16 = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
  wp = bf16(jnp.concatenate([kernels[0], kernels[2]], 1))
  wg = bf16(jnp.concatenate([kernels[1], kernels[3]], 1))
  bp = bf16(jnp.concatenate([biases[0], biases[2]]))
  bg = bf16(jnp.concatenate([biases[1], biases[3]]))

  def cf_epilogue(left, right, z):
    out = tri_mul.trimul_epilogue_ln(
        product_cm(module, left, right).reshape(C, n * n), z.reshape(n * n, C), bf16(scale),
        bf16(offset), bf16(center[0]), bf16(center[1]), bf16(w_out), bf16(b_out),
        bf16(kernels[4]), bf16(biases[4]), eps=eps)
    return out.reshape(n, n, C)

  times["output side: colabfold fused (gate from z)"] = median_ms(
      jax.jit(cf_epilogue), (left, right, z), repeats, batch=5)["ms"]
  cf_whole = jax.jit(lambda z, mask: cf_epilogue(*tri_mul.ln_gated_dual_proj(
      z, bf16(scale), bf16(offset), wp, bp, wg, bg, mask), z))
  cf_out = cf_whole(z, mask).astype(jnp.float32)
  out["colabfold err"] = float(jnp.max(jnp.abs(cf_out - want)) / jnp.max(jnp.abs(want)))
  times["module: colabfold both fused"] = median_ms(cf_whole, (z, mask), repeats, batch=5)["ms"]
  return {**out, **times}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", type=int, nargs="+", default=[384, 768])
  p.add_argument("--repeats", type=int, default=30)
  p.add_argument("--chunk-sizes", type=int, nargs="*", default=[],
                 help="also time the module chunked by these row counts (inference chunking)")
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
        for chunk in args.chunk_sizes:
          got = jitted(fused, chunk)(z, mask).astype(jnp.float32)
          err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
          rows.append((name, f"module fwd, chunk_size {chunk}",
                       f"xla {time_module(xla, z, mask, args.repeats, chunk):.3f}",
                       f"pallas_forward {time_module(fused, z, mask, args.repeats, chunk):.3f}",
                       f"max err / max |out| {err:.2e}"))
        if outgoing:
          sides = time_input_sides(xla, z, mask, args.repeats)
          rows.append((name, "input side fwd",
                       *(f"{k} {v:.3f}" for k, v in sides.items())))
        sides = time_output_sides(xla, z, mask, args.repeats)
        rows.append((name, "output side and module fwd",
                     *(f"{k} {v:.3g}" if "err" in k else f"{k} {v:.3f}"
                       for k, v in sides.items())))
      except Exception as e:  # one failure must not hide the other results
        log(f"!! {name} failed: {type(e).__name__}: {str(e)[:1500]}")
        log("".join(traceback.format_exception(e)[-5:])[-2500:])
      for row in rows[-3 - len(args.chunk_sizes):]:
        log(" | ".join(row))
  log("\n## triangle multiplication, forward ms (median)")
  for row in rows:
    log("| " + " | ".join(row) + " |")


if __name__ == "__main__":
  main()
