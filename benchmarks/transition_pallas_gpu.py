"""The fused Pallas transition on a GPU: correctness against the XLA implementation, times against
jevo's XLA path and colabfold-kernels' fused transition, and a sweep of the kernels' tiles.

    python benchmarks/transition_pallas_gpu.py                 # checks, table, quick sweep
    python benchmarks/transition_pallas_gpu.py --sweep none    # checks and table only
    python benchmarks/transition_pallas_gpu.py --sweep full    # a wider sweep (several minutes)

Run from the repository root with jevo importable; colabfold-kernels is measured when it can be
imported. Every part runs on its own: one that fails prints its error and the rest go on.
Inputs are bfloat16 activations and float32 parameters, as in jevo's bf16 modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import pathlib
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jevo.bench.implementations import transition_inputs  # noqa: E402
from jevo.bench.measure import median_ms, xla_analysis  # noqa: E402
from jevo.ops import transition_pallas as tp  # noqa: E402
from jevo.ops.transition import (pallas_unsupported_reason, resolve_implementation,  # noqa: E402
                                 xla_transition)

EPS = 1e-5
# (name, leading shape, c): AlphaFold's pair (c_z 128), MSA (c_m 256) and extra MSA (c_e 64).
SHAPES = [("pair 384x384x128", (384, 384), 128),
          ("pair 768x768x128", (768, 768), 128),
          ("msa 512x384x256", (512, 384), 256),
          ("extra msa 5120x384x64", (5120, 384), 64)]
# The shapes the tiles are swept at, one per channel count.
SWEEP_SHAPES = ("pair 384x384x128", "msa 512x384x256", "extra msa 5120x384x64")
GRAD_NAMES = ("dx", "dln_scale", "dln_offset", "dw1", "db1", "dw2", "db2")
# --interpret: the kernels in Pallas's interpreter, for a smoke test of this script off the GPU.
INTERPRET = False


def log(*args):
  print(*args, flush=True)


def attempt(what, fn, *args, **kwargs):
  """fn(*args, **kwargs), or None after printing what failed and why."""
  try:
    return fn(*args, **kwargs)
  except Exception as err:  # one failure must not hide the other results
    log(f"!! {what} failed: {type(err).__name__}: {str(err)[:2000]}")
    log("".join(traceback.format_exception(err)[-6:])[-3000:])
    return None


def make_inputs(lead, c, seed=0):
  return transition_inputs(lead, c, 4, jnp.bfloat16, seed)


# ---- implementations: f(x, ln_scale, ln_offset, w1, b1, w2, b2) -> out --------------------------

def jevo_xla(x, *p):
  return xla_transition(x, *p, eps=EPS)


def jevo_pallas(config=None):
  def f(x, *p):
    return tp.transition(x, *p, eps=EPS, config=config, interpret=INTERPRET)
  return f


def reference_f32(x, s, o, w1, b1, w2, b2):
  """Float32 throughout, products at HIGHEST precision: the yardstick for both."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + EPS) * s + o
  hi = jax.lax.Precision.HIGHEST
  h = jnp.maximum(jnp.matmul(y, w1, precision=hi) + b1, 0.0)
  return jnp.matmul(h, w2, precision=hi) + b2


def colabfold_impls():
  """colabfold-kernels' fused transition (forward: its Pallas kernel; backward: its XLA
  reference, as its fused_ops wires it), weights cast to bfloat16 as ColabFold runs it."""
  from colabfold_kernels import transition as cft
  from colabfold_kernels.grads import differentiable_via
  fwd = differentiable_via(cft.fused_transition, cft.ref_transition, nondiff=("eps", "add_input"))

  def f(x, s, o, w1, b1, w2, b2):
    return fwd(x, s, o, w1.astype(x.dtype), b1, w2.astype(x.dtype), b2, eps=EPS)
  return f


def fwd_bwd(fn):
  def f(x, g, *p):
    out, vjp = jax.vjp(fn, x, *p)
    return out, vjp(g)
  return f


# ---- 1. correctness -----------------------------------------------------------------------------

def _errors(got, ref):
  got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
  max_abs = float(np.abs(got - ref).max())
  rel = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
  return max_abs, rel, float(np.abs(ref).max())


def check_shape(name, lead, c):
  x, params, g = make_inputs(lead, c)
  log(f"\n### check {name}: rows {x.size // c}, c {c}, hidden {4 * c}; "
      f"resolve_implementation -> {resolve_implementation(x, params[2])}")
  pallas = jax.jit(fwd_bwd(jevo_pallas()))(x, g, *params)
  xla = jax.jit(fwd_bwd(jevo_xla))(x, g, *params)
  ref = jax.jit(fwd_bwd(reference_f32))(x, g.astype(jnp.float32), *params)
  log("| value | max abs diff pallas-xla | pallas vs f32 ref: max abs, rel (Frobenius) "
      "| xla vs f32 ref: max abs, rel | max abs ref |")
  log("|---|---|---|---|---|")
  names = ("out",) + GRAD_NAMES
  for nm, p, xl, r in zip(names, jax.tree.leaves(pallas), jax.tree.leaves(xla),
                          jax.tree.leaves(ref)):
    finite = bool(np.all(np.isfinite(np.asarray(p, np.float32))))
    diff = float(np.abs(np.asarray(p, np.float32) - np.asarray(xl, np.float32)).max())
    pa, pr, scale = _errors(p, r)
    xa, xr, _ = _errors(xl, r)
    flag = "" if finite and pr <= 2 * xr + 1e-3 else "  <-- CHECK"
    log(f"| {nm} | {diff:.3g} | {pa:.3g}, {pr:.2e} | {xa:.3g}, {xr:.2e} | {scale:.3g} |{flag}")
  again = jax.jit(fwd_bwd(jevo_pallas()))(x, g, *params)
  same = all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(pallas), jax.tree.leaves(again)))
  log(f"deterministic (second run bitwise equal): {same}")


def check_transforms():
  """vmap (Pallas's batching of the kernels), jax.checkpoint, shard_map on a one-device mesh
  (check_vma), odd rows and the module's default path, at small sizes."""
  x, params, g = make_inputs((3, 37), 128, seed=1)

  def grads(fn):
    return jax.jit(jax.grad(lambda x, *p: jnp.sum(fn(x, *p).astype(jnp.float32) * g),
                            argnums=tuple(range(7))))(x, *params)

  def report(what, transform):
    """transform(fn) for the Pallas kernels, XLA and the float32 reference: the Pallas kernels'
    worst relative error against the reference, and XLA's."""
    got, xla, ref = (transform(f) for f in (jevo_pallas(), jevo_xla, reference_f32))
    pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(xla), jax.tree.leaves(ref)))
    worst = max(_errors(a, r)[1] for a, _, r in pairs)
    worst_xla = max(_errors(b, r)[1] for _, b, r in pairs)
    bad = any(_errors(a, r)[1] > 2 * _errors(b, r)[1] + 1e-3 for a, b, r in pairs)
    log(f"{what}: worst relative error vs float32 reference: pallas {worst:.2e}, "
        f"xla {worst_xla:.2e}{'  <-- CHECK' if bad else ''}")

  log("\n### transforms (rows 3x37, c 128)")
  attempt("odd rows", report, "odd rows, jit", lambda fn: jax.jit(fn)(x, *params))
  attempt("grad", report, "grad", grads)
  attempt("checkpoint", report, "jax.checkpoint", lambda fn: grads(jax.checkpoint(fn)))

  def per_example(fn):
    f = jax.grad(lambda x_e, g_e, *p: jnp.sum(fn(x_e, *p).astype(jnp.float32) * g_e),
                 argnums=(0, 2, 3, 4, 5, 6, 7))
    return jax.jit(jax.vmap(f, in_axes=(0, 0) + (None,) * 6))(x, g, *params)
  attempt("vmap", report, "vmap of grad (per-example gradients)", per_example)

  def sharded(fn):
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jevo.ops.varying import match_varying_axes
    mesh = jax.make_mesh((1,), ("d",))

    def body(x, *p):
      return fn(*match_varying_axes(x, *p))
    spec = (P("d"),) + (P(),) * 6
    f = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=P("d"))
    args = [jax.device_put(a, NamedSharding(mesh, sp)) for a, sp in zip((x,) + params, spec)]
    return jax.jit(jax.grad(lambda x, *p: jnp.sum(f(x, *p).astype(jnp.float32) * g),
                            argnums=tuple(range(7))))(*args)
  attempt("shard_map", report, "shard_map (one device, check_vma)", sharded)

  def module():
    from flax import nnx
    from jevo.nn import Transition
    t = Transition(128, dtype=jnp.bfloat16, output_kernel_init=nnx.initializers.lecun_normal(),
                   rngs=nnx.Rngs(0))
    t_xla = Transition(128, dtype=jnp.bfloat16, implementation="xla",
                       output_kernel_init=nnx.initializers.lecun_normal(), rngs=nnx.Rngs(0))
    log(f"jevo.nn.Transition runs {resolve_implementation(x, params[2])} by default; relative "
        f"difference from implementation='xla': {_errors(t(x), t_xla(x))[1]:.2e}")
  attempt("module", module)


# ---- 2. times -----------------------------------------------------------------------------------

def time_fn(fn, args, repeats=30, batch=10):
  compiled = jax.jit(fn).lower(*args).compile()
  stats = median_ms(compiled, args, repeats, batch=batch, warmup=3)
  temp = xla_analysis(compiled).get("temp_size")
  return stats["ms"], temp


def time_shape(name, lead, c, impls, rows_out):
  x, params, g = make_inputs(lead, c)
  for impl_name, fn in impls.items():
    if fn is None:
      continue
    fwd = attempt(f"{name} {impl_name} forward", time_fn, fn, (x, *params))
    both = attempt(f"{name} {impl_name} forward+backward", time_fn, fwd_bwd(fn), (x, g, *params))
    row = (name, impl_name, fwd[0] if fwd else None, both[0] if both else None,
           both[1] if both else None)
    rows_out.append(row)
    log("  " + _row(row))


def _ms(v):
  return "failed" if v is None else f"{v:.3f}"


def _row(row):
  name, impl, fwd, both, temp = row
  temp = "" if temp is None else f"{temp / 2 ** 20:.0f}"
  return f"| {name} | {impl} | {_ms(fwd)} | {_ms(both)} | {temp} |"


# ---- 3. tile sweep ------------------------------------------------------------------------------

def sweep_grids(c, full):
  """The tiles tried for each kernel at c channels: (forward, input_grad, param_grad) lists. The
  float32 [block_rows, c] accumulator must fit in registers, so wider c takes fewer rows."""
  blocks_fwd = {64: (64, 128, 256), 128: (64, 128), 256: (32, 64)}.get(c, (32, 64, 128))
  if full:
    blocks_fwd = tuple(sorted(set(blocks_fwd) | {32, 64, 128}))
  stages = (1, 2, 3) if full else (1, 2)
  fwd = [tp.KernelConfig(b, k, w, s) for b, k, w, s in
         itertools.product(blocks_fwd, (32, 64, 128) if full else (32, 64), (4, 8), stages)]
  if not full:
    fwd += [tp.KernelConfig(128, 128, 8, s) for s in (1, 2)]
  bwd_blocks = (32, 64, 128)
  bwd_stages = stages if full else ((2,) if c <= 128 else (1,))
  inp = [tp.KernelConfig(b, k, w, s) for b, k, w, s in
         itertools.product(bwd_blocks, (32, 64), (4, 8), bwd_stages)]
  par = [tp.KernelConfig(b, k, w, s) for b, k, w, s in
         itertools.product(bwd_blocks, (16, 32, 64) if full else (32, 64), (4, 8),
                           stages if full else (1, 2) if c <= 128 else (1,))]
  return fwd, inp, par


def sweep_shape(name, lead, c, full, results):
  x, params, g = make_inputs(lead, c)
  rows, hidden = x.size // c, 4 * c
  x2, g2 = x.reshape(rows, c), g.reshape(rows, c)
  s, o, w1, b1, w2, b2 = params
  w1c, w2c = w1.astype(x.dtype), w2.astype(x.dtype)
  fwd_grid, inp_grid, par_grid = sweep_grids(c, full)
  default = tp.default_config(c, hidden)
  best = {}

  def run(kernel, cfg, fn, args, programs=None):
    start = time.perf_counter()
    t = attempt(f"{name} {kernel} {cfg} programs={programs}", time_fn, fn, args, 20, 5)
    ms = None if t is None else t[0]
    results.append((name, kernel, cfg, programs, ms))
    took = time.perf_counter() - start
    log(f"  {kernel:11s} {cfg.block_rows:4d} {cfg.hidden_chunk:4d} {cfg.num_warps:2d} "
        f"{cfg.num_stages:2d} {programs or '':>5} {_ms(ms):>8}  ({took:.1f} s)")
    if ms is not None and (kernel not in best or ms < best[kernel][1]):
      best[kernel] = (cfg, ms, programs)

  log(f"\n### sweep {name} (block_rows chunk warps stages [programs] ms)")
  for cfg in fwd_grid:
    f = lambda x, s, o, w1, b1, w2, b2, cfg=cfg.fitted(rows, hidden): tp._forward(
        x, s, o, w1, b1, w2, b2, eps=EPS, config=cfg, interpret=INTERPRET)
    run("forward", cfg, f, (x2, s, o, w1c, b1, w2c, b2))
  for cfg in inp_grid:
    f = lambda x, g, s, o, w1, b1, w2, cfg=cfg.fitted(rows, hidden): tp._input_grad(
        x, g, s, o, w1, b1, w2, eps=EPS, config=cfg, interpret=INTERPRET)
    run("input_grad", cfg, f, (x2, g2, s, o, w1c, b1, w2c))
  for cfg in par_grid:
    f = lambda x, g, s, o, w1, b1, w2, cfg=cfg.fitted(rows, hidden): tp._param_grad(
        x, g, s, o, w1, b1, w2, eps=EPS, config=cfg, programs=default.param_grad_programs,
        interpret=INTERPRET)
    run("param_grad", cfg, f, (x2, g2, s, o, w1c, b1, w2c), default.param_grad_programs)
  if "param_grad" in best:
    cfg = best["param_grad"][0]
    for programs in (132, 264, 528, 1056):
      if programs == default.param_grad_programs:
        continue
      f = lambda x, g, s, o, w1, b1, w2, cfg=cfg.fitted(rows, hidden), n=programs: tp._param_grad(
          x, g, s, o, w1, b1, w2, eps=EPS, config=cfg, programs=n, interpret=INTERPRET)
      run("param_grad", cfg, f, (x2, g2, s, o, w1c, b1, w2c), programs)
  for kernel, cfg in (("forward", default.forward), ("input_grad", default.input_grad),
                      ("param_grad", default.param_grad)):
    log(f"  default {kernel}: {cfg}")
  if len(best) == 3:
    tuned = tp.TransitionConfig(forward=best["forward"][0], input_grad=best["input_grad"][0],
                                param_grad=best["param_grad"][0],
                                param_grad_programs=best["param_grad"][2])
    log(f"  best: {tuned}")
    t = attempt(f"{name} tuned forward+backward", time_fn, fwd_bwd(jevo_pallas(tuned)),
                (x, g, *params))
    d = attempt(f"{name} default forward+backward", time_fn, fwd_bwd(jevo_pallas()),
                (x, g, *params))
    log(f"  forward+backward: tuned {_ms(t and t[0])} ms, default {_ms(d and d[0])} ms")
    return tuned
  return None


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sweep", choices=("none", "quick", "full"), default="quick")
  parser.add_argument("--skip-checks", action="store_true")
  parser.add_argument("--shapes", nargs="*", default=None,
                      help="names (prefixes) of the shapes to run, e.g. 'pair 384'")
  parser.add_argument("--interpret", action="store_true",
                      help="run the kernels in Pallas's interpreter on shapes 1/32 the size in "
                           "each leading dim (a smoke test of this script without a GPU)")
  args = parser.parse_args()
  shapes = [s for s in SHAPES if not args.shapes or any(s[0].startswith(p) for p in args.shapes)]
  if args.interpret:
    global INTERPRET
    INTERPRET = True
    shapes = [(name, tuple(max(1, n // 32) + 1 for n in lead), c) for name, lead, c in shapes]

  log(f"jax {jax.__version__}, devices {jax.devices()}")
  probe = jnp.zeros((8, 128), jnp.bfloat16)
  log(f"pallas unsupported reason here: {pallas_unsupported_reason(probe, jnp.zeros((128, 512)))}")
  colabfold = attempt("import colabfold-kernels", colabfold_impls)
  if colabfold is not None:
    import colabfold_kernels
    log(f"colabfold-kernels {getattr(colabfold_kernels, '__version__', '?')}")

  if not args.skip_checks:
    for name, lead, c in shapes:
      attempt(f"check {name}", check_shape, name, lead, c)
    attempt("transforms", check_transforms)

  log("\n### times (median ms; temp: XLA's temporary buffers of the forward+backward program)")
  rows = []
  impls = {"jevo xla": jevo_xla, "jevo pallas": jevo_pallas(), "colabfold": colabfold}
  for name, lead, c in shapes:
    attempt(f"time {name}", time_shape, name, lead, c, impls, rows)

  tuned = {}
  results = []
  if args.sweep != "none":
    for name, lead, c in shapes:
      if name in SWEEP_SHAPES:
        tuned[name] = attempt(f"sweep {name}", sweep_shape, name, lead, c, args.sweep == "full",
                              results)

  log("\n## summary\n")
  log("| shape | implementation | forward ms | forward+backward ms | fwd+bwd temp MiB |")
  log("|---|---|---|---|---|")
  for row in rows:
    log(_row(row))
  by = {(r[0], r[1]): r for r in rows}
  for name, _, _ in shapes:
    mine = by.get((name, "jevo pallas"))
    for other in ("jevo xla", "colabfold"):
      theirs = by.get((name, other))
      if mine and theirs:
        ratios = [f"{col} {t / m:.2f}x" for col, m, t in (("forward", mine[2], theirs[2]),
                                                          ("fwd+bwd", mine[3], theirs[3]))
                  if m and t]
        log(f"{name}: jevo pallas speed-up over {other}: {', '.join(ratios) or 'n/a'}")
  if results:
    log("\n| shape | kernel | block_rows | hidden_chunk | num_warps | num_stages | programs | ms |")
    log("|---|---|---|---|---|---|---|---|")
    for name, kernel in itertools.product(SWEEP_SHAPES, ("forward", "input_grad", "param_grad")):
      mine = sorted((r for r in results if r[0] == name and r[1] == kernel and r[4] is not None),
                    key=lambda r: r[4])
      for _, _, cfg, programs, ms in mine[:5]:  # the five fastest of each kernel
        log(f"| {name} | {kernel} | {cfg.block_rows} | {cfg.hidden_chunk} | {cfg.num_warps} | "
            f"{cfg.num_stages} | {programs or ''} | {ms:.3f} |")
    for name, cfg in tuned.items():
      if cfg is not None:
        log(f"\nbest for {name}: {dataclasses.asdict(cfg)}")


if __name__ == "__main__":
  main()
