"""Runs the CUDA kernels once at small, odd sizes (forward and backward, with and without mask
and bias), for compute-sanitizer:

    compute-sanitizer --tool memcheck python tests/sanitize_kernels.py
    compute-sanitizer --tool racecheck python tests/sanitize_kernels.py
"""

import jax
import jax.numpy as jnp

import jevo


def main():
  key = jax.random.key(0)
  # 200 keys with D = 32 wrap the forward's 3-stage ring; 150 with D = 64 its 2-stage one.
  # A bias with S % 8 == 0 (200, 136, 96) takes the sm90 kernels' TMA bias path; other S run
  # sm80's with a bias.
  for s, d, dtype in ((19, 8, jnp.bfloat16), (70, 32, jnp.float16), (33, 128, jnp.bfloat16),
                      (200, 32, jnp.bfloat16), (150, 64, jnp.float16), (136, 16, jnp.bfloat16),
                      (96, 128, jnp.float16)):
    shape = (2, 3, s, 2, d)
    keys = jax.random.split(key, 6)
    q, k, v, d_out = (jax.random.normal(x, shape, dtype) for x in keys[:4])
    mask = jax.random.uniform(keys[4], (2, 3, 1, 1, s)) > 0.3
    bias = jax.random.normal(keys[5], (2, 1, 2, s, s), dtype)
    for m, b in ((None, None), (mask, None), (None, bias), (mask, bias)):
      def loss(q, k, v, b):
        out = jevo.evoformer_attention(q, k, v, mask=m, bias=b, implementation="cuda")
        return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32))
      grads = jax.grad(loss, argnums=(0, 1, 2) if b is None else (0, 1, 2, 3))(q, k, v, b)
      jax.block_until_ready(grads)
      print(f"S={s} D={d} {jnp.dtype(dtype).name} mask={m is not None} bias={b is not None}: ok")


if __name__ == "__main__":
  main()
