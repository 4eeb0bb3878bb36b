"""Peak device memory of one jitted forward of the cuda backend above its inputs, in this (fresh)
process, against the output plus the log-sum-exp, which is all the forward allocates:

    python tests/gpu_forward_memory.py                 # tri_2048, limit 1.1 x (output + LSE)
    python tests/gpu_forward_memory.py --case msa_row --factor 1.1

Inputs are random numbers made on the host and copied to the device, so that no device-side
generation (whose temporaries the allocator's running peak would keep) happens before the
measured call. Prints one JSON line; exits 1 when the peak is over the limit, 2 when it cannot
measure (no GPU or no kernels). tests/test_cuda_forward_memory.py runs it for pytest -m gpu.
"""

from __future__ import annotations

import argparse
import json
import sys

# name: (B, N, S, H, D), the shapes of benchmarks/attention.py; pair bias and a key mask each.
CASES = {
    "tri_2048": (1, 2048, 2048, 4, 32),
    "tri_768": (1, 768, 768, 4, 32),
    "msa_row": (1, 512, 384, 8, 32),
}


def _host_normal(rng, shape, dtype):
  """Standard normal values of `shape` in `dtype`, made 2^26 at a time (little host memory)."""
  import numpy as np
  out = np.empty(shape, dtype)
  flat = out.reshape(-1)
  step = 1 << 26
  for start in range(0, flat.size, step):
    stop = min(start + step, flat.size)
    flat[start:stop] = rng.standard_normal(stop - start, np.float32).astype(dtype)
  return out


def measure(case: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import jevo

  status = jevo.cuda_status()
  if not status.available:
    return dict(case=case, error=f"cannot measure: {status.reason}")
  device = jax.devices()[0]
  stats = lambda: device.memory_stats() or {}  # noqa: E731
  b, n, s, h, d = shape = CASES[case]
  rng = np.random.default_rng(0)
  bf16 = np.dtype(jnp.bfloat16)
  host = [_host_normal(rng, shape, bf16) for _ in range(3)]
  host.append(rng.random((b, n, 1, 1, s)) >= 0.1)
  host.append(_host_normal(rng, (b, 1, h, s, s), bf16))
  q, k, v, mask, bias = (jax.device_put(x, device) for x in host)
  del host
  jax.block_until_ready((q, k, v, mask, bias))
  base = stats()["bytes_in_use"]
  peak_before = stats()["peak_bytes_in_use"]

  f = jax.jit(lambda q, k, v, mask, bias: jevo.evoformer_attention(
      q, k, v, mask=mask, bias=bias, implementation="cuda"))
  compiled = f.lower(q, k, v, mask, bias).compile()
  peak_after_compile = stats()["peak_bytes_in_use"]
  out = compiled(q, k, v, mask, bias)
  jax.block_until_ready(out)
  peak = stats()["peak_bytes_in_use"]

  out_bytes = out.size * out.dtype.itemsize
  lse_bytes = b * n * h * s * 4
  record = dict(case=case, shape=shape, inputs_bytes=base, out_bytes=out_bytes,
                lse_bytes=lse_bytes, peak_above_inputs_bytes=peak - base,
                # What the allocator's running peak held before the call (input copies, compile):
                # when the call does not raise it, the call's own peak is at most this figure.
                overhang_before_call_bytes=max(peak_before, peak_after_compile) - base,
                call_raised_peak=peak > max(peak_before, peak_after_compile),
                device=device.device_kind, jax=jax.__version__)
  try:
    mem = compiled.memory_analysis()
    record.update(xla_temp_bytes=int(mem.temp_size_in_bytes),
                  xla_output_bytes=int(mem.output_size_in_bytes))
  except Exception as err:  # not every backend implements it
    record["xla_memory_error"] = f"{type(err).__name__}: {err}"[:200]
  return record


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--case", choices=sorted(CASES), default="tri_2048")
  parser.add_argument("--factor", type=float, default=1.1,
                      help="limit on the peak above the inputs, in units of output + LSE bytes")
  args = parser.parse_args(argv)
  record = measure(args.case)
  if "error" in record:
    print(json.dumps(record), flush=True)
    return 2
  limit = args.factor * (record["out_bytes"] + record["lse_bytes"])
  record.update(limit_bytes=int(limit), ok=record["peak_above_inputs_bytes"] <= limit,
                peak_above_inputs_gib=record["peak_above_inputs_bytes"] / 2**30)
  print(json.dumps(record), flush=True)
  return 0 if record["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
