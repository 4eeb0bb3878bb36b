"""Two forwards and two backwards of one of the kernels preset's cases through one kernel
family, for profilers. From the repository root:

    ncu --clock-control none -k regex:attention --launch-skip 2 --launch-count 3 \
        python benchmarks/profile_kernels.py msa_row cuda_sm90

Cases: those of `python -m jevo.bench --preset kernels` (msa_row, msa_col, tri_384, tri_768,
extra_msa_row, tri_2048); implementations: cuda (the device's family), cuda_sm80, cuda_sm90.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import without_command_buffers  # noqa: E402  (benchmarks/ is the script's directory)

# No XLA command buffers: each kernel is launched on its own, outside CUDA graphs, as kernel
# replay needs. With them off, ncu profiles the forward kernels on an H200 (2026-12-01, jax
# 0.11.2, the command above with --section SpeedOfLight --section WarpStateStats ...); on
# 2026-11-21 it had stopped at the first profiled kernel ("Failed to profile").
os.environ["XLA_FLAGS"] = without_command_buffers(os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402

import jevo  # noqa: E402
from jevo.bench import implementations, presets  # noqa: E402

CASES = {case.name: case for case in presets.PRESETS["kernels"].attention}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("case", nargs="?", default="msa_row", choices=sorted(CASES))
  p.add_argument("implementation", nargs="?", default="cuda",
                 choices=["cuda", "cuda_sm80", "cuda_sm90"])
  args = p.parse_args(argv)
  case = CASES[args.case]
  q, k, v, mask, bias = implementations.random_inputs(case, 0, jnp.bfloat16)

  def attend(q, k, v, bias):
    return jevo.evoformer_attention(q, k, v, mask=mask, bias=bias,
                                    implementation=args.implementation)

  def loss(q, k, v, bias):
    return jnp.sum(attend(q, k, v, bias).astype(jnp.float32))

  fwd = jax.jit(attend)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3) if bias is not None else (0, 1, 2)))
  for _ in range(2):
    jax.block_until_ready(fwd(q, k, v, bias))
    if not case.forward_only:
      jax.block_until_ready(grad(q, k, v, bias))


if __name__ == "__main__":
  main()
