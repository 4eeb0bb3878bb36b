"""`DS4Sci_EvoformerAttention`: a drop-in for DeepSpeed's call, for code ported from OpenFold.

DeepSpeed takes Q, K, V `[B, N, S, H, D]` (unscaled: the kernel applies `D ** -0.5`) and up to
two additive biases, by position: `biases[0]` of shape `[B, N, 1, 1, S]` (OpenFold passes the
mask as `inf * (mask - 1)` with inf = 1e9, or 3e4 / 65504 in half precision) and `biases[1]` of
shape `[B, 1, H, S, S]` (the pair or triangle bias).

How jevo reads `biases[0]`: an entry <= `MASKED_AT_OR_BELOW` (-1e4), -inf included, is a masked
key, and NaN is a key to attend to: `math.inf * (mask - 1)` (OpenFold's formula with a true
infinity instead of its 1e9) is NaN where mask == 1 (inf * 0) and -inf where mask == 0. A
boolean `biases[0]` is taken as a mask, True = attend (as `evoformer_attention`'s `mask`), not
added as 1 / 0; an integer one is refused, since 0 / 1 could mean either. A key with an entry
<= -1e4 has softmax weight exp(-1e4) = 0 in every floating format as soon as one key of its row
is not penalised as much, so treating it as masked changes nothing there, keeps -1e9 out of the
logits (where it would overflow in fp16) and lets the fast kernels run with a boolean mask. The
only difference from DeepSpeed is a row whose keys are all masked: DeepSpeed returns some average
of V there, jevo returns 0 (OpenFold discards those rows).

Entries above the threshold are not dropped: where any of them is nonzero (a general additive
bias rather than a mask), the call takes an exact path (`jax.lax.cond`, so only one path runs
outside `vmap`) that adds them to the logits in fp32, memory-efficiently. `biases[0]` gets no
gradient, like a DeepSpeed mask bias without requires_grad; differentiating with respect to it
raises an error rather than returning a wrong zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jevo.ops.attention import evoformer_attention

# Entries of the mask bias at or below this value are masked keys (see the module docstring).
MASKED_AT_OR_BELOW = -1e4


def DS4Sci_EvoformerAttention(Q, K, V, biases):  # noqa: N802, N803 (DeepSpeed's names)
  """Attention as DeepSpeed's `DS4Sci_EvoformerAttention(Q, K, V, biases)` computes it.

  Args:
    Q, K, V: `[B, N, S, H, D]`, bfloat16 or float16 (float32 and float64 also work, on the XLA
      backends).
    biases: a list or tuple of at most two entries, each an array or None: `[mask_bias]` or
      `[mask_bias, pair_bias]`, with mask_bias `[B, N, 1, 1, S]` and pair_bias
      `[B, 1, H, S, S]`. mask_bias is floating point (0 attends; <= -1e4 or -inf is masked;
      NaN attends; other values are added to the logits) or bool (True = attend). The list is
      not modified.

  Returns:
    `[B, N, S, H, D]` in Q's dtype.
  """
  Q, K, V = jnp.asarray(Q), jnp.asarray(K), jnp.asarray(V)
  if Q.ndim != 5:
    raise ValueError(f"DS4Sci_EvoformerAttention: Q must be [B, N, S, H, D] (rank 5), "
                     f"got shape {Q.shape}")
  if not isinstance(biases, (list, tuple)):
    raise TypeError("DS4Sci_EvoformerAttention: biases must be a list or tuple of at most two "
                    f"arrays (mask bias, pair bias), got {type(biases).__name__}")
  if len(biases) > 2:
    raise ValueError("DS4Sci_EvoformerAttention: biases takes at most two entries (mask bias "
                     f"[B, N, 1, 1, S], pair bias [B, 1, H, S, S]), got {len(biases)}")
  b, n, s, h, _ = Q.shape
  mask_bias, pair_bias = (tuple(biases) + (None, None))[:2]
  _check_shape("biases[0] (mask bias)", mask_bias, (b, n, 1, 1, s))
  _check_shape("biases[1] (pair bias)", pair_bias, (b, 1, h, s, s))
  if mask_bias is None:
    return evoformer_attention(Q, K, V, bias=pair_bias)

  mask_bias = jnp.asarray(mask_bias)
  if mask_bias.dtype == jnp.bool_:
    return evoformer_attention(Q, K, V, mask=mask_bias, bias=pair_bias)
  if not jnp.issubdtype(mask_bias.dtype, jnp.floating):
    raise TypeError("DS4Sci_EvoformerAttention: biases[0] (mask bias) must be floating point "
                    "(0 = attend, -inf or <= -1e4 = masked) or bool (True = attend), got dtype "
                    f"{mask_bias.dtype}; a 0 / 1 integer mask could mean either: pass "
                    "mask.astype(bool) or 1e9 * (mask - 1.0)")
  mask_bias = _without_gradient(mask_bias.astype(_compute_dtype(Q.dtype)))
  # NaN is inf * 0, what inf * (mask - 1) gives where mask == 1: a key to attend to.
  unknown = jnp.isnan(mask_bias)
  keep = unknown | (mask_bias > MASKED_AT_OR_BELOW)
  residual = jnp.where(keep & ~unknown, mask_bias, 0.0)
  return jax.lax.cond(jnp.any(residual != 0), _with_key_bias, _with_mask,
                      Q, K, V, keep, residual, pair_bias)


def _compute_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def _check_shape(name, x, expected):
  if x is not None and tuple(jnp.shape(x)) != expected:
    raise ValueError(f"DS4Sci_EvoformerAttention: {name} must have shape {expected}, "
                     f"got {tuple(jnp.shape(x))}")


def _with_mask(Q, K, V, keep, residual, pair_bias):
  """The usual case: the mask bias is a mask (0 or <= MASKED_AT_OR_BELOW everywhere)."""
  del residual  # All zero on this path.
  return evoformer_attention(Q, K, V, mask=keep, bias=pair_bias)


def _with_key_bias(Q, K, V, keep, residual, pair_bias):
  """Exact path for a general mask bias: adds `residual[b, n, j]` to every logit of key j.

  A bias that depends on (b, n, key) is a rank-one term of the logits, so it rides along as one
  more head-dim channel: q gets a constant 1, k gets residual / scale, v gets 0. Done in fp32
  (fp64 for fp64 inputs) so that the bias keeps its precision; the output is cast back to Q's
  dtype.
  """
  d = Q.shape[-1]
  scale = d ** -0.5
  f32 = _compute_dtype(Q.dtype)
  ones = jnp.ones(Q.shape[:-1] + (1,), f32)
  key_term = jnp.broadcast_to((residual[:, :, 0, 0, :] / scale)[:, :, :, None, None],
                              K.shape[:-1] + (1,))
  q = jnp.concatenate([Q.astype(f32), ones], axis=-1)
  k = jnp.concatenate([K.astype(f32), key_term], axis=-1)
  v = jnp.concatenate([V.astype(f32), jnp.zeros_like(ones)], axis=-1)
  bias = None if pair_bias is None else jnp.asarray(pair_bias).astype(f32)
  out = evoformer_attention(q, k, v, mask=keep, bias=bias, scale=scale)
  return out[..., :d].astype(Q.dtype)


@jax.custom_vjp
def _without_gradient(x):
  return x


def _without_gradient_fwd(x):
  # With symbolic zeros, `perturbed` says whether the caller differentiates with respect to x.
  if x.perturbed:
    raise ValueError("DS4Sci_EvoformerAttention: biases[0] is a mask bias and has no gradient "
                     "here; pass it as data (not as a differentiated input), or use "
                     "jevo.evoformer_attention with a differentiable `bias`")
  return x.value, None


def _without_gradient_bwd(_, g):
  del g
  return (None,)


_without_gradient.defvjp(_without_gradient_fwd, _without_gradient_bwd, symbolic_zeros=True)
