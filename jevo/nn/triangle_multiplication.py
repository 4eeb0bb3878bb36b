"""Triangle multiplicative update with outgoing or incoming edges (supplement Alg. 11, 12)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jevo.nn import _common as c
from jevo.nn.chunking import chunked
from jevo.nn.linear import linear, project
from jevo.ops import gated_projections as op
from jevo.ops import triangle_epilogue as epilogue
from jevo.ops.forward_kernel import kernel_where_undifferentiated
from jevo.ops.pallas_platform import platform_reason

IMPLEMENTATIONS = (None, "xla", "pallas_forward")


class TriangleMultiplication(nnx.Module):
  """Updates z_ij from the edges of triangles (i, j, k); returns the update of `z`.

  With `left`/`right` the masked, gated projections of `LayerNorm(z)`:
  outgoing: z_ij <- sum_k left_ik * right_jk; incoming: z_ij <- sum_k left_kj * right_ki
  (AlphaFold's `equation`s 'ikc,jkc->ijc' and 'kjc,kic->ijc', so that AlphaFold's
  `left_projection`/`right_projection` weights load unchanged), then LayerNorm, the output
  projection (zero-initialised) and a sigmoid gate from `LayerNorm(z)`.

  `implementation`: "xla" computes everything with XLA; "pallas_forward" computes the input
  side (`LayerNorm(z)`, the five projections, gates and mask) with one fused Pallas kernel
  (`jevo.ops.gated_projections_pallas`) and the output side (the centre LayerNorm of the
  product over k, the output projection and the gate) with another
  (`jevo.ops.triangle_epilogue_pallas`) where the module's inputs are not differentiated, and
  everything with XLA, forward and backward, where they are (a GPU, a bf16 or fp16 compute dtype,
  power-of-two channels from 16 to 128; ValueError saying why elsewhere); None (the default)
  is "pallas_forward" where the kernel can run and "xla" elsewhere. Measured on an H200 (bf16,
  c_z = c_hidden = 128, 2026-12-02, benchmarks/triangle_multiplication_gpu.py), the module's
  forward with both kernels against XLA's: outgoing 0.292 against 0.471 ms at 384 x 384, 0.957
  against 1.570 at 768 x 768; incoming 0.299 against 0.368 and 0.956 against 1.207. Chunked
  calls run the kernels too (`_chunked_kernels`: the output side computes the gate from z;
  not yet timed on a GPU); DAP (`jevo.parallel`, which calls `projections`) runs XLA.

  Example:
    >>> tri = TriangleMultiplication(16, 8, outgoing=False, rngs=nnx.Rngs(0))
    >>> tri(jnp.ones((5, 5, 16))).shape
    (5, 5, 16)
  """

  def __init__(self, c_z: int = 128, c_hidden: int = 128, *, outgoing: bool = True,
               kernel_init: c.Initializer = c.linear_init,
               output_kernel_init: c.Initializer = c.final_init,
               gate_kernel_init: c.Initializer = c.final_init,
               layer_norm_eps: float = c.LAYER_NORM_EPS, implementation: str | None = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    c.check_positive("c_z", c_z)
    c.check_positive("c_hidden", c_hidden)
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    self.c_z, self.c_hidden, self.outgoing = c_z, c_hidden, bool(outgoing)
    self.implementation = implementation
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    gate = dict(kernel_init=gate_kernel_init, bias_init=nnx.initializers.ones, **kw)
    self.layer_norm_in = c.layer_norm(c_z, eps=layer_norm_eps, **kw)
    self.left_projection = linear(c_z, c_hidden, kernel_init=kernel_init, **kw)
    self.right_projection = linear(c_z, c_hidden, kernel_init=kernel_init, **kw)
    self.left_gate = linear(c_z, c_hidden, **gate)
    self.right_gate = linear(c_z, c_hidden, **gate)
    self.center_norm = c.layer_norm(c_hidden, eps=layer_norm_eps, **kw)
    self.output_projection = linear(c_hidden, c_z, kernel_init=output_kernel_init, **kw)
    self.output_gate = linear(c_z, c_z, **gate)

  def __call__(self, z: jax.Array, pair_mask: jax.Array | None = None, *,
               chunk_size: int | None = None) -> jax.Array:
    c.check_pair("z", z, self.c_z)
    c.check_chunk_size(chunk_size)
    mask = c.check_mask("pair_mask", pair_mask, z.shape[:-1])[..., None]
    if chunk_size is None or chunk_size >= z.shape[-3]:
      return self._whole(z, mask)
    implementation, dtype = self._resolve(z)
    if implementation == "xla":
      return self._chunked_xla(z, mask, chunk_size)
    graphdef, state = nnx.split(self)

    def reference(z, mask, state):
      return nnx.merge(graphdef, state)._chunked_xla(z, mask, chunk_size)

    def kernel(z, mask, state):
      return nnx.merge(graphdef, state)._chunked_kernels(z, mask, chunk_size, dtype)

    return kernel_where_undifferentiated(kernel, reference)(z, mask, state)

  def _chunked_xla(self, z: jax.Array, mask: jax.Array, chunk_size: int) -> jax.Array:
    """A chunked call with XLA: LayerNorm(z) whole, then chunks of output rows."""
    x = self.layer_norm_in(z)

    # Output rows i are independent: one operand is projected whole, the other (and the output
    # gate) only for the rows in the chunk, which bounds memory to one [N_res, N_res, c_hidden].
    if self.outgoing:
      other = self._gated(x, mask, self.right_projection, self.right_gate)

      def rows(x_i, m_i, x_gate):
        left = self._gated(x_i, m_i, self.left_projection, self.left_gate)
        return self.finish(self.combine(left, other), self.output_gate(x_gate))

      args, axes = (x, mask, x), (-3, -3, -3)
    else:
      other = self._gated(x, mask, self.left_projection, self.left_gate)

      def rows(x_i, m_i, x_gate):
        right = self._gated(x_i, m_i, self.right_projection, self.right_gate)
        return self.finish(self.combine(other, right), self.output_gate(x_gate))

      args, axes = (x, mask, x), (-2, -2, -3)
    return chunked(rows, args, axes, out_axis=-3, chunk_size=chunk_size)

  def _chunked_kernels(self, z: jax.Array, mask: jax.Array, chunk_size: int, dtype) -> jax.Array:
    """A chunked call with the fused kernels: the operand every chunk needs whole, once (the
    input side with one projection pair); then per chunk of output rows i the other operand's
    slice, the product over k and the output side, which computes the gate from z's rows i
    (`triangle_epilogue_gate_from_z`), so no gate logits are written. Operands channel-major,
    as in `_whole`."""
    norm = self.layer_norm_in

    def operand(z_part, m_part, projection, gate):
      return op.fused(z_part, m_part, norm.scale[...], norm.bias[...],
                      [projection.kernel[...], gate.kernel[...]],
                      [projection.bias[...], gate.bias[...]], eps=norm.epsilon, dtype=dtype,
                      channel_major=True)[0]

    def output_side(product, z_rows):
      out = epilogue.fused_gate_from_z(
          product.reshape(self.c_hidden, -1), z_rows.reshape(-1, self.c_z), norm.scale[...],
          norm.bias[...], self.output_gate.kernel[...], self.output_gate.bias[...],
          self.center_norm.scale[...], self.center_norm.bias[...],
          self.output_projection.kernel[...], self.output_projection.bias[...],
          ln_eps=norm.epsilon, eps=self.center_norm.epsilon, dtype=dtype)
      return out.reshape(z_rows.shape[:-1] + (self.c_z,))

    if self.outgoing:  # out[i, j] = sum_k left[i, k] right[j, k]: right whole, left's rows i
      right = operand(z, mask, self.right_projection, self.right_gate)

      def rows(z_i, m_i, z_rows):
        left = operand(z_i, m_i, self.left_projection, self.left_gate)
        return output_side(self.product_channel_major(left, right), z_rows)

      axes = (-3, -3, -3)
    else:  # out[i, j] = sum_k left[k, j] right[k, i]: left whole, right's columns i
      left = operand(z, mask, self.left_projection, self.left_gate)

      def rows(z_i, m_i, z_rows):
        right = operand(z_i, m_i, self.right_projection, self.right_gate)
        return output_side(self.product_channel_major(left, right), z_rows)

      axes = (-2, -2, -3)
    return chunked(rows, (z, mask, z), axes, out_axis=-3, chunk_size=chunk_size)

  def projections(self, x: jax.Array, mask: jax.Array, *, output_gate: bool
                  ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The masked, gated `left` and `right` of `x = LayerNorm(z)` and, if asked, the output
    gate's logits, from one matrix product (`mask` `[..., 1]`, 1 = valid)."""
    layers = [self.left_projection, self.left_gate, self.right_projection, self.right_gate]
    outs = project(x, *layers, *([self.output_gate] if output_gate else []))
    left, right = _masked_gated(mask, *outs[0:2]), _masked_gated(mask, *outs[2:4])
    return left, right, (outs[4] if output_gate else None)

  def resolved_implementation(self, z: jax.Array) -> str:
    """What a whole (unchunked), undifferentiated call on `z` runs: "xla" or "pallas_forward"
    (ValueError if `implementation` asks for a kernel that cannot run here, saying why)."""
    return self._resolve(z)[0]

  def _resolve(self, z: jax.Array):
    """(`resolved_implementation`, the compute dtype where that is the kernel, else None)."""
    if self.implementation not in IMPLEMENTATIONS:  # the attribute may be set after __init__
      raise ValueError(f"TriangleMultiplication.implementation must be one of "
                       f"{IMPLEMENTATIONS}, got {self.implementation!r}")
    # Off a GPU, None needs neither the compute dtype nor the kernel's own checks.
    if self.implementation == "xla" or (self.implementation is None
                                        and platform_reason(z) is not None):
      return "xla", None
    graphdef, state = nnx.split(self.left_projection)
    dtype = jax.eval_shape(lambda z, state: nnx.merge(graphdef, state)(z), z, state).dtype
    reason = op.unsupported_reason(z, self.c_hidden, dtype)
    if reason is None:
      return "pallas_forward", dtype
    if self.implementation is None:
      return "xla", None
    raise ValueError(f"TriangleMultiplication(implementation={self.implementation!r}) cannot "
                     f"run here: {reason}")

  def _whole(self, z: jax.Array, mask: jax.Array) -> jax.Array:
    """The update of the whole pair: XLA's, or the fused kernels' where
    `resolved_implementation` says and the module is not differentiated."""
    implementation, dtype = self._resolve(z)
    if implementation == "xla":
      return self.finish(*self._product_and_gate(z, mask))
    graphdef, state = nnx.split(self)

    # A differentiated call computes exactly what "xla" computes, forward and backward. The
    # input side's kernel writes left and right channel-major ([c_hidden, ..., N, N]), the
    # layout of the batched product over channels that follows, which the output side's
    # kernel reads as it lies (the centre LayerNorm, the output projection and the gate).
    def reference(z, mask, state):
      module = nnx.merge(graphdef, state)
      return module.finish(*module._product_and_gate(z, mask))

    def kernel(z, mask, state):
      module = nnx.merge(graphdef, state)
      layers = (module.left_projection, module.left_gate, module.right_projection,
                module.right_gate, module.output_gate)
      left, right, gate = op.fused(
          z, mask, module.layer_norm_in.scale[...], module.layer_norm_in.bias[...],
          [l.kernel[...] for l in layers], [l.bias[...] for l in layers],
          eps=module.layer_norm_in.epsilon, dtype=dtype, channel_major=True)
      product = module.product_channel_major(left, right)
      out = epilogue.fused(
          product.reshape(module.c_hidden, -1), gate.reshape(-1, module.c_z),
          module.center_norm.scale[...], module.center_norm.bias[...],
          module.output_projection.kernel[...], module.output_projection.bias[...],
          eps=module.center_norm.epsilon, dtype=dtype)
      return out.reshape(gate.shape)

    return kernel_where_undifferentiated(kernel, reference)(z, mask, state)

  def _product_and_gate(self, z: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """XLA's sum over k of the whole pair and the output gate's logits."""
    left, right, gate = self.projections(self.layer_norm_in(z), mask, output_gate=True)
    return self.combine(left, right), gate

  def combine(self, left: jax.Array, right: jax.Array) -> jax.Array:
    """The triangle update's sum over k (rows i of `left`/columns i of `right` may be a chunk)."""
    if self.outgoing:
      return jnp.einsum("...ikc,...jkc->...ijc", left, right)
    return jnp.einsum("...kjc,...kic->...ijc", left, right)

  def product_channel_major(self, left: jax.Array, right: jax.Array) -> jax.Array:
    """The sum over k of channel-major operands, channel-major: `[c_hidden, ..., N, N]`."""
    if self.outgoing:
      return jnp.einsum("c...ik,c...jk->c...ij", left, right)
    return jnp.einsum("c...kj,c...ki->c...ij", left, right)

  def finish(self, act: jax.Array, gate_logits: jax.Array) -> jax.Array:
    """Center LayerNorm, output projection and the output gate."""
    act = self.output_projection(self.center_norm(act))
    return act * jax.nn.sigmoid(gate_logits)

  @staticmethod
  def _gated(xs, ms, projection: nnx.Linear, gate: nnx.Linear) -> jax.Array:
    return _masked_gated(ms, *project(xs, projection, gate))


def _masked_gated(mask: jax.Array, projected: jax.Array, gate_logits: jax.Array) -> jax.Array:
  return mask.astype(projected.dtype) * projected * jax.nn.sigmoid(gate_logits)
