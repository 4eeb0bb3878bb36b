"""The smallest real use of jevo's FFI path: out = alpha * x + y computed by a CUDA kernel.

Used by the tests and by `python -m jevo.selftest` to prove that the library was built, its
targets registered, and that a handler runs on XLA's stream under `jax.jit`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jevo._cuda_lib import cuda_status


def ffi_axpy(alpha: float, x: jax.Array, y: jax.Array) -> jax.Array:
  """alpha * x + y through the `jevo_selftest` CUDA handler (float32 only)."""
  status = cuda_status()
  if not status.available:
    raise RuntimeError(f"jevo CUDA kernels unavailable: {status.reason}")
  x = jnp.asarray(x)
  y = jnp.asarray(y)
  if x.dtype != jnp.float32 or y.dtype != jnp.float32:
    raise TypeError(f"ffi_axpy: x and y must be float32, got {x.dtype} and {y.dtype}")
  if x.shape != y.shape:
    raise ValueError(f"ffi_axpy: x and y must have the same shape, got {x.shape} and {y.shape}")
  call = jax.ffi.ffi_call("jevo_selftest", jax.ShapeDtypeStruct(x.shape, x.dtype))
  return call(x, y, alpha=np.float32(alpha))


def main() -> None:
  print(cuda_status())
  x = jax.random.normal(jax.random.key(0), (1000,), jnp.float32)
  y = jax.random.normal(jax.random.key(1), (1000,), jnp.float32)
  out = jax.jit(lambda a, b: ffi_axpy(2.5, a, b))(x, y)
  err = float(jnp.max(jnp.abs(out - (2.5 * x + y))))
  print(f"jevo_selftest under jax.jit on {out.devices()}: max |error| = {err:.3g}")


if __name__ == "__main__":
  main()
