"""Dynamic Axial Parallelism: a 48-block Evoformer stack on 1, 2 and 4 devices.

Two workloads at AlphaFold's sizes (c_m 256, c_z 128, 8 x 32 MSA heads, 4 x 32 pair heads),
bf16 compute with fp32 parameters, all positions valid:

  train  one training step (forward + backward), N_seq 512 x N_res 384, remat per block,
         dropout on (FastFold's DAP training benchmark);
  infer  inference (forward), N_seq 128 x N_res 2048, eval mode (a long protein).

Each (workload, device count) runs in a fresh process: 1 device runs the stack itself, n > 1
runs `jevo.parallel.dap_evoformer_stack` over the first n devices, with inputs created split
and parameters replicated. Reported: median time, speedup over 1 device, peak device memory
(`peak_bytes_in_use`, the largest over the devices; also minus what was in use before the step:
parameters and inputs) and compile time. A failure (e.g. out of memory) is recorded, not fatal.

    python benchmarks/dap.py --out /tmp/dap                    # both workloads, 1, 2, 4 GPUs
    python benchmarks/dap.py --workloads train --devices 1 2 --out /tmp/dap2
    python benchmarks/dap.py --cpu-devices 4 --blocks 2 --train-shape 8x12 \\
        --infer-shape 4x24 --out /tmp/dap_cpu                  # CPU smoke test, 4 host devices
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys

from common import (median_ms, parse_shape, run_worker,  # benchmarks/ is the script's directory
                    without_command_buffers, write_profile, write_results)

WORKLOADS = {"train": "512x384", "infer": "128x2048"}  # N_seq x N_res



def _error(err: BaseException) -> str:
  lines = str(err).strip().splitlines()
  return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]



def _memory(devices) -> list[dict]:
  return [d.memory_stats() or {} for d in devices]


def worker(workload: str, n: int, shape: tuple[int, int], blocks: int, repeats: int,
           implementation: str | None, chunk_size: int | None, trace: str | None = None) -> dict:
  """Runs in its own process; returns one result record."""
  import time
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jevo.nn import EvoformerStack
  from jevo.parallel import dap_evoformer_stack, make_dap_mesh

  n_seq, n_res = shape
  result = dict(workload=workload, devices=n, n_seq=n_seq, n_res=n_res, blocks=blocks)
  if n > jax.device_count():
    result["error"] = f"needs {n} devices, {jax.device_count()} present"
    return result
  try:
    mesh = make_dap_mesh(n)
    devices = list(mesh.devices.flat)
    train = workload == "train"
    stack = EvoformerStack(blocks, dtype=jnp.bfloat16, remat="block" if train else "none",
                           implementation=implementation, rngs=nnx.Rngs(0))
    if not train:
      stack.eval()
    graphdef, params, rest = nnx.split(stack, nnx.Param, ...)
    if n == 1:
      replicated = split = jax.sharding.SingleDeviceSharding(devices[0])
    else:  # parameters on every device; m split by sequence, z by row
      replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("dap"))
    params, rest = jax.device_put((params, rest), replicated)

    def make_inputs(key):
      k = jax.random.split(key, 2)
      return (jax.random.normal(k[0], (n_seq, n_res, stack.c_m), jnp.bfloat16),
              jax.random.normal(k[1], (n_res, n_res, stack.c_z), jnp.bfloat16))

    m, z = jax.jit(make_inputs, out_shardings=(split, split))(jax.random.key(1))
    msa_mask = jnp.ones((n_seq, n_res), bool)
    pair_mask = jnp.ones((n_res, n_res), bool)

    def forward(params, m, z, key):
      module = nnx.merge(graphdef, params, rest)
      kw = dict(rngs=key if train else None, chunk_size=chunk_size)
      if n == 1:
        return module(m, z, msa_mask, pair_mask, **kw)
      return dap_evoformer_stack(module, m, z, msa_mask, pair_mask, mesh=mesh, **kw)

    if train:
      def loss(params, m, z, key):
        out_m, out_z = forward(params, m, z, key)
        return (jnp.mean(jnp.square(out_m.astype(jnp.float32)))
                + jnp.mean(jnp.square(out_z.astype(jnp.float32))))
      step = jax.jit(jax.value_and_grad(loss))
    else:
      step = jax.jit(forward)
    args = (params, m, z, jax.random.key(2))
    jax.block_until_ready(args)
    before = _memory(devices)
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    result["compile_s"] = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))  # one step alone: its peak is the peak
    after = _memory(devices)
    if all("peak_bytes_in_use" in s for s in after):
      result["peak_gib"] = max(s["peak_bytes_in_use"] for s in after) / 2**30
      result["peak_over_inputs_gib"] = max(
          a["peak_bytes_in_use"] - b.get("bytes_in_use", 0) for a, b in zip(after, before)
      ) / 2**30
    result["ms"] = median_ms(compiled, args, repeats)
    if trace:
      write_profile(trace, f"dap{n}_{workload}_{blocks}blocks", compiled, args)
  except Exception as err:  # out of memory, unsupported backend, ...: recorded, not fatal
    result["error"] = _error(err)
  return result


def _probe() -> dict:
  import jax
  import jevo
  return dict(platform=jax.default_backend(), count=jax.device_count(),
              kind=jax.devices()[0].device_kind, jax=jax.__version__,
              cuda_kernels=bool(jevo.cuda_status().available))


def add_speedups(results: list[dict]) -> None:
  """speedup = time on 1 device / time on n devices, per workload."""
  base = {r["workload"]: r["ms"] for r in results if r["devices"] == 1 and "ms" in r}
  for r in results:
    if "ms" in r and r["workload"] in base:
      r["speedup"] = base[r["workload"]] / r["ms"]


def _status(r: dict) -> str:
  if "error" not in r:
    return "ok"
  text = r["error"].lower()
  kind = "OOM" if "resource_exhausted" in text or "out of memory" in text else "error"
  return f"{kind}: {r['error']}".replace("|", "/")


def table(results: list[dict]) -> str:
  lines = ["| workload | N_seq x N_res | devices | time | speedup | peak memory per device | "
           "compile | status |", "|---|---|---|---|---|---|---|---|"]
  for r in results:
    time_ms = f"{r['ms']:.1f} ms" if "ms" in r else "-"
    speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
    peak = (f"{r['peak_gib']:.2f} GiB ({r['peak_over_inputs_gib']:.2f} over params+inputs)"
            if "peak_gib" in r else "-")
    compile_s = f"{r['compile_s']:.1f} s" if "compile_s" in r else "-"
    lines.append(f"| {r['workload']} | {r['n_seq']} x {r['n_res']} | {r['devices']} | "
                 f"{time_ms} | {speedup} | {peak} | {compile_s} | {_status(r)} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
  parser.add_argument("--devices", nargs="+", type=int, default=None,
                      help="device counts (default: 1, 2, 4, ... up to those present)")
  parser.add_argument("--train-shape", type=parse_shape, default=parse_shape(WORKLOADS["train"]))
  parser.add_argument("--infer-shape", type=parse_shape, default=parse_shape(WORKLOADS["infer"]))
  parser.add_argument("--blocks", type=int, default=48)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--implementation", default=None, choices=["cuda", "xla_chunked", "xla"],
                      help="attention backend (default: the best available)")
  parser.add_argument("--chunk-size", type=int, default=None, help="inference chunking")
  parser.add_argument("--cpu-devices", type=int, default=None,
                      help="run on CPU with this many host devices (a smoke test)")
  parser.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
  parser.add_argument("--out", default=None, help="output path without suffix (.json and .md "
                      "are written)")
  parser.add_argument("--trace", default=None,
                      help="also write a profile of 2 steps and the HLO of each configuration "
                           "here (see summarize_profile.py)")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.out is None and not (args.worker or args.probe):
    parser.error("--out is required: the output path without suffix (.json and .md)")
  for name in ("blocks", "repeats", "chunk_size", "cpu_devices"):
    value = getattr(args, name)
    if value is not None and value <= 0:
      parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
  if args.probe:
    print(json.dumps(_probe()), flush=True)
    return
  if args.worker:
    workload, n = args.worker.split(":")
    shape = args.train_shape if workload == "train" else args.infer_shape
    print(json.dumps(worker(workload, int(n), shape, args.blocks, args.repeats,
                            args.implementation, args.chunk_size, args.trace)), flush=True)
    return

  env = os.environ.copy()
  # Let one configuration use the whole device (JAX's default cap is 75% of its memory).
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  if args.cpu_devices:
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} "
                        f"--xla_force_host_platform_device_count={args.cpu_devices}").strip()
  probe = run_worker([sys.executable, __file__, "--probe"], env, 600)
  if "error" in probe:
    sys.exit(f"could not start JAX: {probe['error']}")
  devices = args.devices or [n for n in (1, 2, 4, 8) if n <= probe["count"]]
  passthrough = ["--train-shape", "x".join(map(str, args.train_shape)),
                 "--infer-shape", "x".join(map(str, args.infer_shape)),
                 "--blocks", str(args.blocks), "--repeats", str(args.repeats)]
  if args.implementation:
    passthrough += ["--implementation", args.implementation]
  if args.chunk_size:
    passthrough += ["--chunk-size", str(args.chunk_size)]
  if args.trace:  # without command buffers each kernel is attributed to its HLO operation
    passthrough += ["--trace", args.trace]
    env["XLA_FLAGS"] = without_command_buffers(env.get("XLA_FLAGS", ""))

  results = []
  for workload in args.workloads:
    shape = args.train_shape if workload == "train" else args.infer_shape
    for n in devices:
      record = dict(workload=workload, devices=n, n_seq=shape[0], n_res=shape[1],
                    blocks=args.blocks)
      record.update(run_worker([sys.executable, __file__, "--worker", f"{workload}:{n}",
                                *passthrough], env, args.timeout))
      results.append(record)
      print(json.dumps(record), flush=True)
  add_speedups(results)

  meta = dict(date=datetime.date.today().isoformat(), **probe, blocks=args.blocks,
              dtype="bfloat16 compute, float32 params", repeats=args.repeats,
              implementation=args.implementation or "default", chunk_size=args.chunk_size,
              command="python benchmarks/dap.py " + " ".join(sys.argv[1:]))
  out = pathlib.Path(args.out)
  header = (f"# Evoformer stack with DAP ({args.blocks} blocks) on {probe['count']} x "
            f"{probe['kind']}\n\n{meta['date']}, jax {probe['jax']}, {meta['dtype']}, "
            f"attention: {meta['implementation']} (CUDA kernels "
            f"{'available' if probe['cuda_kernels'] else 'unavailable'}), median of "
            f"{args.repeats}. train: forward + backward, remat per block, dropout on; infer: "
            f"forward, eval mode. `{meta['command']}`\n\n")
  write_results(out, meta, results, header + table(results) + "\n")
  print(table(results))


if __name__ == "__main__":
  main()
