"""The triangle multiplication's fused input side (`jevo.ops.gated_projections_pallas`) against a
float64 reference in Pallas's interpreter (any platform), and `TriangleMultiplication`'s
"pallas_forward": the kernel where the module is not differentiated, XLA's forward and backward
where it is. bfloat16 and float16 results are compared in relative Frobenius norm against twice
the XLA implementation's own error (the criterion of tests/test_transition_pallas.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jevo.nn import TriangleMultiplication, triangle_multiplication
from jevo.ops import gated_projections as op
from triangle_multiplication_cases import random_module, rel_error

tp = pytest.importorskip("jevo.ops.gated_projections_pallas")

EPS = 1e-5


def _pair(n, c_z, dtype, seed=2):
  kz, km = jax.random.split(jax.random.key(seed))
  z = (3.0 * jax.random.normal(kz, (n, n, c_z)) + 1.0).astype(dtype)
  mask = jax.random.uniform(km, (n, n)) > 0.3
  return z, mask


def _reference(t, z, mask):
  """The input side in float64: (left, right, gate logits)."""
  f = lambda a: np.asarray(a, np.float64)  # noqa: E731
  x = f(z)
  mean = x.mean(-1, keepdims=True)
  y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + EPS)
  y = y * f(t.layer_norm_in.scale[...]) + f(t.layer_norm_in.bias[...])
  lin = lambda l: y @ f(l.kernel[...]) + f(l.bias[...])  # noqa: E731
  sig = lambda a: 1.0 / (1.0 + np.exp(-a))  # noqa: E731
  m = f(mask)[..., None]
  return (m * lin(t.left_projection) * sig(lin(t.left_gate)),
          m * lin(t.right_projection) * sig(lin(t.right_gate)), lin(t.output_gate))


def _kernel(t, z, mask, dtype, channel_major=False):
  layers = (t.left_projection, t.left_gate, t.right_projection, t.right_gate, t.output_gate)
  return tp.gated_projections(z, mask[..., None], t.layer_norm_in.scale[...],
                              t.layer_norm_in.bias[...], [l.kernel[...] for l in layers],
                              [l.bias[...] for l in layers], eps=EPS, dtype=dtype,
                              channel_major=channel_major, interpret=True)


# (N_res, c_z, c_hidden): N_res^2 rows that are not a multiple of the 64-row block, c_hidden
# below, equal to and above c_z.
@pytest.mark.parametrize("n,c_z,c_hidden", [(9, 32, 16), (11, 16, 16), (7, 16, 32)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_kernel_matches_the_float64_reference(n, c_z, c_hidden, dtype):
  t = random_module(c_z, c_hidden, dtype)
  z, mask = _pair(n, c_z, dtype)
  got = jax.jit(lambda z, m: _kernel(t, z, m, dtype))(z, mask)
  xla = t.projections(t.layer_norm_in(z), mask[..., None], output_gate=True)
  for name, g, x, want in zip(("left", "right", "gate"), got, xla, _reference(t, z, mask)):
    assert g.dtype == dtype and g.shape == want.shape, name
    assert rel_error(g, want) <= 2 * rel_error(x, want) + 1e-3, name
  # Masked positions are exactly zero on the gated outputs.
  for gated in got[:2]:
    assert not np.any(np.asarray(gated, np.float32)[~np.asarray(mask)])


def test_channel_major_operands_are_the_transposes():
  n, c_z, c_hidden, dtype = 9, 32, 16, jnp.bfloat16  # 81 rows: the last block is partial
  t = random_module(c_z, c_hidden, dtype)
  z, mask = _pair(n, c_z, dtype)
  rows = jax.jit(lambda z, m: _kernel(t, z, m, dtype))(z, mask)
  cols = jax.jit(lambda z, m: _kernel(t, z, m, dtype, channel_major=True))(z, mask)
  assert cols[0].shape == cols[1].shape == (c_hidden, n, n)
  for r, c in zip(rows[:2], cols[:2]):
    np.testing.assert_array_equal(np.moveaxis(np.asarray(r), -1, 0), np.asarray(c))
  np.testing.assert_array_equal(rows[2], cols[2])


def test_fewer_layers_give_those_outputs_bitwise():
  """Without the output gate's layer, or with one (projection, gate) pair, the kernel returns
  bitwise what the five-layer call returns for those layers, and None for a gate it did not
  compute."""
  n, c_z, c_hidden, dtype = 9, 32, 16, jnp.bfloat16
  t = random_module(c_z, c_hidden, dtype)
  z, mask = _pair(n, c_z, dtype)
  five = _kernel(t, z, mask, dtype, channel_major=True)

  def call(*layers):
    return tp.gated_projections(z, mask[..., None], t.layer_norm_in.scale[...],
                                t.layer_norm_in.bias[...], [l.kernel[...] for l in layers],
                                [l.bias[...] for l in layers], eps=EPS, dtype=dtype,
                                channel_major=True, interpret=True)

  left, right = (t.left_projection, t.left_gate), (t.right_projection, t.right_gate)
  for got, want in ((call(*left, *right), (five[0], five[1], None)),
                    (call(*right), (five[1], None)),
                    (call(*left, t.output_gate), (five[0], five[2]))):
    assert len(got) == len(want)
    for g, w in zip(got, want):
      if w is None:
        assert g is None
      else:
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  with pytest.raises(ValueError, match="2 to 5 layers, got 1 kernels and 1 biases"):
    call(t.left_projection)


@pytest.fixture
def interpreted(monkeypatch):
  """The fused kernels (input and output side) in Pallas's interpreter, reported as runnable
  here; counts their calls."""
  from jevo.ops import triangle_epilogue, triangle_epilogue_pallas
  calls = []

  def fused(*args, **kwargs):
    calls.append("input")
    return tp.gated_projections(*args, **kwargs, interpret=True)

  def fused_epilogue(*args, **kwargs):
    calls.append("output")
    return triangle_epilogue_pallas.triangle_epilogue(*args, **kwargs, interpret=True)

  def fused_epilogue_gate_from_z(*args, **kwargs):
    calls.append("output, gate from z")
    return triangle_epilogue_pallas.triangle_epilogue_gate_from_z(*args, **kwargs,
                                                                  interpret=True)

  monkeypatch.setattr(op, "fused", fused)
  monkeypatch.setattr(triangle_epilogue, "fused", fused_epilogue)
  monkeypatch.setattr(triangle_epilogue, "fused_gate_from_z", fused_epilogue_gate_from_z)
  monkeypatch.setattr(op, "unsupported_reason", lambda *a: None)
  monkeypatch.setattr(triangle_multiplication, "platform_reason", lambda x: None)
  return calls


@pytest.mark.parametrize("implementation", ["pallas_forward", None])  # None: where it can run
@pytest.mark.parametrize("outgoing", [True, False])
def test_pallas_forward_runs_the_kernel_undifferentiated_and_xla_under_grad(interpreted,
                                                                            outgoing,
                                                                            implementation):
  dtype = jnp.bfloat16
  t = random_module(32, 16, dtype, implementation, outgoing)
  x = random_module(32, 16, dtype, "xla", outgoing)  # the same parameters (same seeds)
  z, mask = _pair(9, 32, dtype)

  assert t.resolved_implementation(z) == "pallas_forward"
  assert x.resolved_implementation(z) == "xla"
  out = nnx.jit(lambda t, z: t(z, mask))(t, z)
  assert interpreted == ["input", "output"], "the undifferentiated module did not run the kernels"
  want = x(z, mask)
  assert out.dtype == want.dtype and out.shape == want.shape
  assert rel_error(out, want) < 2e-2  # bf16 roundings of a different order

  interpreted.clear()

  def loss(module, z):
    return jnp.sum(module(z, mask).astype(jnp.float32) ** 2)

  grads = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(t, z)
  assert not interpreted, "the differentiated module ran the kernel"
  want_grads = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(x, z)
  for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("outgoing", [True, False])
def test_the_kernel_path_under_vmap_and_remat_matches_per_example_calls(interpreted, outgoing,
                                                                        chunk_size):
  t = random_module(16, 16, jnp.bfloat16, None, outgoing)
  pairs = [_pair(6, 16, jnp.bfloat16, seed) for seed in range(3)]
  zs, masks = (jnp.stack(p) for p in zip(*pairs))
  call = lambda z, m: t(z, m, chunk_size=chunk_size)  # noqa: E731
  batched = jax.jit(jax.vmap(jax.checkpoint(call)))(zs, masks)
  assert interpreted, "the kernel did not run"
  for i, (z, m) in enumerate(pairs):
    np.testing.assert_array_equal(batched[i], jax.jit(call)(z, m))
  # Leading batch axes of z itself, unbatched by vmap, give the same rows.
  np.testing.assert_array_equal(jax.jit(call)(zs, masks), batched)


@pytest.mark.parametrize("outgoing", [True, False])
def test_chunked_calls_run_the_kernels_undifferentiated_and_xla_under_grad(interpreted,
                                                                           outgoing):
  """A chunked call (3 rows at a time of 8: the last chunk overlaps the one before) runs the
  input side once whole and then in the loop over chunks, with the output side computing the
  gate from z; it
  matches XLA's chunked and whole calls within bf16 roundings, and under grad it is XLA's,
  bit for bit."""
  dtype = jnp.bfloat16
  t = random_module(32, 16, dtype, "pallas_forward", outgoing)
  x = random_module(32, 16, dtype, "xla", outgoing)
  z, mask = _pair(8, 32, dtype)
  out = jax.jit(lambda z, m: t(z, m, chunk_size=3))(z, mask)
  # Traced more than once per chunk (the output's shape is found by tracing a chunk first).
  assert interpreted[0] == "input" and set(interpreted[1:]) == {"input", "output, gate from z"}
  want = x(z, mask, chunk_size=3)
  assert out.dtype == want.dtype and out.shape == want.shape
  assert rel_error(out, want) < 2e-2
  assert rel_error(out, x(z, mask)) < 2e-2
  interpreted.clear()

  def loss(module, z):
    return jnp.sum(module(z, mask, chunk_size=3).astype(jnp.float32) ** 2)

  grads = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(t, z)
  assert not interpreted, "the differentiated module ran the kernel"
  want_grads = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(x, z)
  for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_array_equal(got, expected)


_HERE = op.unsupported_reason(jnp.zeros((4, 4, 16), jnp.bfloat16), 16, jnp.bfloat16)


@pytest.mark.skipif(_HERE is None, reason="the kernel runs here")
def test_off_the_gpu_pallas_forward_says_why_and_xla_is_the_default():
  z, mask = _pair(5, 16, jnp.bfloat16)
  with pytest.raises(ValueError, match="implementation='pallas_forward'.*cannot run here"):
    random_module(16, 16, jnp.bfloat16, "pallas_forward")(z, mask)
  assert random_module(16, 16, jnp.bfloat16).resolved_implementation(z) == "xla"
  np.testing.assert_array_equal(random_module(16, 16, jnp.bfloat16)(z, mask),
                                random_module(16, 16, jnp.bfloat16, "xla")(z, mask))


def test_bad_implementation_and_unsupported_shapes_raise():
  with pytest.raises(ValueError, match="implementation must be one of"):
    TriangleMultiplication(16, 16, implementation="cuda", rngs=nnx.Rngs(0))
  t = TriangleMultiplication(16, 16, rngs=nnx.Rngs(0))
  t.implementation = "pallas"  # set after construction: checked when called
  with pytest.raises(ValueError, match="implementation must be one of"):
    t(jnp.zeros((4, 4, 16)))
  z = jnp.zeros((4, 4, 24), jnp.bfloat16)
  assert "power-of-two" in tp.unsupported_reason(z, 16, jnp.bfloat16)
  assert "power-of-two" in tp.unsupported_reason(jnp.zeros((4, 4, 256), jnp.bfloat16), 16,
                                                 jnp.bfloat16)
  assert "bfloat16 or float16" in tp.unsupported_reason(z[..., :16], 16, jnp.float32)
  assert tp.unsupported_reason(z[..., :16], 16, jnp.bfloat16) is None


@pytest.mark.skipif(_HERE is not None, reason=f"the kernel cannot run here: {_HERE}")
@pytest.mark.parametrize("channel_major", [False, True])
@pytest.mark.parametrize("c", [64, 128])
def test_on_the_gpu_the_kernel_matches_the_reference(c, channel_major):
  dtype = jnp.bfloat16
  t = random_module(c, c, dtype)
  z, mask = _pair(100, c, dtype)
  layers = (t.left_projection, t.left_gate, t.right_projection, t.right_gate, t.output_gate)
  got = jax.jit(lambda z, m: tp.gated_projections(
      z, m[..., None], t.layer_norm_in.scale[...], t.layer_norm_in.bias[...],
      [l.kernel[...] for l in layers], [l.bias[...] for l in layers], eps=EPS,
      dtype=dtype, channel_major=channel_major))(z, mask)
  if channel_major:
    got = (jnp.moveaxis(got[0], 0, -1), jnp.moveaxis(got[1], 0, -1), got[2])
  xla = t.projections(t.layer_norm_in(z), mask[..., None], output_gate=True)
  for name, g, x, want in zip(("left", "right", "gate"), got, xla, _reference(t, z, mask)):
    assert rel_error(g, want) <= 2 * rel_error(x, want) + 1e-3, name


@pytest.mark.skipif(_HERE is not None, reason=f"the kernel cannot run here: {_HERE}")
@pytest.mark.parametrize("outgoing", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 48])
def test_on_the_gpu_the_module_matches_xla_whole_and_chunked(outgoing, chunk_size):
  """The default module on the GPU (both fused sides; chunked: the gate from z) against the
  XLA module, 100 residues (chunks of 48: the last overlaps)."""
  dtype = jnp.bfloat16
  t = random_module(128, 128, dtype, None, outgoing)
  x = random_module(128, 128, dtype, "xla", outgoing)
  z, mask = _pair(100, 128, dtype)
  assert t.resolved_implementation(z) == "pallas_forward"
  got = jax.jit(lambda z, m: t(z, m, chunk_size=chunk_size))(z, mask)
  want = jax.jit(lambda z, m: x(z, m, chunk_size=chunk_size))(z, mask)
  assert rel_error(got, want) < 2e-2


@pytest.mark.parametrize("channel_major,layers", [(False, 5), (True, 5), (True, 4)])
def test_the_kernel_lowers_to_triton_for_cuda_on_any_machine(channel_major, layers):
  """Pallas's lowering of the kernel to Triton runs at lowering time, without a GPU: lowered for
  CUDA, the op's program holds the Triton custom call (compiling it needs a GPU)."""
  import jevo
  from jax import export
  t = random_module(128, 128, jnp.bfloat16)
  z, mask = _pair(24, 128, jnp.bfloat16)
  layers = (t.left_projection, t.left_gate, t.right_projection, t.right_gate,
            t.output_gate)[:layers]
  args = (z, mask[..., None], t.layer_norm_in.scale[...], t.layer_norm_in.bias[...],
          [l.kernel[...] for l in layers], [l.bias[...] for l in layers])
  f = jax.jit(lambda *a: tp.gated_projections(*a, eps=EPS, dtype=jnp.bfloat16,
                                              channel_major=channel_major))
  exported = export.export(f, platforms=["cuda"], disabled_checks=jevo.export_disabled_checks())(
      *args)
  assert "xla.gpu.triton" in exported.mlir_module()
