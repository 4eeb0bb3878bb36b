"""Products of two operands split over the DAP axis, computed block by block around a ring.

The triangle multiplications multiply two projections of the pair that are both split by pair
rows, `[*B, N_res/n, N_res, c]` on each of the n devices. Gathering one of them whole, or forming
partial sums for every output row before a reduce-scatter, would put a tensor as large as the
whole `[*B, N_res, N_res, c]` on every device. Here the blocks travel instead: devices form a
ring (device d receives from d + 1 and sends to d - 1, with `jax.lax.ppermute`), and at each of
the n steps a device holds one travelling block of `[*B, N_res/n, N_res, c]` and receives the
next. Each step's send is issued before the product with the block at hand and does not depend
on it, so the transfer can overlap the product.

- `gathered_product(f, ax, axis, a, b)`: `concat_t f(a, b_t)` along `axis` over the devices t,
  i.e. `f` of this device's `a` with every device's `b` (an all-gather of b, fused with the
  product, block by block). The outgoing triangle multiplication.
- `scattered_product(f, ax, axis, a, b)`: this device's block of `sum_d f(a_d, b_d[e])`, where
  `b_d[e]` is block e of device d's `b` along `axis` (a reduce-scatter fused with the product,
  block by block). The incoming triangle multiplication.

`f` is bilinear (the module's own `combine`). Both products have their own backward pass, again
rings of blocks: JAX's derivative of the steps would keep every step's block for the backward
pass, as much memory as the gathered operand. The backward passes apply the transposes of `f`
in each argument (`jax.linear_transpose`), so they follow a change to `f` by themselves.

The sums over devices run in `f`'s output dtype (the computation's), as a reduce-scatter would.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jevo.ops.varying import vary_like
from jevo.parallel.layout import DapAxis

Bilinear = Callable[[jax.Array, jax.Array], jax.Array]


def _block(x: jax.Array, t: jax.Array, size: int, axis: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, t * size, size, axis % x.ndim)


def _put(buffer: jax.Array, x: jax.Array, t: jax.Array, axis: int) -> jax.Array:
  axis %= x.ndim
  return jax.lax.dynamic_update_slice_in_dim(buffer, x.astype(buffer.dtype),
                                             t * x.shape[axis], axis)


def _zeros_times(x: jax.Array, n: int, axis: int) -> jax.Array:
  """Zeros shaped as `x` with `axis` n times longer, varying along `x`'s mesh axes."""
  shape = list(x.shape)
  shape[axis % x.ndim] *= n
  return vary_like(jnp.zeros(shape, x.dtype), x)


def _transpose_first(f: Bilinear, a: jax.Array, b: jax.Array, ct: jax.Array) -> jax.Array:
  """The cotangent of `a` in `f(a, b)` for the output cotangent `ct`."""
  return jax.linear_transpose(lambda a_: f(a_, b), a)(ct)[0]


def _transpose_second(f: Bilinear, a: jax.Array, b: jax.Array, ct: jax.Array) -> jax.Array:
  """The cotangent of `b` in `f(a, b)` for the output cotangent `ct`."""
  return jax.linear_transpose(lambda b_: f(a, b_), b)(ct)[0]


def _ring(n: int, step, carry):
  """`carry = step(s, carry, first=s == 0, last=s == n - 1)` for the n steps s of a ring.

  The steps between the first and the last run in one loop: memory stays one step's worth
  whatever n, and each step's send and product are in the same loop body, where the
  scheduler can overlap them. `s` is an int in the first and last step, traced in the loop.
  """
  carry = step(0, carry, first=True, last=n == 1)
  if n > 2:
    carry = jax.lax.fori_loop(1, n - 1, lambda s, c: step(s, c, first=False, last=False),
                              carry)
  if n > 1:
    carry = step(n - 1, carry, first=False, last=True)
  return carry


# ------------------------------------------------------------------ gathered (all-gather) ring


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def gathered_product(f: Bilinear, ax: DapAxis, axis: int, a: jax.Array,
                     b: jax.Array) -> jax.Array:
  """`f(a, b_t)` for the `b` of every device t, concatenated in device order along `axis` of
  the output; no device holds more than two blocks of `b` (the one at hand and the next).

  Example (the outgoing triangle multiplication: rows i of `left` here, the rows j of `right`
  travel):
    >>> act = gathered_product(module.combine, ax, -2, left, right)  # [*B, N/n, N, c]
  """
  return _gathered(f, ax, axis, a, b)


def _gathered(f, ax, axis, a, b):
  d = ax.index()

  def step(s, carry, *, first, last):  # b of device d + s at hand
    b, out = carry
    following = b if last else ax.shift(b)  # sent before the product with b
    piece = f(a, b)
    out = _put(_zeros_times(piece, ax.size, axis) if first else out, piece, (d + s) % ax.size,
               axis)
    return following, out

  return _ring(ax.size, step, (b, None))[1]


def _gathered_fwd(f, ax, axis, a, b):
  return _gathered(f, ax, axis, a, b), (a, b)


def _gathered_bwd(f, ax, axis, residuals, ct):
  # da = sum_t (transpose of f(., b_t))(block t of ct): b travels again, as in the forward.
  # db_t = sum_d (transpose of f(a_d, .))(block t of ct_d): a reduce-scatter ring, whose
  # partial sum for block t starts on device t + 1 and ends on t after n - 1 sends.
  a, b = residuals
  n, d = ax.size, ax.index()
  size = ct.shape[axis] // n

  def step(s, carry, *, first, last):
    b, da, db = carry
    following = b if last else ax.shift(b)
    received = None if first else ax.shift(db)
    da_s = _transpose_first(f, a, b, _block(ct, (d + s) % n, size, axis))
    db_s = _transpose_second(f, a, b, _block(ct, (d + 1 + s) % n, size, axis))
    if first:
      return following, da_s, db_s
    return following, da + da_s, received + db_s

  _, da, db = _ring(n, step, (b, None, None))
  return da, db


gathered_product.defvjp(_gathered_fwd, _gathered_bwd)


# ------------------------------------------------------------------ scattered (reduce-scatter) ring


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def scattered_product(f: Bilinear, ax: DapAxis, axis: int, a: jax.Array,
                      b: jax.Array) -> jax.Array:
  """This device's block of the sum over devices d of `f(a_d, b_d[e])`, where `b_d[e]` is
  block e (this device's index) of `b_d` split n ways along `axis`. Partial sums of one
  output block travel the ring; no device forms the whole output.

  Example (the incoming triangle multiplication: the sum over the rows k that each device
  holds):
    >>> act = scattered_product(module.combine, ax, -2, left, right)  # [*B, N/n, N, c]
  """
  return _scattered(f, ax, axis, a, b)


def _scattered(f, ax, axis, a, b):
  # Step s adds this device's part of block d + 1 + s to the partial sum received from device
  # d + 1, which added its part of the same block one step before; the last step's block is
  # this device's own (d + n).
  n, d = ax.size, ax.index()
  size = b.shape[axis] // n

  def step(s, total, *, first, last):
    del last
    received = None if first else ax.shift(total)  # in flight during the product
    piece = f(a, _block(b, (d + 1 + s) % n, size, axis))
    return piece if first else received + piece

  return _ring(n, step, None)


def _scattered_fwd(f, ax, axis, a, b):
  return _scattered(f, ax, axis, a, b), (a, b)


def _scattered_bwd(f, ax, axis, residuals, ct):
  # Device t's output cotangent travels: da = sum_t (transpose of f(., b[t]))(ct_t) and
  # db[t] = (transpose of f(a, .))(ct_t), block t of this device's b.
  a, b = residuals
  n, d = ax.size, ax.index()
  size = b.shape[axis] // n

  def step(s, carry, *, first, last):  # the cotangent of device d + s at hand
    ct, da, db = carry
    following = ct if last else ax.shift(ct)
    t = (d + s) % n
    b_t = _block(b, t, size, axis)
    da_s = _transpose_first(f, a, b_t, ct)
    db_t = _transpose_second(f, a, b_t, ct)
    db = _put(_zeros_times(db_t, n, axis) if first else db, db_t, t, axis)
    return following, da_s if first else da + da_s, db

  _, da, db = _ring(n, step, (ct, None, None))
  return da, db


scattered_product.defvjp(_scattered_fwd, _scattered_bwd)
