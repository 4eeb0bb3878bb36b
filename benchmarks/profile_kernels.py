"""Two forwards and two backwards of a benchmark case through the CUDA kernels, for profilers.
From benchmarks/:

    ncu --clock-control none -k regex:attention --launch-skip 2 --launch-count 3 \
        python benchmarks/profile_kernels.py msa_row
"""

import os
import sys

from common import without_command_buffers  # benchmarks/ is the script's directory

# No XLA command buffers: each kernel is launched on its own, outside CUDA graphs, as kernel
# replay needs. Even so, ncu 2026-11-21 on an H200 (jax 0.11.2) stopped at the first profiled
# kernel ("Failed to profile", application error code 9), with or without command buffers; its
# memory save and restore around a replay is one suspect (try --replay-mode application).
os.environ["XLA_FLAGS"] = without_command_buffers(os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402

import jevo  # noqa: E402
from attention import CASES, _inputs  # noqa: E402  (benchmarks/ is the script's directory)


def main(case="msa_row"):
  shape, bias_kind, _ = CASES[case]
  q, k, v, mask, bias = _inputs(shape, bias_kind is not None)

  def loss(q, k, v, bias):
    out = jevo.evoformer_attention(q, k, v, mask=mask, bias=bias, implementation="cuda")
    return jnp.sum(out.astype(jnp.float32))

  fwd = jax.jit(lambda *a: jevo.evoformer_attention(*a[:3], mask=mask, bias=a[3], implementation="cuda"))
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3) if bias is not None else (0, 1, 2)))
  for _ in range(2):
    jax.block_until_ready(fwd(q, k, v, bias))
    jax.block_until_ready(grad(q, k, v, bias))


if __name__ == "__main__":
  main(*sys.argv[1:])
