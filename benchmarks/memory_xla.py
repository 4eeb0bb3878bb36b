"""Peak extra memory of the "xla_chunked" backend against "xla", forward and forward+backward.

MSA row attention with pair bias and mask, AlphaFold's MSA stack size by default:
(B, N, S, H, D) = (1, 512, 384, 8, 32) in fp32.

The measure is XLA's compiled memory analysis, `temp_size_in_bytes`: the scratch memory that the
compiled program needs beyond its arguments and outputs, i.e. the peak extra memory of the
computation as XLA's buffer assignment plans it. It needs no device memory (nothing is run), and
it is what matters on a CPU, where `device.memory_stats()` is not available.

    python benchmarks/memory_xla.py   # writes benchmarks/results/memory_xla_<platform>.{md,json}

Exits non-zero unless xla_chunked needs at most a quarter of xla's temporary memory in both
directions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys

import jax
import jax.numpy as jnp

import jevo
from jevo.ops import xla_chunked

IMPLEMENTATIONS = ("xla", "xla_chunked")
TARGET_RATIO = 0.25


def _analysis(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  stats = compiled.memory_analysis()
  return {
      "temp_bytes": int(stats.temp_size_in_bytes),
      "argument_bytes": int(stats.argument_size_in_bytes),
      "output_bytes": int(stats.output_size_in_bytes),
  }


def measure(b, n, s, h, d, dtype):
  qkv = jax.ShapeDtypeStruct((b, n, s, h, d), dtype)
  mask = jax.ShapeDtypeStruct((b, n, 1, 1, s), jnp.bool_)
  bias = jax.ShapeDtypeStruct((b, 1, h, s, s), dtype)
  results = {}
  for impl in IMPLEMENTATIONS:
    def forward(q, k, v, mask, bias, impl=impl):
      return jevo.evoformer_attention(q, k, v, mask=mask, bias=bias, implementation=impl)

    def forward_backward(q, k, v, mask, bias, impl=impl):
      loss = lambda q, k, v, bias: jnp.sum(forward(q, k, v, mask, bias))  # noqa: E731
      return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)

    results[impl] = {
        "forward": _analysis(forward, qkv, qkv, qkv, mask, bias),
        "forward_backward": _analysis(forward_backward, qkv, qkv, qkv, mask, bias),
    }
  return results


def _mib(x):
  return f"{x / 2**20:,.1f} MiB"


def report(shape, dtype, results, command):
  b, n, s, h, d = shape
  logits_bytes = b * n * h * s * s * 4
  chunk = xla_chunked.choose_query_chunk(b, n, h, s)
  device = jax.devices()[0]
  lines = [
      "# Peak extra memory: xla_chunked vs xla",
      "",
      f"- date: {datetime.date.today().isoformat()}",
      f"- command: `{command}`",
      f"- device: {device.platform} ({device.device_kind}), {platform.machine()}; "
      f"jax {jax.__version__}, jevo {jevo.__version__}",
      f"- shape (B, N, S, H, D) = {shape}, {jnp.dtype(dtype).name}, MSA row attention with pair "
      "bias and mask",
      f"- xla_chunked query chunk (automatic): {chunk} rows",
      f"- for scale: one fp32 logits tensor [B, N, H, S, S] is {_mib(logits_bytes)}",
      "- measure: `temp_size_in_bytes` of XLA's compiled memory analysis (scratch memory beyond "
      "arguments and outputs, as planned by buffer assignment; nothing is run)",
      "",
      "| pass | xla | xla_chunked | ratio | target |",
      "|---|---:|---:|---:|---:|",
  ]
  ok = True
  for direction in ("forward", "forward_backward"):
    full = results["xla"][direction]["temp_bytes"]
    chunked = results["xla_chunked"][direction]["temp_bytes"]
    ratio = chunked / full
    ok &= ratio <= TARGET_RATIO
    lines.append(f"| {direction.replace('_', '+')} | {_mib(full)} | {_mib(chunked)} | "
                 f"{ratio:.3f} | <= {TARGET_RATIO} |")
  lines += ["", f"Result: {'met' if ok else 'NOT met'} (xla_chunked at most {TARGET_RATIO} of "
            "xla's temporary memory in both passes).", ""]
  return "\n".join(lines), ok


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", type=int, nargs=5, default=(1, 512, 384, 8, 32),
                      metavar=("B", "N", "S", "H", "D"))
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  parser.add_argument("--out", type=pathlib.Path, required=True,
                      help="directory for memory_xla_<platform>.md and .json")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  shape = tuple(args.shape)
  results = measure(*shape, dtype)
  command = " ".join(["python benchmarks/memory_xla.py"] + argv)
  text, ok = report(shape, dtype, results, command)
  print(text)
  args.out.mkdir(parents=True, exist_ok=True)
  stem = f"memory_xla_{jax.devices()[0].platform}"
  (args.out / f"{stem}.md").write_text(text)
  (args.out / f"{stem}.json").write_text(json.dumps(
      {"shape": shape, "dtype": dtype.name, "date": datetime.date.today().isoformat(),
       "jax": jax.__version__, "results": results}, indent=2) + "\n")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
