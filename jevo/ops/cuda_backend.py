"""The "cuda" backend: jevo's fused CUDA kernels behind `jax.custom_vjp`.

The forward saves only the output, the fp32 log-sum-exp and, under differentiation, the output's
rounding residual (see `_attention_fwd`); the backward recomputes the logits tile by tile. Each
FFI call carries an explicit `vmap` rule (`custom_vmap`) that folds the mapped axis into the
batch axis the kernels already have. The kernels are deterministic: the bias gradient is reduced
over N without atomics, so `deterministic=True` costs nothing.

The library holds kernel families by GPU architecture (`jevo._cuda_lib.kernel_families()`):
sm80 (mma.sync, every GPU from A100 on) and sm90 (wgmma, H100/H200 only), each with a forward
and a backward. By default each call picks the family from the device it runs on, so
one exported program runs on both; `family_backend("sm80")` and `family_backend("sm90")` are the
backends `implementation="cuda_sm80"` and `"cuda_sm90"` that ask for one.

Under `jax.jit` with sharded inputs, each FFI call is partitioned over the batch, N and the
heads (`jevo.ops.partitioning`): every device runs the kernels on its own block and nothing is
gathered; the bias gradient, a sum over N, is summed over N's mesh axes. The per-device calls
are a parameter (`Kernels`), so that the same path runs on CPU in the tests with a pure-JAX
stand-in for the kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import types
from typing import Callable, NamedTuple

from jevo._cuda_lib import BACKWARD_TARGET, FORWARD_TARGET, cuda_status, kernel_family
from jevo.ops import partitioning
from jevo.ops.placement import placement_reason
from jevo.ops.varying import vary_like

KERNEL_DTYPES = (jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 128
# The forward's optional third result, the fp32 output minus the output, is bf16 whatever the
# element type (the handler checks it): bf16 keeps fp32's exponent range, so the small residuals
# of fp16 outputs stay normal numbers.
RESIDUAL_DTYPE = jnp.bfloat16

# The FFI calls' `family` attribute: 0 lets the handler pick by the device's compute capability.
AUTO_FAMILY = 0


def family_unsupported_reason(name):
  """Why the kernel family `name` cannot run on this process's CUDA devices, or None."""
  family = kernel_family(name)
  if family is None:
    return f"this CUDA library has no {name} kernel family"
  if not family.built:
    return (f"the {name} kernels were not built into this library (built for "
            f"{cuda_status().architectures}); rebuild with JEVO_CUDA_ARCHS including "
            f"{family.cuda_arch}")
  caps = {getattr(d, "compute_capability", None) for d in jax.devices() if d.platform == "gpu"}
  bad = sorted(c for c in caps if c and not family.runs_on(c))
  if bad:
    return (f"the {name} kernels run on compute capability {family.min_major}.x"
            + (f" to {family.max_major}.x" if family.max_major != family.min_major else "")
            + f", this GPU is {', '.join(bad)}")
  return None


def unsupported_reason(q, k, v, mask, bias, *, family=None):
  """Why the kernels cannot run these inputs, or None when they can. `family` names a kernel
  family that must run them ("sm80", "sm90"); None lets each call choose by device."""
  status = cuda_status()
  if not status.available:
    return status.reason
  placement = placement_reason(q, k, v, mask, bias, target="a CUDA device")
  if placement is not None:
    return placement
  if q.dtype not in KERNEL_DTYPES:
    return (f"the CUDA kernels take bfloat16 or float16 inputs, got {q.dtype} "
            "(float32 runs on implementation='xla_chunked')")
  head_dim = q.shape[-1]
  if head_dim % 8 != 0 or head_dim > MAX_HEAD_DIM:
    return (f"the CUDA kernels take head dims that are multiples of 8 up to {MAX_HEAD_DIM}, "
            f"got {head_dim}")
  if family is not None:
    return family_unsupported_reason(family)
  return None


def attention(q, k, v, mask, bias, *, scale, deterministic, family=None, kernels=None):
  """The op on canonical-layout inputs. `kernels` replaces the FFI calls by other per-device
  calls (a `Kernels`; the tests' CPU stand-in); None runs jevo's CUDA kernels."""
  del deterministic  # the kernels are always deterministic
  mask_arg = jnp.zeros((0,), jnp.bool_) if mask is None else mask
  bias_arg = jnp.zeros((0,), q.dtype) if bias is None else bias  # already in q's dtype
  value = AUTO_FAMILY if family is None else kernel_family(family).value
  return _attention(q, k, v, mask_arg, bias_arg, float(scale), value,
                    FFI_KERNELS if kernels is None else kernels)


def family_backend(name):
  """The backend that runs the kernel family `name` ("sm80", "sm90") and no other: what the
  tests run the shared backend suite on, once per family."""
  return types.SimpleNamespace(
      unsupported_reason=functools.partial(unsupported_reason, family=name),
      attention=functools.partial(attention, family=name))


def _fold(x, batched_axis_size):
  """[V, B, ...] -> [V * B, ...]; empty placeholder arrays stay as they are."""
  if x.size == 0:
    return x
  return x.reshape((batched_axis_size * x.shape[1],) + x.shape[2:])


def _vmap_rule(call, axis_size, in_batched, *args):
  """Folds the mapped axis into the kernels' batch axis and splits it again afterwards."""
  folded = []
  for x, batched in zip(args, in_batched):
    if x.size == 0 and not batched:  # absent mask or bias
      folded.append(x)
      continue
    if not batched:
      x = jnp.broadcast_to(x, (axis_size,) + x.shape)
    folded.append(_fold(x, axis_size))
  outs = call(*folded)
  split = tuple(o if o.size == 0 else o.reshape((axis_size, -1) + o.shape[1:]) for o in outs)
  return split, tuple(o.size != 0 for o in outs)


# The arrays' layouts for the partitioner (see jevo.ops.partitioning): q, k, v, mask, bias.
_FORWARD_OPERANDS = ("bnihd", "bnjhd", "bnjhd", "bnj", "bhij")
# ... and dout, lse, delta; the results dq, dk, dv and dbias, the sum over N.
_BACKWARD_OPERANDS = _FORWARD_OPERANDS + ("bnihd", "bnhi", "bnhi")
_BACKWARD_RESULTS = ("bnihd", "bnjhd", "bnjhd", "bhij")


def _ffi_forward(scale: float, family: int, with_residual: bool):
  """The forward FFI call on one device's inputs: (out, lse[, out_lo])."""
  def forward(q, k, v, mask, bias):
    b, n, s, h, _ = q.shape
    outs = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, h, s), jnp.float32)]
    if with_residual:
      outs.append(jax.ShapeDtypeStruct(q.shape, RESIDUAL_DTYPE))
    call = jax.ffi.ffi_call(FORWARD_TARGET, tuple(outs))
    return tuple(call(q, k, v, mask, bias, scale=np.float32(scale), family=np.int64(family)))
  return forward


def _ffi_backward(scale: float, family: int):
  """The backward FFI call on one device's inputs: (dq, dk, dv, dbias), dbias summed over the
  device's N rows."""
  def backward(q, k, v, mask, bias, dout, lse, delta):
    b, n, s, h, _ = q.shape
    chunks = bias_grad_chunks(b, n, s, h) if bias.size else 0
    outs = [jax.ShapeDtypeStruct(q.shape, q.dtype)] * 3
    outs.append(jax.ShapeDtypeStruct(bias.shape, q.dtype))
    # fp32 partials of the bias gradient, one per chunk of N; XLA allocates and frees them.
    outs.append(jax.ShapeDtypeStruct((chunks, b, h, s, s) if chunks else (0,), jnp.float32))
    call = jax.ffi.ffi_call(BACKWARD_TARGET, tuple(outs))
    return tuple(call(q, k, v, mask, bias, dout, lse, delta, scale=np.float32(scale),
                      family=np.int64(family), n_chunks=np.int64(max(chunks, 1)))[:4])
  return backward


class Kernels(NamedTuple):
  """The per-device calls behind the op. `forward(scale, family, with_residual)` gives
  `f(q, k, v, mask, bias) -> (out, lse[, out_lo])`, `backward(scale, family)` gives
  `f(q, k, v, mask, bias, dout, lse, delta) -> (dq, dk, dv, dbias)`, in the FFI calls' shapes
  and dtypes (an absent mask or bias is a `(0,)` array, and so is its dbias)."""

  forward: Callable
  backward: Callable


FFI_KERNELS = Kernels(_ffi_forward, _ffi_backward)


@functools.lru_cache(maxsize=None)
def _forward_call(scale: float, family: int, with_residual: bool = False,
                  kernels: Kernels = FFI_KERNELS):
  """The forward kernel: (out, lse), and with_residual also out's rounding residual."""
  results = ("bnihd", "bnhi") + (("bnihd",) if with_residual else ())
  like = (0, None) + ((0,) if with_residual else ())  # out and out_lo sharded like q
  call = partitioning.shard_kernel(kernels.forward(scale, family, with_residual),
                                   _FORWARD_OPERANDS, results, like)

  @jax.custom_batching.custom_vmap
  def forward(q, k, v, mask, bias):
    return call(q, k, v, mask, bias)

  @forward.def_vmap
  def forward_vmap(axis_size, in_batched, *args):
    return _vmap_rule(forward, axis_size, in_batched, *args)

  return forward


def _backward_query_tile():
  """Query rows per CTA of the backward's dQ kernel (the same in every family)."""
  family = kernel_family("sm80")
  return family.block_m if family is not None else 64


def bias_grad_chunks(batch, n, seq, heads, sm_count=None, query_tile=None):
  """How many fp32 partials the bias gradient is reduced over N in: enough CTAs (one per
  chunk x batch x head x query tile) to fill the GPU about four times, at most 64."""
  if sm_count is None:
    sm_count = getattr(jax.devices()[0], "core_count", None) or 132
  if query_tile is None:
    query_tile = _backward_query_tile()
  ctas_per_chunk = batch * heads * -(-seq // query_tile)
  wanted = -(-4 * sm_count // ctas_per_chunk)
  return max(1, min(wanted, n, 64))


@functools.lru_cache(maxsize=None)
def _backward_call(scale: float, family: int, kernels: Kernels = FFI_KERNELS):
  call = partitioning.shard_kernel(kernels.backward(scale, family), _BACKWARD_OPERANDS,
                                   _BACKWARD_RESULTS, like=(0, 1, 2, 4))  # like q, k, v, bias

  @jax.custom_batching.custom_vmap
  def backward(q, k, v, mask, bias, dout, lse, delta):
    return call(q, k, v, mask, bias, dout, lse, delta)

  @backward.def_vmap
  def backward_vmap(axis_size, in_batched, *args):
    return _vmap_rule(backward, axis_size, in_batched, *args)

  return backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, mask, bias, scale, family, kernels):
  out, _ = _forward_call(scale, family, False, kernels)(q, k, v, mask, bias)
  return vary_like(out, q, k, v, mask, bias)


def _attention_fwd(q, k, v, mask, bias, scale, family, kernels):
  # Besides out, the kernel writes out_lo = bf16(O - out), O its fp32 output: the backward's
  # delta = rowsum(dO * O) needs O to more bits than out has. With a peaked softmax (large
  # biases) dS = P * (dP - delta) is a small difference of nearly equal terms, and delta from
  # the rounded out made dq, dk and dbias about 3.5x less accurate than XLA's own gradients
  # (tests/test_attention_delta_model.py). out + out_lo holds O to 8 more bits than out at half
  # the cost of an fp32 copy. The primal (inference) forward does not write it.
  out, lse, out_lo = _forward_call(scale, family, True, kernels)(q, k, v, mask, bias)
  # Inside shard_map the FFI call's results carry no varying axes; each device computed its own.
  out, lse, out_lo = (vary_like(x, q, k, v, mask, bias) for x in (out, lse, out_lo))
  return out, (q, k, v, mask, bias, out, out_lo, lse)


def row_delta(dout, out, out_lo):
  """delta = rowsum(dO * O) in fp32, O = out + out_lo, laid out [B, N, H, S] like the LSE."""
  o = out.astype(jnp.float32) + out_lo.astype(jnp.float32)
  return jnp.swapaxes(jnp.sum(dout.astype(jnp.float32) * o, axis=-1), -1, -2)


def _attention_bwd(scale, family, kernels, residuals, dout):
  q, k, v, mask, bias, out, out_lo, lse = residuals
  dout = dout.astype(q.dtype)
  delta = row_delta(dout, out, out_lo)
  dq, dk, dv, dbias = _backward_call(scale, family, kernels)(q, k, v, mask, bias, dout, lse,
                                                             delta)
  # custom_vjp wants each cotangent typed like its primal, varying axes included (shard_map).
  dq, dk, dv, dbias = (vary_like(g, x) for g, x in ((dq, q), (dk, k), (dv, v), (dbias, bias)))
  return dq, dk, dv, None, (dbias if bias.size else None)


_attention.defvjp(_attention_fwd, _attention_bwd)
