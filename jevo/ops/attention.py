"""`evoformer_attention`: the public op. Validates, normalises the layout, picks a backend."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jevo.ops.varying import match_varying_axes
from jevo.ops import backends

SUPPORTED_DTYPES = tuple(jnp.dtype(t) for t in (jnp.bfloat16, jnp.float16, jnp.float32,
                                                 jnp.float64))
_LAYOUT = "[*B, N, S, H, D]"
# What JAX raises when forward-mode autodiff meets a `custom_vjp`: recognised to say instead
# which backend has forward mode (where `_under_forward_mode` does not see it coming).
_JAX_FORWARD_MODE_ERROR = "can't apply forward-mode autodiff (jvp) to a custom_vjp function"


def evoformer_attention(q, k, v, *, mask=None, bias=None, scale=None, implementation=None,
                        deterministic=False):
  """Attention over the S axis, independently for every batch index and every N.

  out[..., n, i, h, :] = sum_j softmax_j(scale * q[..., n, i, h, :] . k[..., n, j, h, :]
                                         + bias[..., 0, h, i, j]) * v[..., n, j, h, :]

  over the keys j that `mask` allows. The four Evoformer attentions are calls of this op:
  MSA row attention (S = residues, bias = pair bias), MSA column attention (the MSA transposed so
  that S = sequences, mask only), and triangle attention around the starting / ending node (the
  pair representation, transposed for the ending node, bias projected from the pair).

  Args:
    q, k, v: `[*B, N, S, H, D]` with any number of leading batch dims (including none), all of
      one dtype: bfloat16, float16, float32 or float64 (float32 and float64 run on the XLA
      backends; float64 needs `jax.config.update("jax_enable_x64", True)`, and its softmax and
      accumulation run in float64).
    mask: optional bool, broadcastable to `[*B, N, 1, 1, S]`; True = attend to that key. It gets
      no gradient. A query row whose keys are all masked gets output 0 (and gradient 0).
    bias: optional, broadcastable to `[*B, 1, H, S, S]`: an additive bias shared over N. It is
      cast to q.dtype before use (so a float32 bias with bfloat16 q is rounded to bfloat16, as
      it would be in a bfloat16 model) and is differentiable; its gradient is the sum over N,
      and over any axes it was broadcast along.
    scale: the logit scale, a finite Python number; defaults to `D ** -0.5`. Any finite scale
      gives the softmax of the exact logits (the XLA backends carry logits divided by |scale|
      when |scale| > 1, so that they cannot overflow).
    implementation: None (the best backend that supports the inputs: "cuda", else
      "xla_chunked"), or one of "cuda", "xla_chunked", "xla", or "cuda_sm80" / "cuda_sm90"
      (the CUDA kernels of one GPU architecture family; "cuda" picks the family by device).
      A backend named explicitly that cannot run the inputs raises ValueError saying why;
      nothing falls back silently. Only
      "xla" has forward-mode derivatives (`jax.jvp`, `jax.jacfwd`, `jax.hessian`); the others
      are `custom_vjp`s, with reverse mode only, and say so when forward mode meets them.
    deterministic: require bitwise-reproducible results: the same inputs give the same output
      and gradients, bit for bit, on every run of one compiled program on one device. Every
      backend gives that already (the CUDA kernels and the chunked backward reduce in a fixed
      order, without float atomics; nothing here scatters), so True never changes the
      computation; it states the requirement, which a backend added later must meet or refuse.

  Returns:
    `[*B, N, S, H, D]` in q.dtype. Softmax and accumulation run in fp32.

  Example:
    >>> msa = jax.random.normal(jax.random.key(0), (2, 16, 64, 8, 32), jnp.bfloat16)
    >>> pair_bias = jax.random.normal(jax.random.key(1), (2, 1, 8, 64, 64), jnp.bfloat16)
    >>> out = evoformer_attention(msa, msa, msa, bias=pair_bias)
  """
  call = _prepare(q, k, v, mask, bias, scale, implementation, deterministic)
  if call.empty:
    # Nothing to attend over or nothing to compute: zeros, with zero gradients.
    return jnp.zeros(call.out_shape, call.q.dtype)
  if call.implementation in backends.REVERSE_MODE_ONLY and _under_forward_mode(call.q, call.k, call.v,
                                                                        call.bias):
    raise TypeError(forward_mode_message(call.implementation))
  backend = backends.get(call.implementation)
  try:
    out = backend.attention(call.q, call.k, call.v, call.mask, call.bias, scale=call.scale,
                            deterministic=call.deterministic)
  except TypeError as err:
    if _JAX_FORWARD_MODE_ERROR not in str(err):
      raise
    raise TypeError(forward_mode_message(call.implementation)) from err
  return out.reshape(call.out_shape)


def _under_forward_mode(*arrays) -> bool:
  """Whether forward-mode autodiff (`jax.jvp`, `jax.jacfwd`) is differentiating any of `arrays`
  right here. JAX itself fails only where the custom VJP's tangent is evaluated: inside
  `jax.jit`, when the step is compiled, far from this call and in JAX's words. Reverse mode
  (`jax.grad`, `jax.vjp`) and `jax.linearize` trace with a linearize trace, not a JVP trace, so
  they pass; `jax.jvp` of an already-jitted function differentiates the traced program, not
  this call, and still gets JAX's message."""
  try:
    from jax._src import core
    from jax._src.interpreters import ad
    trace = core.trace_ctx.trace
    return isinstance(trace, ad.JVPTrace) and any(
        isinstance(x, ad.JVPTracer) and x._trace is trace and not isinstance(x.tangent, ad.Zero)
        for x in arrays)
  except (ImportError, AttributeError):  # JAX's internals moved: JAX's own message then
    return False


def forward_mode_message(implementation: str) -> str:
  """What evoformer_attention says when forward-mode autodiff meets a custom-VJP backend."""
  return (f"evoformer_attention: implementation={implementation!r} has reverse-mode "
          "derivatives only (jax.grad, jax.vjp, jax.jacrev); forward mode (jax.jvp, "
          "jax.jacfwd, jax.hessian) needs implementation='xla', which materialises the "
          "[*B, N, H, S, S] logits")


def resolve_implementation(q, k, v, *, mask=None, bias=None, implementation=None) -> str:
  """The backend name that `evoformer_attention` would run for these inputs (validating them)."""
  return _prepare(q, k, v, mask, bias, None, implementation, False).implementation


class _Call(NamedTuple):
  """Validated inputs in the backends' canonical layout, and the chosen backend."""

  q: jax.Array
  k: jax.Array
  v: jax.Array
  mask: jax.Array | None
  bias: jax.Array | None
  scale: float
  deterministic: bool
  implementation: str
  out_shape: tuple[int, ...]
  empty: bool


def _prepare(q, k, v, mask, bias, scale, implementation, deterministic) -> _Call:
  q, k, v = _check_qkv(q, k, v)
  *batch, n, s, h, d = q.shape
  batch = tuple(batch)
  mask = _check_mask(mask, batch, n, s)
  bias = _check_bias(bias, batch, h, s)
  scale = _check_scale(scale, d)
  if not isinstance(deterministic, (bool, np.bool_)):
    raise TypeError(f"evoformer_attention: deterministic must be a bool, got {deterministic!r}")
  _check_implementation_name(implementation)

  # Canonical layout: leading batch dims flattened to one B; mask and bias broadcast to it.
  b = math.prod(batch)
  q, k, v = (x.reshape(b, n, s, h, d) for x in (q, k, v))
  if mask is not None:
    mask = jnp.broadcast_to(mask, batch + (n, 1, 1, s)).reshape(b, n, s)
  if bias is not None:
    # Broadcasting here makes autodiff sum the bias gradient over the broadcast axes.
    bias = jnp.broadcast_to(bias.astype(q.dtype), batch + (1, h, s, s)).reshape(b, h, s, s)
  q, k, v, mask, bias = match_varying_axes(q, k, v, mask, bias)

  name = _choose_backend(implementation, q, k, v, mask, bias)
  return _Call(q, k, v, mask, bias, scale, bool(deterministic), name,
               tuple(batch) + (n, s, h, d), q.size == 0)


def _dtype_names():
  return ", ".join(str(dt) for dt in SUPPORTED_DTYPES)


def _as_array(x, name):
  if x is None:
    raise TypeError(f"evoformer_attention: {name} is required, got None")
  try:
    return jnp.asarray(x)
  except TypeError as err:
    raise TypeError(f"evoformer_attention: {name} must be an array, "
                    f"got {type(x).__name__}") from err


def _check_qkv(q, k, v):
  q, k, v = (_as_array(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
  if q.ndim < 4:
    raise ValueError(f"evoformer_attention: q must be {_LAYOUT} (rank >= 4), "
                     f"got shape {q.shape} (rank {q.ndim})")
  axes = ("N", "S", "H", "D")
  for name, x in (("k", k), ("v", v)):
    if x.shape == q.shape:
      continue
    if x.ndim != q.ndim:
      raise ValueError(f"evoformer_attention: {name} must have the same shape as q {_LAYOUT} = "
                       f"{q.shape}, got shape {x.shape} (rank {x.ndim}, q has rank {q.ndim})")
    # Name the first axis (from the end) that differs: heads and head dims are the usual slips.
    for axis, label in zip(range(-1, -5, -1), reversed(axes)):
      if x.shape[axis] != q.shape[axis]:
        what = {"N": "N axis", "S": "sequence length S", "H": "number of heads H",
                "D": "head dim D"}[label]
        raise ValueError(f"evoformer_attention: {name} must have the same shape as q {_LAYOUT} = "
                         f"{q.shape}, got {x.shape}: the {what} differs "
                         f"(q: {q.shape[axis]}, {name}: {x.shape[axis]})")
    raise ValueError(f"evoformer_attention: {name} must have the same shape as q {_LAYOUT} = "
                     f"{q.shape}, got {x.shape}: the batch dims *B differ "
                     f"(q: {q.shape[:-4]}, {name}: {x.shape[:-4]})")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.dtype not in SUPPORTED_DTYPES:
      raise TypeError(f"evoformer_attention: {name} has dtype {x.dtype}; "
                      f"supported: {_dtype_names()}")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError("evoformer_attention: q, k and v must have one dtype, "
                    f"got q {q.dtype}, k {k.dtype}, v {v.dtype}")
  return q, k, v


def _broadcastable(shape, target):
  """Whether `shape` broadcasts to `target` under NumPy's rules (aligned from the right)."""
  if len(shape) > len(target):
    return False
  return all(a in (1, t) for a, t in zip(reversed(shape), reversed(target)))


def _check_mask(mask, batch, n, s):
  if mask is None:
    return None
  mask = _as_array(mask, "mask")
  if mask.dtype != jnp.bool_:
    raise TypeError(f"evoformer_attention: mask must be boolean (True = attend), got dtype "
                    f"{mask.dtype}; pass additive terms as `bias`, or convert with `mask > 0`")
  target = batch + (n, 1, 1, s)
  if not _broadcastable(mask.shape, target):
    raise ValueError(f"evoformer_attention: mask must be broadcastable to [*B, N, 1, 1, S] = "
                     f"{target}, got shape {mask.shape}")
  return mask


def _check_bias(bias, batch, h, s):
  if bias is None:
    return None
  bias = _as_array(bias, "bias")
  if not jnp.issubdtype(bias.dtype, jnp.floating):
    raise TypeError(f"evoformer_attention: bias must be floating point, got dtype {bias.dtype}")
  target = batch + (1, h, s, s)
  if not _broadcastable(bias.shape, target):
    raise ValueError(f"evoformer_attention: bias must be broadcastable to [*B, 1, H, S, S] = "
                     f"{target} (shared over N), got shape {bias.shape}")
  return bias


def _check_scale(scale, d):
  if scale is None:
    # With D = 0 the output is empty, whatever the scale.
    return d ** -0.5 if d > 0 else 1.0
  if isinstance(scale, (bool, np.bool_)):
    raise TypeError(f"evoformer_attention: scale must be a number, got {scale!r}")
  try:
    # The scale is baked into the computation, so it must be known at trace time.
    scale = float(scale)
  except TypeError as err:
    raise TypeError("evoformer_attention: scale must be a static (Python, NumPy or concrete) "
                    f"number, got {type(scale).__name__}") from err
  if not math.isfinite(scale):
    raise ValueError(f"evoformer_attention: scale must be finite, got {scale}")
  return scale


def _check_implementation_name(implementation):
  if implementation is not None and (not isinstance(implementation, str)
                                     or implementation not in backends.NAMES):
    choices = ", ".join(repr(name) for name in backends.NAMES)
    raise ValueError(f"evoformer_attention: implementation must be None or one of {choices}, "
                     f"got {implementation!r}")


def _choose_backend(implementation, q, k, v, mask, bias) -> str:
  if implementation is not None:
    reason = backends.get(implementation).unsupported_reason(q, k, v, mask, bias)
    if reason is not None:
      raise ValueError(f"evoformer_attention: implementation={implementation!r} cannot run "
                       f"these inputs: {reason}")
    return implementation
  reasons = []
  for name in backends.AUTO_ORDER:
    reason = backends.get(name).unsupported_reason(q, k, v, mask, bias)
    if reason is None:
      return name
    reasons.append(f"{name}: {reason}")
  raise ValueError("evoformer_attention: no backend can run these inputs: " + "; ".join(reasons))
