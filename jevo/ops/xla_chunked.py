"""The "xla_chunked" backend: memory-efficient attention in pure JAX.

Queries are processed in chunks (`jax.lax.map` / `jax.lax.scan`), so the fp32 logits that exist
at any time are one block `[B, N, H, chunk, S]`, never `[B, N, H, S, S]`. The forward saves only
the output and the per-row softmax statistics (the log-sum-exp, kept as row maximum and log of
the shifted sum); the backward (a `jax.custom_vjp`) recomputes the logits chunk by chunk,
FlashAttention-style:

    P = exp(S - lse),  delta = rowsum(dO * O),  dP = dO V^T,  dS = P * (dP - delta),
    dQ = scale dS K,   dK = scale dS^T Q,        dV = P^T dO,  dBias = sum_N dS

with dK and dV accumulated in fp32 (fp64 for fp64 inputs) over chunks, and dBias produced one
`[B, H, chunk, S]` block per chunk, so `[B, N, H, S, S]` is never materialised in either
direction. Being a `custom_vjp`, it has reverse-mode derivatives only: forward mode (`jax.jvp`,
`jax.jacfwd`, `jax.hessian`) needs `implementation="xla"`.

The chunk size is chosen per call from the static shapes (see `choose_query_chunk`); set the
module-level `QUERY_CHUNK_SIZE` (or pass `query_chunk_size=` to `attention`) to fix it;
`choose_query_chunk` says what a call will use.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jevo.ops import xla_common

# A fixed query chunk size for every call, or None to choose it from the shapes.
QUERY_CHUNK_SIZE: int | None = None
# The automatic choice aims for one fp32 logits block [B, N, H, chunk, S] of about this size;
# the forward keeps about two such blocks alive, the backward about four.
LOGITS_BLOCK_BYTES = 64 * 2**20
# Smaller chunks would make the loop's per-iteration overhead dominate.
MIN_QUERY_CHUNK = 16
# The chunk when the batch dims are symbolic (jax.export with shape polymorphism), so that the
# size of a logits block cannot be computed when tracing.
SYMBOLIC_QUERY_CHUNK = 64


def unsupported_reason(q, k, v, mask, bias):
  del q, k, v, mask, bias  # Runs every input that passes evoformer_attention's validation.
  return None


def choose_query_chunk(batch: int, n: int, heads: int, seq: int,
                       requested: int | None = None) -> int:
  """The query chunk used for `[batch, n, seq, heads, D]` inputs.

  `requested` (else `QUERY_CHUNK_SIZE`, else a size that keeps one fp32 logits block near
  `LOGITS_BLOCK_BYTES`) is a target; the chunk returned is the smallest size that covers `seq`
  in the same number of chunks, so that padding of the last chunk stays small.
  """
  if not isinstance(seq, int):
    raise ValueError(f"xla_chunked cuts the attended axis S into chunks, so S must be a "
                     f"concrete size, got the symbolic S = {seq} (jax.export shape "
                     f"polymorphism); export with a concrete S, or use implementation='xla'")
  target = requested if requested is not None else QUERY_CHUNK_SIZE
  if target is None:
    row_elems = batch * n * heads * seq
    if isinstance(row_elems, int):
      target = max(MIN_QUERY_CHUNK, LOGITS_BLOCK_BYTES // max(1, row_elems * 4) // 8 * 8)
    else:  # symbolic batch dims (jax.export): the memory of a row is not known when tracing
      target = SYMBOLIC_QUERY_CHUNK
  if isinstance(target, bool) or not isinstance(target, int) or target < 1:
    raise ValueError(f"query chunk size must be a positive int, got {target!r}")
  target = min(target, max(seq, 1))
  n_chunks = -(-seq // target)
  return max(1, -(-seq // max(n_chunks, 1)))


def attention(q, k, v, mask, bias, *, scale, deterministic, query_chunk_size=None):
  # Chunks are visited in a fixed order and dK, dV, dBias are summed sequentially: no float
  # atomics of ours, so `deterministic` asks for nothing extra (XLA's own GPU reductions are
  # governed by --xla_gpu_deterministic_ops).
  del deterministic
  b, n, s, h, _ = q.shape
  chunk = choose_query_chunk(b, n, h, s, query_chunk_size)
  return _attention(q, k, v, mask, bias, float(scale), chunk)


def _precision(dtype):
  # fp32 (and fp64) inputs get full-precision matmuls (not TF32 / bf16 passes); bf16 and fp16
  # products are exact in the fp32 accumulator at the default precision, and the output is
  # rounded to 8-11 bits anyway.
  if dtype in (jnp.float32, jnp.float64):
    return jax.lax.Precision.HIGHEST
  return jax.lax.Precision.DEFAULT


def _pad_rows(x, axis, length, value=0):
  """Pads `x` along `axis` up to `length` (the query axis rounded up to whole chunks)."""
  extra = length - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _unchunk(y, axis, length):
  """[n_chunks, ..., chunk (at axis+1 after moving), ...] -> rows concatenated, cut to `length`."""
  y = jnp.moveaxis(y, 0, axis)
  y = y.reshape(y.shape[:axis] + (y.shape[axis] * y.shape[axis + 1],) + y.shape[axis + 2:])
  return jax.lax.slice_in_dim(y, 0, length, axis=axis)


def _forward(q, k, v, mask, bias, scale, chunk):
  """Output `[B, N, S, H, D]` in q.dtype and the softmax statistics (shift, log_norm), each
  `[n_chunks, B, N, H, chunk]` in the compute dtype (see xla_common.softmax_attend)."""
  seq = q.shape[2]
  n_chunks = -(-seq // chunk)
  padded = n_chunks * chunk
  # Padded query rows see real keys, so they stay finite; their rows are cut off below.
  q_p = _pad_rows(q, 2, padded)
  bias_p = None if bias is None else _pad_rows(bias, 2, padded)
  precision = _precision(q.dtype)

  def one_chunk(i):
    start = i * chunk
    qc = jax.lax.dynamic_slice_in_dim(q_p, start, chunk, axis=2)
    bc = None if bias_p is None else jax.lax.dynamic_slice_in_dim(bias_p, start, chunk, axis=2)
    s = xla_common.logits(qc, k, bc, scale=scale, precision=precision)
    out, stats = xla_common.softmax_attend(s, v, mask, unit=xla_common.logit_unit(scale),
                                           precision=precision)
    return out.astype(q.dtype), stats

  outs, stats = jax.lax.map(one_chunk, jnp.arange(n_chunks))
  return _unchunk(outs, 2, seq), stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, mask, bias, scale, chunk):
  return _forward(q, k, v, mask, bias, scale, chunk)[0]


def _attention_fwd(q, k, v, mask, bias, scale, chunk):
  out, stats = _forward(q, k, v, mask, bias, scale, chunk)
  return out, (q, k, v, mask, bias, out, stats)


def _attention_bwd(scale, chunk, residuals, d_out):
  q, k, v, mask, bias, out, stats = residuals
  seq = q.shape[2]
  n_chunks = stats[0].shape[0]
  padded = n_chunks * chunk
  precision = _precision(q.dtype)
  acc = xla_common.compute_dtype(q.dtype)
  unit = xla_common.logit_unit(scale)
  # Padded rows get dO = 0, hence dS = 0 and dV += 0: they contribute nothing.
  q_p = _pad_rows(q, 2, padded)
  bias_p = None if bias is None else _pad_rows(bias, 2, padded)
  do_p = _pad_rows(d_out, 2, padded)
  out_p = _pad_rows(out, 2, padded)
  km = xla_common.key_mask(mask)
  k_acc = k.astype(acc)
  v_acc = v.astype(acc)

  def one_chunk(carry, xs):
    dk, dv = carry
    i, (shift, log_norm) = xs
    start = i * chunk
    rows = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=start, slice_size=chunk,
                             axis=2)
    qc = rows(q_p)
    bc = None if bias_p is None else rows(bias_p)
    do_c = rows(do_p).astype(acc)
    s = xla_common.logits(qc, k, bc, scale=scale, precision=precision)
    # log_norm is +inf on rows without an unmasked key, so P is 0 there. s - shift is exact
    # where it matters (the shift is the row maximum of the same logits).
    p = jnp.exp(xla_common.exponent(s, shift[..., None], unit) - log_norm[..., None])
    if km is not None:
      p = jnp.where(km, p, 0.0)
    delta = jnp.einsum("bnqhd,bnqhd->bnhq", do_c, rows(out_p).astype(acc))
    dp = jnp.einsum("bnqhd,bnkhd->bnhqk", do_c, v_acc, precision=precision)
    # The gradient with respect to the logits themselves (not to s, which is in units).
    ds = p * (dp - delta[..., None])
    dv = dv + jnp.einsum("bnhqk,bnqhd->bnkhd", p, do_c, precision=precision)
    dk = dk + acc.type(scale) * jnp.einsum("bnhqk,bnqhd->bnkhd", ds, qc.astype(acc),
                                           precision=precision)
    dq_c = acc.type(scale) * jnp.einsum("bnhqk,bnkhd->bnqhd", ds, k_acc, precision=precision)
    # The bias is shared over N, so its gradient is the sum over N, reduced per chunk.
    db_c = None if bias is None else jnp.sum(ds, axis=1).astype(bias.dtype)
    return (dk, dv), (dq_c.astype(q.dtype), db_c)

  # zeros_like keeps k's varying-manual-axes type, so the loop also type-checks inside shard_map.
  zeros = jnp.zeros_like(k, dtype=acc)
  (dk, dv), (dq, dbias) = jax.lax.scan(one_chunk, (zeros, zeros), (jnp.arange(n_chunks), stats))
  dq = _unchunk(dq, 2, seq)
  dbias = None if bias is None else _unchunk(dbias, 2, seq)
  # The mask is boolean: it has no cotangent.
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, dbias


_attention.defvjp(_attention_fwd, _attention_bwd)
