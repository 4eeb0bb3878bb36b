"""The triangle multiplication's fused output side (`jevo.ops.triangle_epilogue_pallas`)
against a float64 reference in Pallas's interpreter (any platform): bfloat16 and float16
results within twice the error of `TriangleMultiplication.finish` (XLA) in the same dtype, in
relative Frobenius norm (the criterion of tests/test_gated_projections_pallas.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from triangle_multiplication_cases import random_module, rel_error

te = pytest.importorskip("jevo.ops.triangle_epilogue_pallas")

EPS = 1e-5


def _inputs(n, c_z, c_hidden, dtype, seed=2):
  """The product over k, channel-major [c_hidden, n, n] and of large magnitude (its sum runs
  over n terms), and the output gate's logits [n, n, c_z]."""
  kp, kg = jax.random.split(jax.random.key(seed))
  product_cm = (20.0 * jax.random.normal(kp, (c_hidden, n, n)) + 5.0).astype(dtype)
  gate = (2.0 * jax.random.normal(kg, (n, n, c_z))).astype(dtype)
  return product_cm, gate


def _reference(t, product_cm, gate):
  """The output side in float64, [n, n, c_z]."""
  f = lambda a: np.asarray(a, np.float64)  # noqa: E731
  x = np.moveaxis(f(product_cm), 0, -1)
  mean = x.mean(-1, keepdims=True)
  y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + EPS)
  y = y * f(t.center_norm.scale[...]) + f(t.center_norm.bias[...])
  out = y @ f(t.output_projection.kernel[...]) + f(t.output_projection.bias[...])
  return out / (1.0 + np.exp(-f(gate)))


def _kernel(t, product_cm, gate, dtype):
  c_hidden, n = product_cm.shape[0], product_cm.shape[1]
  out = te.triangle_epilogue(
      product_cm.reshape(c_hidden, n * n), gate.reshape(n * n, -1), t.center_norm.scale[...],
      t.center_norm.bias[...], t.output_projection.kernel[...], t.output_projection.bias[...],
      eps=EPS, dtype=dtype, interpret=True)
  return out.reshape(n, n, -1)


# (N_res, c_z, c_hidden): N_res^2 rows that are not a multiple of the 64-row block (and one
# below it), c_hidden below, equal to and above c_z.
@pytest.mark.parametrize("n,c_z,c_hidden", [(9, 32, 16), (11, 16, 16), (7, 16, 32), (5, 16, 16)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_kernel_matches_the_float64_reference(n, c_z, c_hidden, dtype):
  t = random_module(c_z, c_hidden, dtype)
  product_cm, gate = _inputs(n, c_z, c_hidden, dtype)
  got = jax.jit(lambda p, g: _kernel(t, p, g, dtype))(product_cm, gate)
  xla = t.finish(jnp.moveaxis(product_cm, 0, -1), gate)
  want = _reference(t, product_cm, gate)
  assert got.dtype == dtype and got.shape == want.shape
  assert rel_error(got, want) <= 2 * rel_error(xla, want) + 1e-3


def _input_norm_gate(t, z):
  """The output gate's logits from z in float64: LayerNorm_in(z) @ W_g + b_g."""
  f = lambda a: np.asarray(a, np.float64)  # noqa: E731
  x = f(z)
  mean = x.mean(-1, keepdims=True)
  y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + EPS)
  y = y * f(t.layer_norm_in.scale[...]) + f(t.layer_norm_in.bias[...])
  return y @ f(t.output_gate.kernel[...]) + f(t.output_gate.bias[...])


def _kernel_gate_from_z(t, product_cm, z, dtype):
  c_hidden, n = product_cm.shape[0], product_cm.shape[1]
  out = te.triangle_epilogue_gate_from_z(
      product_cm.reshape(c_hidden, n * n), z.reshape(n * n, -1), t.layer_norm_in.scale[...],
      t.layer_norm_in.bias[...], t.output_gate.kernel[...], t.output_gate.bias[...],
      t.center_norm.scale[...], t.center_norm.bias[...], t.output_projection.kernel[...],
      t.output_projection.bias[...], ln_eps=EPS, eps=EPS, dtype=dtype, interpret=True)
  return out.reshape(n, n, -1)


@pytest.mark.parametrize("n,c_z,c_hidden", [(9, 32, 16), (7, 16, 32), (5, 16, 16)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gate_from_z_matches_the_float64_reference(n, c_z, c_hidden, dtype):
  """The gate computed in the kernel from the module's input: within twice the error of XLA's
  whole output side (its gate logits projected and rounded by XLA) against float64."""
  t = random_module(c_z, c_hidden, dtype)
  product_cm, _ = _inputs(n, c_z, c_hidden, dtype)
  z = (3.0 * jax.random.normal(jax.random.key(7), (n, n, c_z)) + 1.0).astype(dtype)
  got = jax.jit(lambda p, z: _kernel_gate_from_z(t, p, z, dtype))(product_cm, z)
  gate_xla = t.projections(t.layer_norm_in(z), jnp.ones((n, n, 1), dtype), output_gate=True)[2]
  xla = t.finish(jnp.moveaxis(product_cm, 0, -1), gate_xla)
  want = _reference(t, product_cm, _input_norm_gate(t, z))
  assert got.dtype == dtype and got.shape == want.shape
  assert rel_error(got, want) <= 2 * rel_error(xla, want) + 1e-3


def test_gate_from_z_checks_the_gate_layer():
  p, z = jnp.ones((16, 10), jnp.bfloat16), jnp.ones((10, 32), jnp.bfloat16)
  ones = lambda *s: jnp.ones(s, jnp.float32)  # noqa: E731
  with pytest.raises(ValueError, match=r"gate layer must be \[32, 32\] .* got \(16, 32\)"):
    te.triangle_epilogue_gate_from_z(p, z, ones(32), ones(32), ones(16, 32), ones(32), ones(16),
                                     ones(16), ones(16, 32), ones(32), ln_eps=EPS, eps=EPS,
                                     dtype=jnp.bfloat16, interpret=True)


def test_gate_scales_each_output_and_rows_stay_apart():
  """A gate logit of -inf zeroes exactly its own (row, channel) of the output; a row's output
  depends on that row of the product only (rows of the last, partial block included)."""
  dtype = jnp.bfloat16
  t = random_module(16, 16, dtype)
  product_cm, gate = _inputs(9, 16, 16, dtype)
  gate = gate.at[4, 5, 3].set(-jnp.inf)
  base = np.asarray(_kernel(t, product_cm, gate, dtype), np.float64)
  assert base[4, 5, 3] == 0.0 and np.count_nonzero(base == 0.0) == 1
  changed = np.asarray(_kernel(t, product_cm.at[:, 8, 8].multiply(-3.0), gate, dtype), np.float64)
  differs = np.any(changed != base, axis=-1)
  assert differs[8, 8] and np.count_nonzero(differs) == 1


def test_unsupported_reason_names_what_does_not_fit():
  p, g = jnp.zeros((16, 10), jnp.bfloat16), jnp.zeros((10, 16), jnp.bfloat16)
  assert te.unsupported_reason(p, g, jnp.bfloat16) is None
  assert "float32" in te.unsupported_reason(p, g, jnp.float32)
  assert "c_hidden = 24" in te.unsupported_reason(jnp.zeros((24, 10)), g, jnp.bfloat16)
  assert "c_z = 256" in te.unsupported_reason(p, jnp.zeros((10, 256)), jnp.bfloat16)
  assert "10 rows" in te.unsupported_reason(p, jnp.zeros((9, 16)), jnp.bfloat16)
  assert "no rows" in te.unsupported_reason(jnp.zeros((16, 0)), jnp.zeros((0, 16)), jnp.bfloat16)


def test_parameter_shapes_are_checked():
  p, g = jnp.ones((16, 10), jnp.bfloat16), jnp.ones((10, 32), jnp.bfloat16)
  ones = lambda *s: jnp.ones(s, jnp.float32)  # noqa: E731
  with pytest.raises(ValueError, match=r"\[16, 32\] with a \[32\] bias, got \(32, 16\)"):
    te.triangle_epilogue(p, g, ones(16), ones(16), ones(32, 16), ones(32), eps=EPS,
                         dtype=jnp.bfloat16, interpret=True)
  with pytest.raises(ValueError, match=r"scale and offset must be \[16\], got \(32,\)"):
    te.triangle_epilogue(p, g, ones(32), ones(16), ones(16, 32), ones(32), eps=EPS,
                         dtype=jnp.bfloat16, interpret=True)


def test_the_kernel_lowers_to_triton_for_cuda_on_any_machine():
  """Pallas's lowering of the kernel to Triton (the on-chip transpose included) runs at
  lowering time, without a GPU: lowered for CUDA, the program holds the Triton custom call."""
  import jevo
  from jax import export
  t = random_module(128, 128, jnp.bfloat16)
  product_cm, gate = _inputs(24, 128, 128, jnp.bfloat16)
  args = (product_cm.reshape(128, -1), gate.reshape(-1, 128), t.center_norm.scale[...],
          t.center_norm.bias[...], t.output_projection.kernel[...], t.output_projection.bias[...])
  f = jax.jit(lambda *a: te.triangle_epilogue(*a, eps=EPS, dtype=jnp.bfloat16))
  exported = export.export(f, platforms=["cuda"], disabled_checks=jevo.export_disabled_checks())(
      *args)
  assert "xla.gpu.triton" in exported.mlir_module()


def test_the_gate_from_z_kernel_lowers_to_triton_for_cuda_on_any_machine():
  import jevo
  from jax import export
  t = random_module(128, 128, jnp.bfloat16)
  product_cm, gate = _inputs(24, 128, 128, jnp.bfloat16)
  args = (product_cm.reshape(128, -1), gate.reshape(-1, 128), t.layer_norm_in.scale[...],
          t.layer_norm_in.bias[...], t.output_gate.kernel[...], t.output_gate.bias[...],
          t.center_norm.scale[...], t.center_norm.bias[...], t.output_projection.kernel[...],
          t.output_projection.bias[...])
  f = jax.jit(lambda *a: te.triangle_epilogue_gate_from_z(*a, ln_eps=EPS, eps=EPS,
                                                          dtype=jnp.bfloat16))
  exported = export.export(f, platforms=["cuda"], disabled_checks=jevo.export_disabled_checks())(
      *args)
  assert "xla.gpu.triton" in exported.mlir_module()
