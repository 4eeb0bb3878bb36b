"""The "cuda" backend: jevo's fused CUDA kernels (forward and backward) behind custom_vjp."""

from __future__ import annotations

from jevo._cuda_lib import cuda_status


def unsupported_reason(q, k, v, mask, bias):
  status = cuda_status()
  if not status.available:
    return status.reason
  return "the CUDA attention kernels are not wired yet"


def attention(q, k, v, mask, bias, *, scale, deterministic):
  raise NotImplementedError(unsupported_reason(q, k, v, mask, bias))
