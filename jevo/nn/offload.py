"""A scan over blocks whose backward pass recomputes each block from inputs kept in pinned host
memory, and fetches the next block's inputs while it differentiates the current one.

`jax.checkpoint` with an offloading policy keeps the same inputs on the host, but XLA copies
each block's inputs back when the block's recomputation starts, so the whole copy (138 MB per
block at N_seq 512 x N_res 384 in bf16, about 2.5 ms over PCIe) sits on the critical path of
every block. Here the backward pass is a loop of our own: iteration i starts the copy of block
i-1's inputs, which nothing in iteration i waits for, and differentiates block i with inputs
fetched during iteration i+1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _differentiable(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _zero_cotangent(x):
  if _differentiable(x):
    return jnp.zeros_like(x)
  return np.zeros(np.shape(x), jax.dtypes.float0)


def _to(space, tree):
  return jax.tree.map(lambda a: jax.device_put(a, space), tree)


def offloaded_scan(body: Callable, carry: Any, xs: Any, consts: Any) -> tuple[Any, Any]:
  """`jax.lax.scan(lambda c, x: body(c, x, consts), carry, xs)`, differentiable in `carry` and
  the floating-point leaves of `xs`, keeping each step's input carry on the host for the
  backward pass. `consts` (masks) and the scan outputs `ys` are not differentiated: their
  cotangents are zeros."""

  @jax.custom_vjp
  def run(carry, xs, consts):
    return jax.lax.scan(lambda c, x: body(c, x, consts), carry, xs)

  def run_fwd(carry, xs, consts):
    def step(c, x):
      new_c, y = body(c, x, consts)
      return new_c, (y, _to(jax.memory.Space.Host, c))

    out, (ys, saved) = jax.lax.scan(step, carry, xs)
    return (out, ys), (saved, xs, consts)

  def run_bwd(residuals, cotangents):
    saved, xs, consts = residuals
    d_out, _ = cotangents  # ys are not differentiated
    leaves, treedef = jax.tree.flatten(xs)
    is_diff = [_differentiable(leaf) for leaf in leaves]
    length = leaves[0].shape[0] if leaves else jax.tree.leaves(saved)[0].shape[0]

    def at(a, i):
      # Offsets affine in the loop counter (i - 1 clamps to 0 at the last step) let XLA turn
      # a slice of host memory into a DMA copy instead of a kernel that holds SMs.
      return jax.lax.dynamic_index_in_dim(a, i, keepdims=False, allow_negative_indices=False)

    def fetch(i):
      return _to(jax.memory.Space.Device, jax.tree.map(lambda a: at(a, i), saved))

    def step(j, state):
      d_c, c_in, d_acc = state
      i = length - 1 - j
      # Started here, needed by the next iteration: the copy overlaps this block's work.
      prefetched = fetch(i - 1)
      x_leaves = [at(leaf, i) for leaf in leaves]
      diff_leaves = [leaf for leaf, d in zip(x_leaves, is_diff) if d]

      def block(c, diff):
        it = iter(diff)
        x = jax.tree.unflatten(treedef, [next(it) if d else leaf
                                         for leaf, d in zip(x_leaves, is_diff)])
        return body(c, x, consts)[0]

      _, pull = jax.vjp(block, c_in, diff_leaves)
      d_prev, d_diff = pull(d_c)
      d_acc = [jax.lax.dynamic_update_index_in_dim(acc, d.astype(acc.dtype), i, 0)
               for acc, d in zip(d_acc, d_diff)]
      return d_prev, prefetched, d_acc

    d_acc = [jnp.zeros_like(leaf) for leaf, d in zip(leaves, is_diff) if d]
    d_carry, _, d_diff = jax.lax.fori_loop(0, length, step, (d_out, fetch(length - 1), d_acc))
    it = iter(d_diff)
    d_xs = jax.tree.unflatten(treedef, [next(it) if d else _zero_cotangent(leaf)
                                        for leaf, d in zip(leaves, is_diff)])
    return d_carry, d_xs, jax.tree.map(_zero_cotangent, consts)

  run.defvjp(run_fwd, run_bwd)
  return run(carry, xs, consts)
