"""The "xla" backend: plain attention that materialises the `[B, N, H, S, S]` logits.

It is the test oracle: every matmul runs at HIGHEST precision, logits, softmax and accumulation
in fp32 (fp64 for fp64 inputs), and gradients come from JAX's autodiff of this code, so it also
runs under forward-mode autodiff (`jax.jvp`, `jax.jacfwd`, `jax.hessian`). Memory grows with
N * H * S * S; use "xla_chunked" (or "cuda") for anything large.
"""

from __future__ import annotations

import jax

from jevo.ops import xla_common

_PRECISION = jax.lax.Precision.HIGHEST


def unsupported_reason(q, k, v, mask, bias):
  del q, k, v, mask, bias  # Runs every input that passes evoformer_attention's validation.
  return None


def attention(q, k, v, mask, bias, *, scale, deterministic):
  # XLA's own reductions decide reproducibility here; there are no float atomics of ours
  # (see XLA's --xla_gpu_deterministic_ops for bitwise-reproducible GPU runs).
  del deterministic
  s = xla_common.logits(q, k, bias, scale=scale, precision=_PRECISION)
  out, _ = xla_common.softmax_attend(s, v, mask, unit=xla_common.logit_unit(scale),
                                     precision=_PRECISION)
  return out.astype(q.dtype)
