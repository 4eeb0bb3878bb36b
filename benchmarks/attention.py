"""Evoformer attention, side by side: jevo's CUDA kernels, the xla and xla_chunked backends and
cuDNN (jax.nn.dot_product_attention), on AlphaFold's shapes in bf16 with 10% of keys masked.

Each (case, backend) runs in a fresh process so that its peak device memory is its own:
median forward and forward+backward ms, effective TFLOP/s (forward 4*B*N*H*S*S*D FLOPs,
forward+backward 3.5x that) and peak extra device memory (peak bytes in use minus the inputs).

    python benchmarks/attention.py                     # all cases, all backends
    python benchmarks/attention.py --cases msa_row --backends cuda xla
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys

from common import median_ms, run_worker, write_results  # benchmarks/ is the script's directory

# name: (B, N, S, H, D), bias kind, forward only
CASES = {
    "msa_row": ((1, 512, 384, 8, 32), "pair", False),
    "msa_col": ((1, 384, 512, 8, 32), None, False),
    "tri_384": ((1, 384, 384, 4, 32), "pair", False),
    "tri_768": ((1, 768, 768, 4, 32), "pair", False),
    "extra_msa_row": ((1, 5120, 384, 8, 8), "pair", False),
    "tri_2048": ((1, 2048, 2048, 4, 32), "pair", True),
    # The four attentions of one Evoformer block at AlphaFold's initial-training size (128 x 256).
    "msa_row_256": ((1, 128, 256, 8, 32), "pair", False),
    "msa_col_128": ((1, 256, 128, 8, 32), None, False),
    "tri_256": ((1, 256, 256, 4, 32), "pair", False),
}
BACKENDS = ("cuda", "cudnn", "xla_chunked", "xla")
RESULTS = pathlib.Path(__file__).parent / "results"


def flops(shape, backward):
  b, n, s, h, d = shape
  forward = 4 * b * n * h * s * s * d
  return forward * 3.5 if backward else forward


def _inputs(shape, with_bias):
  import jax
  import jax.numpy as jnp
  b, n, s, h, d = shape
  keys = jax.random.split(jax.random.key(0), 5)
  q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys[:3])
  mask = jax.random.uniform(keys[3], (b, n, 1, 1, s)) >= 0.1
  bias = jax.random.normal(keys[4], (b, 1, h, s, s), jnp.bfloat16) if with_bias else None
  return q, k, v, mask, bias


def _attention_fn(backend):
  import jax
  import jax.numpy as jnp
  import jevo

  if backend != "cudnn":
    return lambda q, k, v, mask, bias: jevo.evoformer_attention(
        q, k, v, mask=mask, bias=bias, implementation=backend)

  def cudnn(q, k, v, mask, bias):
    b, n, s, h, d = q.shape
    fold = lambda x: x.reshape(b * n, s, h, d)  # noqa: E731  rows of N become batch entries
    # cuDNN takes the key mask as [B*N, 1, 1, S] and the pair bias as [1, H, S, S], each broadcast;
    # without a bias it wants the mask with its query axis too ([B*N, 1, S, S]).
    cmask = mask.reshape(b * n, 1, 1, s)
    if bias is None:
      cmask = jnp.broadcast_to(cmask, (b * n, 1, s, s))
    cbias = None if bias is None else bias.reshape(b, h, s, s)
    if cbias is not None and b > 1:
      cbias = jnp.repeat(cbias, n, axis=0)
    out = jax.nn.dot_product_attention(fold(q), fold(k), fold(v), bias=cbias, mask=cmask,
                                       implementation="cudnn")
    return out.reshape(q.shape)

  return cudnn


def worker(case, backend, repeats):
  """Runs in its own process; prints one JSON line."""
  import jax
  import jax.numpy as jnp

  shape, bias_kind, forward_only = CASES[case]
  device = jax.devices()[0]
  q, k, v, mask, bias = _inputs(shape, bias_kind is not None)
  # The output's cotangent is an input of the backward, as q is of the forward: it exists before
  # the measured window, so peaks count only what the op itself allocates.
  d_out = jax.random.normal(jax.random.key(7), shape, jnp.bfloat16)
  jax.block_until_ready((q, k, v, mask, bias, d_out))
  memory = lambda key: (device.memory_stats() or {}).get(key, 0)  # noqa: E731  (none on CPU)
  base = memory("bytes_in_use")
  attn = _attention_fn(backend)
  result = dict(case=case, backend=backend, shape=shape, bias=bias_kind)

  fwd = jax.jit(attn)
  try:
    jax.block_until_ready(fwd(q, k, v, mask, bias))  # one call alone: its peak is the peak
    result["fwd_peak_gib"] = (memory("peak_bytes_in_use") - base) / 2**30
    result["fwd_ms"] = median_ms(fwd, (q, k, v, mask, bias), repeats, batch=5, warmup=2)
    result["fwd_tflops"] = flops(shape, False) / result["fwd_ms"] / 1e9
  except Exception as err:  # out of memory or unsupported: recorded, not fatal
    result["fwd_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
  if forward_only or "fwd_error" in result:
    print(json.dumps(result))
    return

  def forward_backward(q, k, v, mask, bias, d_out):
    """The forward, then the gradients of q, k, v (and bias) for the cotangent d_out."""
    if bias is None:
      _, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, mask, None), q, k, v)
    else:
      _, vjp = jax.vjp(lambda q, k, v, bias: attn(q, k, v, mask, bias), q, k, v, bias)
    return vjp(d_out)

  grad = jax.jit(forward_backward)
  try:
    jax.block_until_ready(grad(q, k, v, mask, bias, d_out))
    result["fwdbwd_peak_gib"] = (memory("peak_bytes_in_use") - base) / 2**30
    result["fwdbwd_ms"] = median_ms(grad, (q, k, v, mask, bias, d_out), repeats, batch=5, warmup=2)
    result["fwdbwd_tflops"] = flops(shape, True) / result["fwdbwd_ms"] / 1e9
  except Exception as err:
    result["fwdbwd_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
  print(json.dumps(result))


def _cell(r, key):
  if f"{key}_error" in r:
    return "OOM" if "RESOURCE_EXHAUSTED" in r[f"{key}_error"] or "memory" in r[f"{key}_error"].lower() else "error"
  if f"{key}_ms" not in r:
    return "-"
  return f"{r[f'{key}_ms']:.2f} ms, {r[f'{key}_tflops']:.0f} TF/s, {r[f'{key}_peak_gib']:.2f} GiB"


def table(results):
  lines = ["| case | backend | forward | forward+backward |", "|---|---|---|---|"]
  for r in results:
    lines.append(f"| {r['case']} | {r['backend']} | {_cell(r, 'fwd')} | {_cell(r, 'fwdbwd')} |")
  return "\n".join(lines)


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cases = list(dict.fromkeys(r["case"] for r in results))
  backends = list(dict.fromkeys(r["backend"] for r in results))
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  for ax, key in zip(axes, ("fwd", "fwdbwd")):
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
      values = []
      for case in cases:
        r = next((r for r in results if r["case"] == case and r["backend"] == backend), {})
        values.append(r.get(f"{key}_ms", 0.0))
      ax.bar([c + i * width for c in range(len(cases))], values, width, label=backend)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))], cases, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("median ms (log)")
    ax.set_title({"fwd": "forward", "fwdbwd": "forward + backward"}[key])
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", nargs="*", default=list(CASES))
  parser.add_argument("--backends", nargs="*", default=list(BACKENDS))
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", default=str(RESULTS / "attention_h200"))
  parser.add_argument("--worker", nargs=2, metavar=("CASE", "BACKEND"))
  args = parser.parse_args()
  if args.worker:
    worker(*args.worker, args.repeats)
    return

  results = []
  for case in args.cases:
    for backend in args.backends:
      cmd = [sys.executable, __file__, "--worker", case, backend, "--repeats", str(args.repeats)]
      r = run_worker(cmd, os.environ.copy())
      if "error" in r:
        r = dict(case=case, backend=backend, fwd_error=r["error"])
      results.append(r)
      print(json.dumps(r), flush=True)

  import jax
  meta = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind,
              jax=jax.__version__, command="python benchmarks/attention.py " + " ".join(sys.argv[1:]))
  md = f"# Evoformer attention on {meta['device']}\n\n{meta['date']}, jax {meta['jax']}, `{meta['command']}`\n\n"
  out = write_results(args.out, meta, results, md + table(results) + "\n")
  try:
    plot(results, out.with_suffix(".png"))
  except ImportError:
    pass
  print(table(results))


if __name__ == "__main__":
  main()
