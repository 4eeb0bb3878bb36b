"""`fused_transition`: the Evoformer's MSA and pair transition, `Linear2(relu(Linear1(LN(x))))`,
as one op with three implementations: fused Pallas kernels on NVIDIA GPUs
(`jevo.ops.transition_pallas`), XLA (jevo's layer norm and dense ops) everywhere, and the two
combined: the fused forward kernel when the op is not differentiated, XLA when it is."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jevo.ops.activation import relu
from jevo.ops.dense import LINEAR_OUTPUT_NAME, dense
from jevo.ops.forward_kernel import kernel_where_undifferentiated
from jevo.ops.pallas_platform import kernels_reason
from jevo.ops.layer_norm import layer_norm
from jevo.ops.varying import match_varying_axes

IMPLEMENTATIONS = ("pallas", "pallas_forward", "xla")

# The widest channel count at which None picks "pallas_forward" on a GPU. Measured on an H200
# (bf16, 2026-12-01, benchmarks/transition_pallas_gpu.py): the fused forward takes 0.456 ms
# against XLA's 1.565 at c = 64 (5120 x 384 rows), 0.149 against 0.289 at c = 128 (384 x 384),
# but 1.03 against 0.84 ms at c = 256.
PALLAS_FORWARD_MAX_CHANNELS = 128


def fused_transition(x, ln_scale, ln_offset, w1, b1, w2, b2, *, eps: float,
                     implementation: str | None = None, config=None) -> jax.Array:
  """`relu(LayerNorm(x) @ w1 + b1) @ w2 + b2` over the last axis of x, in x's dtype.

  Args:
    x: `[..., c]`, floating point; its dtype is the compute dtype.
    ln_scale, ln_offset: `[c]`, LayerNorm's scale and offset; w1 `[c, hidden]`, b1 `[hidden]`,
      w2 `[hidden, c]`, b2 `[c]`. Float32 in jevo's modules.
    eps: LayerNorm's epsilon.
    implementation: "xla" (XLA); "pallas": the fused kernels forward and backward, which run on
      a CUDA GPU of compute capability 8.0 or newer with bfloat16 or float16 x and a
      power-of-two c from 16 to 256 (ValueError saying why elsewhere); "pallas_forward": the
      fused forward kernel where the op's inputs are not differentiated (inference, or a
      frozen part of a model), and XLA's forward and backward where they are (grad, vjp), with
      XLA's residuals, so that wherever gradients flow through the op it computes exactly what
      "xla" computes; same requirements as "pallas". None picks "pallas_forward" where the
      kernels can run and c <= PALLAS_FORWARD_MAX_CHANNELS (128), else "xla": measured on an
      H200 (bf16, 2026-12-01, benchmarks/transition_pallas_gpu.py) the fused forward is 3.4
      times XLA's at c = 64, 1.9 times at c = 128 (0.149 against 0.289 ms at 384 x 384) but
      0.81 times at c = 256, and its forward+backward is slower at every c measured (1.01
      against 0.72 ms at c = 128; 9.4 against 2.0 ms at c = 256), which is why
      differentiation runs XLA. On a GPU, exporting the undifferentiated op then needs
      `jevo.export_disabled_checks()` (XLA's Triton custom call).
    config: tiles of the Pallas kernels (`jevo.ops.transition_pallas.TransitionConfig`; None
      for the defaults), for measurements.

  The XLA implementation computes as `flax.nnx` layers of x's dtype do: parameters cast to x's
  dtype, LayerNorm in float32, products in x's dtype. The Pallas kernels round less: LayerNorm,
  the biases and relu run in float32 on the parameters as given, matrix products take x's
  dtype and accumulate in float32, and the `[rows, hidden]` activation stays on chip in the
  forward pass; the backward recomputes it. Both work under jit, grad, vmap and remat.

  Example:
    >>> c, h = 8, 32
    >>> out = fused_transition(jnp.ones((2, 3, c)), jnp.ones(c), jnp.zeros(c), jnp.ones((c, h)),
    ...                        jnp.zeros(h), jnp.ones((h, c)), jnp.zeros(c), eps=1e-5)
    >>> out.shape
    (2, 3, 8)
  """
  _check(x, ln_scale, ln_offset, w1, b1, w2, b2)
  x, ln_scale, ln_offset, w1, b1, w2, b2 = match_varying_axes(x, ln_scale, ln_offset, w1, b1,
                                                              w2, b2)
  implementation = resolve_implementation(x, w1, implementation)
  params = (ln_scale, ln_offset, w1, b1, w2, b2)
  if implementation == "xla":
    return xla_transition(x, *params, eps=eps)
  if implementation == "pallas_forward":
    return _pallas_forward(x, *params, float(eps), config)
  from jevo.ops import transition_pallas
  out = transition_pallas.transition(x, *params, eps=eps, config=config)
  return checkpoint_name(out, LINEAR_OUTPUT_NAME)


def _pallas_forward(x, ln_scale, ln_offset, w1, b1, w2, b2, eps, config):
  """The fused forward kernel where not differentiated, XLA where differentiated."""
  kernel = lambda *a: _forward_kernel(*a, eps=eps, config=config)  # noqa: E731
  reference = lambda *a: xla_transition(*a, eps=eps)  # noqa: E731
  return kernel_where_undifferentiated(kernel, reference)(x, ln_scale, ln_offset, w1, b1, w2, b2)


def _forward_kernel(*args, **kwargs):
  """The fused kernels (Pallas imported only when they are used)."""
  from jevo.ops import transition_pallas
  return transition_pallas.transition(*args, **kwargs)


def xla_transition(x, ln_scale, ln_offset, w1, b1, w2, b2, *, eps: float) -> jax.Array:
  """The XLA implementation: jevo's layer norm, dense and relu ops, with the numerics of
  `jevo.nn`'s LayerNorm and Linear layers of x's dtype. Each linear layer's output is named
  `LINEAR_OUTPUT_NAME` for checkpoint policies."""
  dtype = x.dtype
  ln_scale, ln_offset, w1, b1, w2, b2 = (p.astype(dtype) for p in
                                         (ln_scale, ln_offset, w1, b1, w2, b2))
  y = layer_norm(x, ln_scale, ln_offset, eps, dtype)
  h = relu(checkpoint_name(dense(y, w1, b1), LINEAR_OUTPUT_NAME))
  return checkpoint_name(dense(h, w2, b2), LINEAR_OUTPUT_NAME)


def resolve_implementation(x, w1, implementation: str | None = None) -> str:
  """The implementation `fused_transition` runs for these inputs: the one asked for
  (ValueError if the kernels it needs cannot run them); for None, "pallas_forward" where the
  kernels can run and c <= PALLAS_FORWARD_MAX_CHANNELS, else "xla" (see `fused_transition`)."""
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown transition implementation {implementation!r}; known: "
                     f"{', '.join(IMPLEMENTATIONS)} (or None)")
  if implementation == "xla":
    return "xla"
  reason = pallas_unsupported_reason(x, w1)
  if implementation is None:
    fits = reason is None and x.shape[-1] <= PALLAS_FORWARD_MAX_CHANNELS
    return "pallas_forward" if fits else "xla"
  if reason is not None:
    raise ValueError(f"fused_transition(implementation={implementation!r}) cannot run here: "
                     f"{reason}")
  return implementation


def pallas_unsupported_reason(x, w1) -> str | None:
  """Why the Pallas kernels cannot run `x` here, or None: the platform (decided when the
  computation is traced: the default backend, concrete inputs' devices, `jax.default_device`)
  and then the shapes and dtypes."""
  return kernels_reason(x, "transition_pallas", x, w1)


def _check(x, ln_scale, ln_offset, w1, b1, w2, b2) -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"x must be a floating-point array [..., c], got dtype {dtype}")
  if x.ndim < 1:
    raise ValueError(f"x must have shape [..., c], got shape {x.shape}")
  c = x.shape[-1]
  if w1.ndim != 2 or w1.shape[0] != c:
    raise ValueError(f"w1 must have shape [c, hidden] = [{c}, hidden], got {w1.shape}")
  hidden = w1.shape[1]
  want = dict(ln_scale=(c,), ln_offset=(c,), b1=(hidden,), w2=(hidden, c), b2=(c,))
  for name, array in dict(ln_scale=ln_scale, ln_offset=ln_offset, b1=b1, w2=w2, b2=b2).items():
    if tuple(array.shape) != want[name]:
      raise ValueError(f"{name} must have shape {want[name]} (c = {c}, hidden = {hidden}), "
                       f"got {tuple(array.shape)}")
    if not jnp.issubdtype(jnp.result_type(array), jnp.floating):
      raise TypeError(f"{name} must be floating point, got dtype {jnp.result_type(array)}")
