"""The fused transition's Pallas kernels against a float64 reference, in Pallas's interpreter (any
platform), and `fused_transition`'s choice of implementation.

The kernels' logic is checked tightly on float32 inputs (the interpreter runs the same kernel
code in float32). On bfloat16 inputs an error of relu's derivative is a step: a hidden unit whose
pre-activation sits near zero flips with any rounding and moves a gradient by O(1), so bfloat16
results are compared in relative Frobenius norm, against twice the XLA implementation's own
error in bfloat16 (FlashAttention's criterion)."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from jevo.bench.implementations import transition_inputs
from jevo.ops.dense import LINEAR_OUTPUT_NAME
from jevo.ops import transition_pallas as tp
from jevo.ops import transition as transition_op
from jevo.ops.transition import (PALLAS_FORWARD_MAX_CHANNELS, fused_transition,
                                 pallas_unsupported_reason, resolve_implementation,
                                 xla_transition)

EPS = 1e-5
PARAMS = ("ln_scale", "ln_offset", "w1", "b1", "w2", "b2")


def _inputs(rows, c, factor, dtype, seed=0, lead=()):
  """x `[*lead, rows, c]`, float32 parameters and a cotangent (`transition_inputs`)."""
  return transition_inputs(lead + (rows,), c, factor, dtype, seed)


def _reference(x, ln_scale, ln_offset, w1, b1, w2, b2):
  """The transition in float64 numpy, and its vjp with cotangent g."""
  x = np.asarray(x, np.float64)
  s, o, w1, b1, w2, b2 = (np.asarray(p, np.float64) for p in (ln_scale, ln_offset, w1, b1, w2, b2))
  mean = x.mean(-1, keepdims=True)
  rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + EPS)
  x_hat = (x - mean) * rstd
  y = x_hat * s + o
  a = y @ w1 + b1
  h = np.maximum(a, 0.0)
  out = h @ w2 + b2

  def vjp(g):
    g = np.asarray(g, np.float64)
    rows = tuple(range(x.ndim - 1))
    dh = g @ w2.T
    da = dh * (a > 0)
    dy = da @ w1.T
    dx_hat = dy * s
    dx = rstd * (dx_hat - dx_hat.mean(-1, keepdims=True)
                 - x_hat * (dx_hat * x_hat).mean(-1, keepdims=True))
    flat = lambda t: t.reshape(-1, t.shape[-1])
    return (dx, (dy * x_hat).sum(rows), dy.sum(rows), flat(y).T @ flat(da), da.sum(rows),
            flat(h).T @ flat(g), g.sum(rows))

  return out, vjp


@pytest.fixture(autouse=True)
def _float32_products():
  """Every product of these tests in full float32, on every platform: on a GPU, XLA's default
  precision runs float32 products as TF32 (about 1e-3 relative). The setting must hold while the
  jitted functions are lowered, not only while they are traced, so it spans the whole test."""
  with jax.default_matmul_precision("highest"):
    yield


def _pallas(config=None):
  """The kernels in Pallas's interpreter."""
  def run(x, *p):
    return tp.transition(x, *p, eps=EPS, config=config, interpret=True)
  return run


def _xla(x, *p):
  return xla_transition(x, *p, eps=EPS)


def _value_and_grads(fn, x, params, g):
  out, vjp = jax.vjp(fn, x, *params)
  return out, vjp(g)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


# (rows, c, factor): odd row counts (several row blocks of the default tiles for the larger ones),
# AlphaFold's c (64 extra MSA, 128 pair, 256 MSA) with factor 4, a small c, and a factor that is
# not a power of two.
CASES = [(37, 16, 4), (150, 64, 4), (133, 128, 4), (70, 256, 4), (50, 32, 3)]


@pytest.mark.parametrize("rows,c,factor", CASES)
def test_float32_forward_and_gradients_match_the_float64_reference(rows, c, factor):
  x, params, g = _inputs(rows, c, factor, jnp.float32)
  out, grads = jax.jit(lambda *a: _value_and_grads(_pallas(), a[0], a[1:-1], a[-1]))(x, *params, g)
  want, vjp = _reference(x, *params)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  for name, got, ref in zip(("x",) + PARAMS, grads, vjp(g)):
    assert got.dtype == (x.dtype if name == "x" else jnp.float32), name
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=name)


@pytest.mark.parametrize("rows,c,factor", CASES[:4])
def test_bfloat16_errors_are_at_most_twice_xla_s(rows, c, factor):
  x, params, g = _inputs(rows, c, factor, jnp.bfloat16, seed=1)
  out, grads = jax.jit(lambda *a: _value_and_grads(_pallas(), a[0], a[1:-1], a[-1]))(x, *params, g)
  xla_out, xla_grads = jax.jit(lambda *a: _value_and_grads(_xla, a[0], a[1:-1], a[-1]))(
      x, *params, g)
  want, vjp = _reference(x, *params)
  assert out.dtype == jnp.bfloat16 and out.shape == x.shape
  assert _rel(out, want) <= 2 * _rel(xla_out, want) + 1e-3
  for name, got, xla, ref in zip(("x",) + PARAMS, grads, xla_grads, vjp(g)):
    assert np.all(np.isfinite(np.asarray(got, np.float32))), name
    assert _rel(got, ref) <= 2 * _rel(xla, ref) + 1e-3, name


def test_float16_runs_and_is_close():
  x, params, g = _inputs(21, 32, 4, jnp.float16, seed=2)
  out, grads = _value_and_grads(_pallas(), x, params, g)
  want, vjp = _reference(x, *params)
  assert out.dtype == jnp.float16 and _rel(out, want) < 1e-2
  for name, got, ref in zip(("x",) + PARAMS, grads, vjp(g)):
    assert _rel(got, ref) < 3e-2, name


@pytest.mark.parametrize("programs", [1, 6])
def test_parameter_kernel_row_groups_of_several_blocks(programs):
  """A small program target makes the parameter kernel loop over several row blocks per
  program, with a shorter last group; the first input kernel row block is 16 rows."""
  config = tp.TransitionConfig(forward=tp.KernelConfig(16, 16, 4, 1),
                               input_grad=tp.KernelConfig(16, 32, 4, 1),
                               param_grad=tp.KernelConfig(16, 16, 4, 1),
                               param_grad_programs=programs)
  x, params, g = _inputs(83, 16, 4, jnp.float32, seed=3)
  out, grads = _value_and_grads(_pallas(config), x, params, g)
  want, vjp = _reference(x, *params)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  for name, got, ref in zip(("x",) + PARAMS, grads, vjp(g)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=name)


def test_leading_dims_vmap_and_remat():
  x, params, g = _inputs(7, 16, 4, jnp.float32, seed=4, lead=(3, 2))
  want, vjp = _reference(x, *params)
  ref_grads = vjp(g)

  def loss(x, *p):
    return jnp.sum(_pallas()(x, *p) * g)

  # Leading dims flattened to rows, under jit, and under jax.checkpoint.
  out = jax.jit(_pallas())(x, *params)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  for fn in (loss, jax.checkpoint(loss)):
    grads = jax.jit(jax.grad(fn, argnums=tuple(range(7))))(x, *params)
    for name, got, ref in zip(("x",) + PARAMS, grads, ref_grads):
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=name)

  # vmap over the leading axis: per-example parameter gradients.
  def example_loss(x_e, g_e, *p):
    return jnp.sum(_pallas()(x_e, *p) * g_e)

  per_example = jax.vmap(jax.grad(example_loss, argnums=(0, 2, 3, 4, 5, 6, 7)),
                         in_axes=(0, 0) + (None,) * 6)(x, g, *params)
  for e in range(x.shape[0]):
    _, vjp_e = _reference(x[e], *params)
    for name, got, ref in zip(("x",) + PARAMS, per_example, vjp_e(g[e])):
      np.testing.assert_allclose(got[e], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(),
                                 err_msg=name)
  # vmap over the parameters too (an ensemble).
  stacked = tuple(jnp.stack([p, 1.1 * p, 0.9 * p]) for p in params)
  outs = jax.vmap(_pallas())(x, *stacked)
  for e in range(x.shape[0]):
    np.testing.assert_allclose(outs[e], _reference(x[e], *(p[e] for p in stacked))[0],
                               rtol=1e-5, atol=1e-5)


def test_configs_shrink_to_the_inputs():
  config = tp.KernelConfig(128, 64, 4, 2).fitted(rows=5, hidden=48)
  assert (config.block_rows, config.hidden_chunk) == (16, 16)
  assert tp.KernelConfig(128, 64, 4, 2).fitted(rows=1000, hidden=512).block_rows == 128


def test_unsupported_shapes_and_dtypes_say_why():
  w = lambda c, h: jnp.zeros((c, h))
  assert "bfloat16 or float16" in tp.unsupported_reason(jnp.zeros((4, 64)), w(64, 256))
  assert "power-of-two" in tp.unsupported_reason(jnp.zeros((4, 48), jnp.bfloat16), w(48, 192))
  assert "power-of-two" in tp.unsupported_reason(jnp.zeros((4, 512), jnp.bfloat16), w(512, 2048))
  assert "multiple of 16" in tp.unsupported_reason(jnp.zeros((4, 64), jnp.bfloat16), w(64, 40))
  assert "no rows" in tp.unsupported_reason(jnp.zeros((0, 64), jnp.bfloat16), w(64, 256))
  huge = jax.ShapeDtypeStruct((2 ** 24, 128), jnp.bfloat16)
  assert "2**31" in tp.unsupported_reason(huge, w(128, 512))
  assert tp.unsupported_reason(jnp.zeros((4, 64), jnp.bfloat16), w(64, 256)) is None


_HERE = pallas_unsupported_reason(jnp.zeros((8, 128), jnp.bfloat16), jnp.zeros((128, 512)))


@pytest.mark.skipif(_HERE is None, reason="the Pallas kernels run here")
def test_off_the_gpu_none_runs_xla_and_pallas_says_why():
  x, params, _ = _inputs(9, 16, 4, jnp.bfloat16)
  assert resolve_implementation(x, params[2]) == "xla"
  np.testing.assert_array_equal(fused_transition(x, *params, eps=EPS),
                                xla_transition(x, *params, eps=EPS))
  for implementation in ("pallas", "pallas_forward"):
    with pytest.raises(ValueError, match=f"implementation='{implementation}'.*cannot run here"):
      fused_transition(x, *params, eps=EPS, implementation=implementation)


def test_pallas_forward_runs_the_kernel_undifferentiated_and_xla_under_differentiation(
    monkeypatch, capsys):
  """"pallas_forward" (None's choice on a GPU at c <= 128): its value is the fused kernel's, and
  its gradients are XLA's, bit for bit; under vmap the kernel runs. The kernel
  runs in Pallas's interpreter here, and counts its calls."""
  calls = []

  def interpreted(*args, **kwargs):
    calls.append(1)
    return tp.transition(*args, **{**kwargs, "interpret": True})

  monkeypatch.setattr(transition_op, "_forward_kernel", interpreted)
  x, params, g = _inputs(37, 32, 4, jnp.bfloat16, seed=3)
  run = lambda x, *p: transition_op._pallas_forward(x, *p, EPS, None)

  out = jax.jit(run)(x, *params)
  assert calls, "the undifferentiated op did not run the kernel"
  np.testing.assert_array_equal(out, _pallas()(x, *params))

  calls.clear()
  out_d, grads = jax.jit(lambda *a: _value_and_grads(run, a[0], a[1:-1], a[-1]))(x, *params, g)
  want_out, want_grads = jax.jit(lambda *a: _value_and_grads(_xla, a[0], a[1:-1], a[-1]))(
      x, *params, g)
  assert not calls, "the differentiated op ran the kernel"
  np.testing.assert_array_equal(out_d, want_out)
  for got, want in zip(grads, want_grads):
    np.testing.assert_array_equal(got, want)

  # Remat policies see the same residuals as XLA's: same shapes, dtypes and names.
  policy = jax.checkpoint_policies.save_only_these_names(LINEAR_OUTPUT_NAME)

  def saved(fn):
    """(shape and dtype, name if any) of each residual the policy keeps."""
    capsys.readouterr()
    print_saved_residuals(
        jax.checkpoint(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), policy=policy),
        x, *params)
    return sorted(line.split(" from ")[0] for line in capsys.readouterr().out.splitlines())

  assert saved(run) == saved(_xla) and any("named" in r for r in saved(run))

  calls.clear()
  xs = jnp.stack([x, x[::-1]])
  batched = jax.vmap(run, in_axes=(0,) + (None,) * len(params))(xs, *params)
  assert calls
  np.testing.assert_array_equal(batched[1], _pallas()(x[::-1], *params))


def test_bad_arguments_raise():
  x, params, _ = _inputs(9, 16, 4, jnp.float32)
  with pytest.raises(ValueError, match="unknown transition implementation"):
    fused_transition(x, *params, eps=EPS, implementation="cuda")
  with pytest.raises(ValueError, match="w2 must have shape"):
    fused_transition(x, *params[:4], params[4].T, params[5], eps=EPS)
  with pytest.raises(TypeError, match="floating-point"):
    fused_transition(x.astype(jnp.int32), *params, eps=EPS)


@pytest.mark.skipif(_HERE is not None, reason=f"the Pallas kernels cannot run here: {_HERE}")
@pytest.mark.parametrize("rows,c", [(1000, 64), (777, 128), (333, 256)])
def test_on_the_gpu_pallas_matches_xla(rows, c):
  x, params, g = _inputs(rows, c, 4, jnp.bfloat16, seed=5)
  assert resolve_implementation(x, params[2], "pallas") == "pallas"
  # The default: the fused forward where it was measured faster, XLA under differentiation.
  default = "pallas_forward" if c <= PALLAS_FORWARD_MAX_CHANNELS else "xla"
  assert resolve_implementation(x, params[2]) == default
  if default == "pallas_forward":
    np.testing.assert_array_equal(jax.jit(lambda *a: fused_transition(*a, eps=EPS))(x, *params),
                                  jax.jit(lambda *a: fused_transition(
                                      *a, eps=EPS, implementation="pallas"))(x, *params))
    np.testing.assert_array_equal(
        jax.jit(jax.grad(lambda *a: jnp.sum(fused_transition(*a, eps=EPS) * g)))(x, *params),
        jax.jit(jax.grad(lambda *a: jnp.sum(_xla(*a) * g)))(x, *params))
  pallas = lambda x, *p: fused_transition(x, *p, eps=EPS, implementation="pallas")
  out, grads = jax.jit(lambda *a: _value_and_grads(pallas, a[0], a[1:-1], a[-1]))(x, *params, g)
  xla_out, xla_grads = jax.jit(lambda *a: _value_and_grads(_xla, a[0], a[1:-1], a[-1]))(
      x, *params, g)
  want, vjp = _reference(x, *params)
  assert _rel(out, want) <= 2 * _rel(xla_out, want) + 1e-3
  for name, got, xla, ref in zip(("x",) + PARAMS, grads, xla_grads, vjp(g)):
    assert _rel(got, ref) <= 2 * _rel(xla, ref) + 1e-3, name
  # Deterministic: a second run gives the same bits.
  again = jax.jit(lambda *a: _value_and_grads(pallas, a[0], a[1:-1], a[-1]))(x, *params, g)
  for a, b in zip(jax.tree.leaves((out, grads)), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_module_computes_what_its_layers_did():
  """`jevo.nn.Transition` through `fused_transition` gives the numbers of its layers applied one
  by one (the XLA implementation here), bit for bit, in float32 and bfloat16."""
  from flax import nnx

  from jevo.nn import Transition
  from jevo.ops.activation import relu

  for dtype in (None, jnp.bfloat16):
    t = Transition(16, factor=4, output_kernel_init=nnx.initializers.lecun_normal(),
                   implementation="xla", dtype=dtype, rngs=nnx.Rngs(0))
    x, _, _ = _inputs(11, 16, 4, jnp.float32, lead=(3,))
    layers = lambda x: t.linear_2(relu(t.linear_1(t.layer_norm(x))))
    np.testing.assert_array_equal(t(x), layers(x))
    grad = lambda f: jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32) ** 2))(x)
    np.testing.assert_array_equal(grad(t), grad(layers))
  with pytest.raises(ValueError, match="implementation"):
    Transition(16, implementation="cuda", rngs=nnx.Rngs(0))
  Transition(16, implementation="pallas_forward", rngs=nnx.Rngs(0))  # a known name
