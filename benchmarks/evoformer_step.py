"""One training step (forward + backward) of a 48-block Evoformer stack, per attention backend.

AlphaFold's sizes (c_m 256, c_z 128, 8 x 32 MSA heads, 4 x 32 triangle heads), bf16 compute
with fp32 parameters, remat per block, dropout on, all positions valid. Each (shape, backend)
runs in a fresh process so that its peak device memory is its own. Reported: median step time,
compile time, and peak device memory (`peak_bytes_in_use`; also minus what was in use before
the step: parameters and inputs). An out-of-memory or any other failure is recorded, not fatal.

    python benchmarks/evoformer_step.py --out /tmp/step                  # both shapes, cuda + xla
    python benchmarks/evoformer_step.py --implementation xla_chunked --shapes 128x256 --out /tmp/s
    python benchmarks/evoformer_step.py --remat block offload --implementation cuda --out /tmp/s
    python benchmarks/evoformer_step.py --blocks 2 --shapes 8x16 --out /tmp/smoke   # CPU smoke
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import os
import sys

from common import (median_ms, parse_shape, run_worker,  # benchmarks/ is the script's directory
                    without_command_buffers, write_profile, write_results)

SHAPES = ("128x256", "512x384")  # N_seq x N_res: AlphaFold's initial and fine-tuning crops
IMPLEMENTATIONS = ("cuda", "xla")




def _memory(device) -> dict:
  stats = device.memory_stats()  # None on CPU
  return stats or {}


def _error(err: BaseException) -> str:
  text = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
  return text[:300]


def worker(shape: tuple[int, int], implementation: str, remat: str, blocks: int, repeats: int,
           trace: str | None = None) -> dict:
  """Runs in its own process; returns one result record."""
  import time
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jevo.nn import OFFLOAD_COMPILER_OPTIONS, EvoformerStack

  n_seq, n_res = shape
  device = jax.devices()[0]
  result = dict(n_seq=n_seq, n_res=n_res, implementation=implementation, remat=remat, blocks=blocks)
  try:
    # "dots": recompute each block but keep its matrix products' outputs (a jax policy).
    policy = jax.checkpoint_policies.dots_saveable if remat == "dots" else remat
    stack = EvoformerStack(blocks, dtype=jnp.bfloat16, remat=policy,
                           implementation=implementation, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(stack, nnx.Param, ...)
    keys = jax.random.split(jax.random.key(1), 3)
    m = jax.random.normal(keys[0], (n_seq, n_res, 256), jnp.bfloat16)
    z = jax.random.normal(keys[1], (n_res, n_res, 128), jnp.bfloat16)
    msa_mask = jnp.ones((n_seq, n_res), bool)
    pair_mask = jnp.ones((n_res, n_res), bool)

    options = OFFLOAD_COMPILER_OPTIONS if remat == "offload" else None

    @functools.partial(jax.jit, compiler_options=options)
    def step(params, m, z, key):
      def loss(params):
        out_m, out_z = nnx.merge(graphdef, params, rest)(m, z, msa_mask, pair_mask, rngs=key)
        return (jnp.mean(jnp.square(out_m.astype(jnp.float32)))
                + jnp.mean(jnp.square(out_z.astype(jnp.float32))))
      return jax.value_and_grad(loss)(params)

    args = (params, m, z, keys[2])
    jax.block_until_ready(args)
    before = _memory(device).get("bytes_in_use")
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    result["compile_s"] = time.perf_counter() - start
    loss, _ = jax.block_until_ready(compiled(*args))  # one step alone: its peak is the peak
    stats = _memory(device)
    if "peak_bytes_in_use" in stats:
      result["peak_gib"] = stats["peak_bytes_in_use"] / 2**30
      result["peak_over_inputs_gib"] = (stats["peak_bytes_in_use"] - before) / 2**30
    result["loss"] = float(loss)
    result["step_ms"] = median_ms(compiled, args, repeats)
    if trace:
      write_profile(trace, f"stack{blocks}_{n_seq}x{n_res}_{remat}", compiled, args)
  except Exception as err:  # out of memory, unsupported backend, ...: recorded, not fatal
    result["error"] = _error(err)
  return result


def _status(r: dict) -> str:
  if "error" not in r:
    return "ok"
  text = r["error"].lower()
  return "OOM" if "resource_exhausted" in text or "out of memory" in text else "error"


def table(results: list[dict]) -> str:
  lines = ["| N_seq x N_res | implementation | remat | median step | peak memory | compile | status |",
           "|---|---|---|---|---|---|---|"]
  for r in results:
    step = f"{r['step_ms']:.1f} ms" if "step_ms" in r else "-"
    peak = (f"{r['peak_gib']:.2f} GiB ({r['peak_over_inputs_gib']:.2f} over params+inputs)"
            if "peak_gib" in r else "-")
    compile_s = f"{r['compile_s']:.1f} s" if "compile_s" in r else "-"
    status = _status(r) + (f": {r['error']}".replace("|", "/") if "error" in r else "")
    lines.append(f"| {r['n_seq']} x {r['n_res']} | {r['implementation']} | {r.get('remat', 'block')} | "
                 f"{step} | {peak} | "
                 f"{compile_s} | {status} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--implementation", nargs="+", default=list(IMPLEMENTATIONS),
                      choices=["cuda", "xla_chunked", "xla"])
  parser.add_argument("--shapes", nargs="+", type=parse_shape,
                      default=[parse_shape(s) for s in SHAPES], help="N_SEQxN_RES ...")
  parser.add_argument("--remat", nargs="+", default=["block"],
                      choices=["block", "offload", "dots", "none"],
                      help="block: recompute each block; offload: also keep block inputs on the "
                           "host; dots: recompute all but the matrix products; none: keep all")
  parser.add_argument("--blocks", type=int, default=48)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
  parser.add_argument("--out", default=None,
                      help="output path without suffix (.json and .md are written)")
  parser.add_argument("--trace", default=None,
                      help="also write a profile of 2 steps and the HLO of each configuration "
                           "here (see summarize_profile.py)")
  parser.add_argument("--keep-command-buffers", action="store_true",
                      help="with --trace: keep XLA's command buffers on, as in the timed step "
                           "(summarize_profile.py then names fusion kernels by kernel name)")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.out is None and not (args.worker):
    parser.error("--out is required: the output path without suffix (.json and .md)")
  if args.blocks <= 0 or args.repeats <= 0:
    parser.error("--blocks and --repeats must be positive")
  if args.worker:
    (shape,), (implementation,), (remat,) = args.shapes, args.implementation, args.remat
    print(json.dumps(worker(shape, implementation, remat, args.blocks, args.repeats, args.trace)),
          flush=True)
    return

  env = os.environ.copy()
  # Let one configuration use the whole device (JAX's default cap is 75% of its memory).
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  if args.trace and not args.keep_command_buffers:
    # without command buffers each kernel is attributed to its HLO operation
    env["XLA_FLAGS"] = without_command_buffers(env.get("XLA_FLAGS", ""))
  results = []
  for n_seq, n_res in args.shapes:
    for implementation, remat in itertools.product(args.implementation, args.remat):
      cmd = [sys.executable, __file__, "--worker", "--shapes", f"{n_seq}x{n_res}",
             "--implementation", implementation, "--remat", remat, "--blocks", str(args.blocks),
             "--repeats", str(args.repeats)] + (["--trace", args.trace] if args.trace else [])
      record = dict(n_seq=n_seq, n_res=n_res, implementation=implementation, remat=remat,
                    blocks=args.blocks)
      record.update(run_worker(cmd, env, args.timeout))
      results.append(record)
      print(json.dumps(record), flush=True)

  import jax
  meta = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind,
              jax=jax.__version__, blocks=args.blocks, dtype="bfloat16 compute, float32 params",
              remat=args.remat, repeats=args.repeats,
              command="python benchmarks/evoformer_step.py " + " ".join(sys.argv[1:]))
  header = (f"# Evoformer training step ({args.blocks} blocks) on {meta['device']}\n\n"
            f"{meta['date']}, jax {meta['jax']}, {meta['dtype']}, "
            f"dropout on, median of {args.repeats} steps. `{meta['command']}`\n\n")
  write_results(args.out, meta, results, header + table(results) + "\n")
  print(table(results))


if __name__ == "__main__":
  main()
