"""The Evoformer transition `Linear2(relu(Linear1(LayerNorm(x))))` fused into Pallas kernels
(Triton on NVIDIA GPUs), forward and backward, behind one `jax.custom_vjp`.

Forward, one kernel: each program takes a block of rows, layer-normalises it in float32 and
loops over chunks of the hidden width, `h = relu(ln(x) @ W1[:, k] + b1[k])` then
`out += h @ W2[k, :]`, so that the `[rows, 4 c]` hidden activation stays on chip. It keeps
nothing for the backward pass but its inputs.

Backward, two kernels that recompute `ln(x)` and the hidden chunk instead of reading them:
- the input kernel, over row blocks: `dln = sum_k relu'(a_k) (g @ W2[k, :]^T) @ W1[:, k]^T` and
  LayerNorm's backward give dx; per-block float32 partial sums of the LayerNorm parameters' and
  b2's gradients;
- the parameter kernel, over (hidden chunk, row group): each program loops over the row blocks
  of its group and accumulates its chunk of dW1, dW2 and db1 in float32 registers.
The partial sums are added in XLA in a fixed order: no atomics, so gradients are the same bit
for bit on every run. Rows past the end of the array are masked (loaded as zeros, which
contribute nothing to any gradient, and never stored).

Numerics: matrix products take the activations' dtype (bfloat16 or float16) with float32
accumulation; LayerNorm, the biases and relu run in float32 with the parameters as given
(float32 in jevo's modules); the output is rounded once, to x's dtype.

This module imports Pallas; `jevo.ops.transition` imports it only when the kernels are used.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jevo.ops.pallas_rows import KERNEL_DTYPES
from jevo.ops.pallas_rows import layer_norm as _layer_norm
from jevo.ops.pallas_rows import matrix_spec as _matrix_spec
from jevo.ops.pallas_rows import mm as _mm
from jevo.ops.pallas_rows import normalize as _normalize
from jevo.ops.pallas_rows import out_struct as _struct
from jevo.ops.pallas_rows import row_mask as _row_mask
from jevo.ops.pallas_rows import vec as _vec
from jevo.ops.pallas_rows import vector_spec as _vector_spec

_F32 = jnp.float32
# Triton's tensors have power-of-two sizes and its matrix products sides of at least 16; the
# float32 [rows, c] accumulator of a row block lives in registers, which bounds c.
MIN_CHANNELS, MAX_CHANNELS = 16, 256
MIN_CHUNK = 16


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tiles of one kernel: rows per block, hidden columns per loop step, Triton's warps and
  software-pipelining stages."""
  block_rows: int
  hidden_chunk: int
  num_warps: int
  num_stages: int

  def fitted(self, rows: int, hidden: int) -> "KernelConfig":
    """The same tiles shrunk to fit: no longer row blocks than the rows (rounded up to a power
    of two, at least 16), and a chunk that divides the hidden width."""
    block = min(self.block_rows, max(MIN_CHUNK, pl.next_power_of_2(rows)))
    chunk = self.hidden_chunk
    while hidden % chunk:
      chunk //= 2
    return dataclasses.replace(self, block_rows=block, hidden_chunk=chunk)


@dataclasses.dataclass(frozen=True)
class TransitionConfig:
  """Tiles of the three kernels. `param_grad_programs`: about how many programs the parameter
  kernel runs (hidden chunks x row groups); fewer make fewer partial sums to add, more fill
  the GPU better."""
  forward: KernelConfig
  input_grad: KernelConfig
  param_grad: KernelConfig
  param_grad_programs: int = 264


def default_config(channels: int, hidden: int) -> TransitionConfig:
  """Tiles for c channels and a hidden width (set by a sweep on an H200; see
  benchmarks/transition_pallas_gpu.py)."""
  del hidden
  if channels <= 128:
    return TransitionConfig(forward=KernelConfig(128, 32, 4, 2),
                            input_grad=KernelConfig(64, 64, 4, 2),
                            param_grad=KernelConfig(64, 64, 8, 2))
  return TransitionConfig(forward=KernelConfig(64, 64, 8, 1),
                          input_grad=KernelConfig(64, 32, 8, 1),
                          param_grad=KernelConfig(64, 32, 8, 1))


def unsupported_reason(x, w1) -> str | None:
  """Why the kernels cannot take these shapes and dtypes, or None (where they run is the
  caller's question)."""
  c, hidden = x.shape[-1], w1.shape[-1]
  if jnp.dtype(x.dtype) not in KERNEL_DTYPES:
    return f"the Pallas kernels take bfloat16 or float16 activations, got {x.dtype}"
  if c & (c - 1) or not MIN_CHANNELS <= c <= MAX_CHANNELS:
    return (f"the Pallas kernels take a power-of-two channel count from {MIN_CHANNELS} to "
            f"{MAX_CHANNELS}, got {c}")
  if hidden % MIN_CHUNK:
    return f"the Pallas kernels take a hidden width that is a multiple of {MIN_CHUNK}, got {hidden}"
  if x.size == 0:
    return "there are no rows"
  if x.size >= 2 ** 31:
    # The kernels' element offsets are 32-bit.
    return f"the Pallas kernels take fewer than 2**31 elements, x has {x.size}"
  return None


# ---- forward ------------------------------------------------------------------------------------

def _forward_kernel(x_ref, scale_ref, offset_ref, w1_ref, b1_ref, w2_ref, b2_ref, out_ref, *,
                    eps, rows, block_rows, chunk):
  mask = _row_mask(pl.program_id(0) * block_rows, block_rows, rows)
  x = plgpu.load(x_ref, mask=mask, other=0.0).astype(_F32)
  y = _layer_norm(x, _vec(scale_ref), _vec(offset_ref), eps, w1_ref.dtype)

  def step(k, acc):
    ks = pl.ds(pl.multiple_of(k * chunk, chunk), chunk)
    h = jnp.maximum(_mm(y, w1_ref[:, ks]) + b1_ref[ks].astype(_F32)[None, :], 0.0)
    return acc + _mm(h.astype(w2_ref.dtype), w2_ref[ks, :])

  acc = jnp.zeros((block_rows, out_ref.shape[1]), _F32)
  acc = jax.lax.fori_loop(0, w1_ref.shape[1] // chunk, step, acc)
  out = acc + _vec(b2_ref)[None, :]
  plgpu.store(out_ref, out.astype(out_ref.dtype), mask=mask)


def _forward(x, scale, offset, w1, b1, w2, b2, *, eps, config: KernelConfig, interpret):
  rows, c = x.shape
  hidden = w1.shape[1]
  block, chunk = config.block_rows, config.hidden_chunk
  kernel = functools.partial(_forward_kernel, eps=eps, rows=rows, block_rows=block, chunk=chunk)
  return pl.pallas_call(
      kernel,
      grid=(pl.cdiv(rows, block),),
      in_specs=[pl.BlockSpec((block, c), lambda i: (i, 0)), _vector_spec(c), _vector_spec(c),
                _matrix_spec((c, hidden)), _vector_spec(hidden), _matrix_spec((hidden, c)),
                _vector_spec(c)],
      out_specs=pl.BlockSpec((block, c), lambda i: (i, 0)),
      out_shape=_struct((rows, c), x.dtype, x),
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name="jevo_transition_fwd",
  )(x, scale, offset, w1, b1, w2, b2)


# ---- backward: the input's gradient -------------------------------------------------------------

def _input_grad_kernel(x_ref, g_ref, scale_ref, offset_ref, w1_ref, b1_ref, w2_ref,
                       dx_ref, dscale_ref, doffset_ref, db2_ref, *, eps, rows, block_rows, chunk):
  mask = _row_mask(pl.program_id(0) * block_rows, block_rows, rows)
  scale = _vec(scale_ref)
  x = plgpu.load(x_ref, mask=mask, other=0.0).astype(_F32)
  y = _layer_norm(x, scale, _vec(offset_ref), eps, w1_ref.dtype)
  g = plgpu.load(g_ref, mask=mask, other=0.0)  # rows past the end: zero cotangent

  def step(k, dln):
    ks = pl.ds(pl.multiple_of(k * chunk, chunk), chunk)
    w1 = w1_ref[:, ks]
    a = _mm(y, w1) + b1_ref[ks].astype(_F32)[None, :]
    dh = _mm(g, w2_ref[ks, :].T)
    da = jnp.where(a > 0.0, dh, 0.0).astype(w1.dtype)
    return dln + _mm(da, w1.T)

  dln = jax.lax.fori_loop(0, w1_ref.shape[1] // chunk, step,
                          jnp.zeros((block_rows, x_ref.shape[1]), _F32))
  # x again (from cache) rather than x_hat kept in registers through the loop.
  x_hat, rstd = _normalize(plgpu.load(x_ref, mask=mask, other=0.0).astype(_F32), eps)
  dscale_ref[...] = jnp.sum(dln * x_hat, axis=0)
  doffset_ref[...] = jnp.sum(dln, axis=0)
  db2_ref[...] = jnp.sum(g.astype(_F32), axis=0)
  dx_hat = dln * scale[None, :]
  dx = rstd * (dx_hat - jnp.mean(dx_hat, axis=1, keepdims=True)
               - x_hat * jnp.mean(dx_hat * x_hat, axis=1, keepdims=True))
  plgpu.store(dx_ref, dx.astype(dx_ref.dtype), mask=mask)


def _input_grad(x, g, scale, offset, w1, b1, w2, *, eps, config: KernelConfig, interpret):
  rows, c = x.shape
  hidden = w1.shape[1]
  block, chunk = config.block_rows, config.hidden_chunk
  blocks = pl.cdiv(rows, block)
  kernel = functools.partial(_input_grad_kernel, eps=eps, rows=rows, block_rows=block,
                             chunk=chunk)
  row_block = pl.BlockSpec((block, c), lambda i: (i, 0))
  partial_sum = pl.BlockSpec((c,), lambda i: (i,))
  partial_shape = _struct((blocks * c,), _F32, x)
  dx, dscale, doffset, db2 = pl.pallas_call(
      kernel,
      grid=(blocks,),
      in_specs=[row_block, row_block, _vector_spec(c), _vector_spec(c),
                _matrix_spec((c, hidden)), _vector_spec(hidden), _matrix_spec((hidden, c))],
      out_specs=[row_block, partial_sum, partial_sum, partial_sum],
      out_shape=[_struct((rows, c), x.dtype, x)] + [partial_shape] * 3,
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name="jevo_transition_bwd_input",
  )(x, g, scale, offset, w1, b1, w2)
  sums = [p.reshape(blocks, c).sum(axis=0) for p in (dscale, doffset, db2)]
  return dx, *sums


# ---- backward: the weights' gradients -----------------------------------------------------------

def _param_grad_kernel(x_ref, g_ref, scale_ref, offset_ref, w1_ref, b1_ref, w2_ref,
                       dw1_ref, dw2_ref, db1_ref, *, eps, rows, block_rows, blocks_per_group):
  # w1_ref [c, chunk], b1_ref [chunk], w2_ref [chunk, c]: this program's hidden chunk.
  group = pl.program_id(1)
  blocks = pl.cdiv(rows, block_rows)
  first = group * blocks_per_group
  count = jnp.minimum(blocks_per_group, blocks - first)
  scale, offset = _vec(scale_ref), _vec(offset_ref)
  w1, w2 = w1_ref[...], w2_ref[...]
  b1 = _vec(b1_ref)[None, :]
  c, chunk = w1.shape

  def step(j, carry):
    dw1, dw2, db1 = carry
    start = (first + j) * block_rows
    mask = _row_mask(start, block_rows, rows)
    piece = pl.ds(pl.multiple_of(start, block_rows), block_rows)
    x = plgpu.load(x_ref.at[piece, :], mask=mask, other=0.0).astype(_F32)
    g = plgpu.load(g_ref.at[piece, :], mask=mask, other=0.0)
    y = _layer_norm(x, scale, offset, eps, w1.dtype)
    a = _mm(y, w1) + b1
    h = jnp.maximum(a, 0.0).astype(w2.dtype)
    da = jnp.where(a > 0.0, _mm(g, w2.T), 0.0)
    dw1 = dw1 + _mm(y.T, da.astype(w1.dtype))
    dw2 = dw2 + _mm(h.T, g)
    return dw1, dw2, db1 + jnp.sum(da, axis=0)

  init = (jnp.zeros((c, chunk), _F32), jnp.zeros((chunk, c), _F32), jnp.zeros((chunk,), _F32))
  dw1, dw2, db1 = jax.lax.fori_loop(0, count, step, init)
  dw1_ref[...] = dw1
  dw2_ref[...] = dw2
  db1_ref[...] = db1


def _param_grad(x, g, scale, offset, w1, b1, w2, *, eps, config: KernelConfig, programs: int,
                interpret):
  rows, c = x.shape
  hidden = w1.shape[1]
  block, chunk = config.block_rows, config.hidden_chunk
  chunks, blocks = hidden // chunk, pl.cdiv(rows, block)
  per_group = pl.cdiv(blocks, max(1, min(blocks, pl.cdiv(programs, chunks))))
  groups = pl.cdiv(blocks, per_group)
  kernel = functools.partial(_param_grad_kernel, eps=eps, rows=rows, block_rows=block,
                             blocks_per_group=per_group)
  whole = pl.BlockSpec((rows, c), lambda k, r: (0, 0))
  # The hidden chunk is the grid's first (fastest) axis: the programs that read one row group
  # run side by side, so that its rows come from L2 for all but the first.
  dw1, dw2, db1 = pl.pallas_call(
      kernel,
      grid=(chunks, groups),
      in_specs=[whole, whole, _vector_spec(c), _vector_spec(c),
                pl.BlockSpec((c, chunk), lambda k, r: (0, k)),
                pl.BlockSpec((chunk,), lambda k, r: (k,)),
                pl.BlockSpec((chunk, c), lambda k, r: (k, 0))],
      out_specs=[pl.BlockSpec((c, chunk), lambda k, r: (r, k)),
                 pl.BlockSpec((chunk, c), lambda k, r: (r * chunks + k, 0)),
                 pl.BlockSpec((chunk,), lambda k, r: (r * chunks + k,))],
      out_shape=[_struct((groups * c, hidden), _F32, x), _struct((groups * hidden, c), _F32, x),
                 _struct((groups * hidden,), _F32, x)],
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name="jevo_transition_bwd_params",
  )(x, g, scale, offset, w1, b1, w2)
  return (dw1.reshape(groups, c, hidden).sum(axis=0),
          dw2.reshape(groups, hidden, c).sum(axis=0),
          db1.reshape(groups, hidden).sum(axis=0))


# ---- the differentiable op ----------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _transition(x, scale, offset, w1, b1, w2, b2, eps, config, interpret):
  return _transition_fwd(x, scale, offset, w1, b1, w2, b2, eps, config, interpret)[0]


def _fitted(config: TransitionConfig, rows: int, hidden: int) -> TransitionConfig:
  return dataclasses.replace(config, forward=config.forward.fitted(rows, hidden),
                             input_grad=config.input_grad.fitted(rows, hidden),
                             param_grad=config.param_grad.fitted(rows, hidden))


def _transition_fwd(x, scale, offset, w1, b1, w2, b2, eps, config, interpret):
  out = _forward(x, scale, offset, w1.astype(x.dtype), b1, w2.astype(x.dtype), b2, eps=eps,
                 config=config.forward, interpret=interpret)
  return out, (x, scale, offset, w1, b1, w2, b2)


def _transition_bwd(eps, config, interpret, residuals, g):
  x, scale, offset, w1, b1, w2, b2 = residuals
  g = g.astype(x.dtype)
  w1c, w2c = w1.astype(x.dtype), w2.astype(x.dtype)
  dx, dscale, doffset, db2 = _input_grad(x, g, scale, offset, w1c, b1, w2c, eps=eps,
                                         config=config.input_grad, interpret=interpret)
  dw1, dw2, db1 = _param_grad(x, g, scale, offset, w1c, b1, w2c, eps=eps,
                              config=config.param_grad, programs=config.param_grad_programs,
                              interpret=interpret)
  return (dx, dscale.astype(scale.dtype), doffset.astype(offset.dtype), dw1.astype(w1.dtype),
          db1.astype(b1.dtype), dw2.astype(w2.dtype), db2.astype(b2.dtype))


_transition.defvjp(_transition_fwd, _transition_bwd)


def transition(x, ln_scale, ln_offset, w1, b1, w2, b2, *, eps: float,
               config: TransitionConfig | None = None, interpret: bool = False) -> jax.Array:
  """The fused transition on x `[..., c]` (leading dims flattened to rows), in x's dtype.

  `unsupported_reason` must be None for x and w1; `config` defaults to `default_config`;
  `interpret=True` runs the kernels in Pallas's interpreter (any platform, slowly: tests).
  """
  c, hidden = x.shape[-1], w1.shape[-1]
  rows = x.size // c
  config = _fitted(config or default_config(c, hidden), rows, hidden)
  out = _transition(x.reshape(rows, c), ln_scale, ln_offset, w1, b1, w2, b2, float(eps), config,
                    bool(interpret))
  return out.reshape(x.shape)
