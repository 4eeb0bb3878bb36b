"""Per-module tests of jevo.nn: batch dims, masks, chunking, the op's layout, init, validation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jevo
import jevo.nn.attention as nn_attention
from jevo.nn import linear
import nn_reference as ref
from nn_reference import full_precision_matmuls  # noqa: F401  (autouse fixture)
from jevo.nn import (EvoformerBlock, MSAColumnAttention, MSAColumnGlobalAttention,
                     MSARowAttentionWithPairBias, OuterProductMean, Transition, TriangleAttention,
                     TriangleMultiplication)

S = ref.TINY
N_SEQ, N_RES = 4, 7


def _modules():
  """Each module with a call taking (m, z, msa_mask, pair_mask, **kw), at tiny sizes."""
  r = nnx.Rngs(0)
  return {
      "msa_row": (MSARowAttentionWithPairBias(S.c_m, S.c_z, num_heads=S.heads_msa,
                                              head_dim=S.dim_msa, rngs=r),
                  lambda mod, m, z, mm, pm, **kw: mod(m, z, mm, **kw), "msa"),
      "msa_column": (MSAColumnAttention(S.c_m, num_heads=S.heads_msa, head_dim=S.dim_msa, rngs=r),
                     lambda mod, m, z, mm, pm, **kw: mod(m, mm, **kw), "msa"),
      "msa_column_global": (MSAColumnGlobalAttention(S.c_m, num_heads=S.heads_msa,
                                                     head_dim=S.dim_msa, rngs=r),
                            lambda mod, m, z, mm, pm, **kw: mod(m, mm, **kw), "msa"),
      "msa_transition": (Transition(S.c_m, factor=S.n_transition, rngs=r),
                         lambda mod, m, z, mm, pm, **kw: mod(m, mm, **kw), "msa"),
      "outer_product_mean": (OuterProductMean(S.c_m, S.c_z, S.c_opm, rngs=r),
                             lambda mod, m, z, mm, pm, **kw: mod(m, mm, **kw), "pair"),
      **{f"triangle_attention_{n}": (
          TriangleAttention(S.c_z, starting=n == "starting", num_heads=S.heads_pair,
                            head_dim=S.dim_pair, rngs=r),
          lambda mod, m, z, mm, pm, **kw: mod(z, pm, **kw), "pair")
         for n in ("starting", "ending")},
      **{f"triangle_multiplication_{n}": (
          TriangleMultiplication(S.c_z, S.c_mul, outgoing=n == "outgoing", rngs=r),
          lambda mod, m, z, mm, pm, **kw: mod(z, pm, **kw), "pair")
         for n in ("outgoing", "incoming")},
      "pair_transition": (Transition(S.c_z, factor=S.n_transition, rngs=r),
                          lambda mod, m, z, mm, pm, **kw: mod(z, pm, **kw), "pair"),
  }


MODULE_NAMES = list(_modules())


@pytest.fixture(scope="module")
def modules():
  """name -> (module, jitted call, output kind); one compiled function per module and shape."""
  out = {}
  for i, (name, (mod, call, kind)) in enumerate(_modules().items()):
    ref.randomize_params(mod, seed=100 + i)
    out[name] = (mod, jax.jit(functools.partial(call, mod), static_argnames="chunk_size"), kind)
  return out


@pytest.fixture
def inputs():
  return [jnp.asarray(x) for x in ref.random_inputs(np.random.default_rng(), N_SEQ, N_RES,
                                                    S.c_m, S.c_z)]


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_batch_dims_equal_per_example(modules, name):
  _, call, _ = modules[name]
  m, z, mm, pm = (jnp.asarray(x) for x in ref.random_inputs(
      np.random.default_rng(), N_SEQ, N_RES, S.c_m, S.c_z, batch=(2,)))
  batched = call(m, z, mm, pm)
  for b in range(2):
    np.testing.assert_allclose(batched[b], call(m[b], z[b], mm[b], pm[b]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_masked_inputs_do_not_reach_valid_outputs(modules, name, inputs):
  _, call, out_kind = modules[name]
  m, z, mm, pm = inputs
  rng = np.random.default_rng()
  noise_m = jnp.where(mm[..., None], 0.0, 100.0 * rng.standard_normal(m.shape))
  noise_z = jnp.where(pm[..., None], 0.0, 100.0 * rng.standard_normal(z.shape))
  out = call(m, z, mm, pm)
  out_noisy = call(m + noise_m, z + noise_z, mm, pm)
  valid = np.asarray(mm if out_kind == "msa" else pm)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(np.asarray(out_noisy)[valid], np.asarray(out)[valid],
                             rtol=1e-5, atol=1e-5)
  if name not in ("msa_transition", "pair_transition", "outer_product_mean"):
    # (Those three give padded positions a fixed update whatever the input there is.)
    assert not np.allclose(out_noisy, out), "the noise should change padded positions"


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_chunked_equals_unchunked(modules, name, inputs):
  _, call, _ = modules[name]
  # 3 divides neither 7 nor 4: the last chunk overlaps the one before it.
  np.testing.assert_allclose(call(*inputs, chunk_size=3), call(*inputs), rtol=1e-5, atol=1e-5)


def test_transition_update_is_zero_at_padding(modules, inputs):
  _, call, _ = modules["pair_transition"]
  out = np.asarray(call(*inputs))
  pm = np.asarray(inputs[3])
  assert np.all(out[~pm] == 0.0) and np.any(out[pm] != 0.0)


def test_outer_product_mean_normalises_by_mask_count(inputs):
  m, _, mm, _ = inputs
  opm = OuterProductMean(S.c_m, S.c_z, S.c_opm, rngs=nnx.Rngs(1))
  ref.randomize_params(opm, seed=7)
  opm.output.bias[...] = jnp.zeros_like(opm.output.bias[...])
  # Duplicating every sequence doubles the sum of outer products and the count of valid pairs.
  maskf = np.asarray(mm, np.float64)
  count = np.einsum("si,sj->ij", maskf, maskf)[..., None]
  doubled = opm(jnp.concatenate([m, m], axis=-3), jnp.concatenate([mm, mm], axis=-2))
  np.testing.assert_allclose(np.asarray(doubled) * (1e-3 + 2 * count),
                             2 * np.asarray(opm(m, mm)) * (1e-3 + count), rtol=1e-4, atol=1e-5)


class _OpSpy:
  """Stands in for jevo.evoformer_attention: records the calls, returns v (no logits)."""

  def __init__(self):
    self.calls = []

  def __call__(self, q, k, v, *, mask=None, bias=None, scale=None, implementation=None):
    self.calls.append(dict(q=q.shape, k=k.shape, v=v.shape,
                           mask=None if mask is None else (mask.shape, mask.dtype),
                           bias=None if bias is None else bias.shape,
                           implementation=implementation))
    return v


def test_attention_modules_call_the_op_in_its_layout(monkeypatch):
  spy = _OpSpy()
  monkeypatch.setattr(nn_attention, "evoformer_attention", spy)
  block = EvoformerBlock(S.c_m, S.c_z, **S.block_kwargs(), implementation="xla_chunked",
                         rngs=nnx.Rngs(0))
  m, z, mm, pm = ref.random_inputs(np.random.default_rng(), N_SEQ, N_RES, S.c_m, S.c_z)
  block.eval()

  def forward(m, z):
    return block(m, z, mm, pm)

  jaxpr = jax.make_jaxpr(forward)(m, z)
  h_m, d_m, h_z, d_z = S.heads_msa, S.dim_msa, S.heads_pair, S.dim_pair
  assert spy.calls == [
      # MSA row: N = sequences, S = residues, pair bias shared over sequences.
      dict(q=(N_SEQ, N_RES, h_m, d_m), k=(N_SEQ, N_RES, h_m, d_m), v=(N_SEQ, N_RES, h_m, d_m),
           mask=((N_SEQ, 1, 1, N_RES), jnp.bool_), bias=(1, h_m, N_RES, N_RES),
           implementation="xla_chunked"),
      # MSA column: the transposed MSA, mask only.
      dict(q=(N_RES, N_SEQ, h_m, d_m), k=(N_RES, N_SEQ, h_m, d_m), v=(N_RES, N_SEQ, h_m, d_m),
           mask=((N_RES, 1, 1, N_SEQ), jnp.bool_), bias=None,
           implementation="xla_chunked"),
  ] + [
      # Triangle starting / ending node: rows of the (transposed) pair, bias from the pair.
      dict(q=(N_RES, N_RES, h_z, d_z), k=(N_RES, N_RES, h_z, d_z), v=(N_RES, N_RES, h_z, d_z),
           mask=((N_RES, 1, 1, N_RES), jnp.bool_), bias=(1, h_z, N_RES, N_RES),
           implementation="xla_chunked")
  ] * 2
  # Outside the op nothing may be [N, H, S, S]: the only [.., H, S, S] arrays are the biases,
  # shared over N.
  for shape in _all_shapes(jaxpr.jaxpr):
    if (len(shape) >= 4 and shape[-1] == shape[-2] and shape[-1] in (N_SEQ, N_RES)
        and shape[-3] in (h_m, h_z)):
      assert int(np.prod(shape[:-3])) == 1, f"logits-like array of shape {shape}"


def _all_shapes(jaxpr):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield tuple(getattr(var.aval, "shape", ()))
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        yield from _all_shapes(inner)


def _jit_forward(block):
  """The block's eval-mode forward, compiled (much faster than op-by-op on CPU)."""
  return jax.jit(lambda m, z, mm, pm: block(m, z, mm, pm))


def test_fresh_block_is_identity_and_gates_start_open():
  block = EvoformerBlock(S.c_m, S.c_z, **S.block_kwargs(), rngs=nnx.Rngs(0))
  m, z, mm, pm = ref.random_inputs(np.random.default_rng(), N_SEQ, N_RES, S.c_m, S.c_z)
  block.eval()
  out_m, out_z = _jit_forward(block)(m, z, mm, pm)
  np.testing.assert_array_equal(out_m, m)
  np.testing.assert_array_equal(out_z, z)
  att = block.msa_row_attention.attention
  assert np.all(att.gate.kernel[...] == 0) and np.all(att.gate.bias[...] == 1)
  tri = block.triangle_multiplication_incoming
  assert np.all(tri.left_gate.bias[...] == 1) and np.all(tri.output_gate.kernel[...] == 0)
  # An injected output initializer makes the block act from the start.
  lively = EvoformerBlock(S.c_m, S.c_z, **S.block_kwargs(), rngs=nnx.Rngs(0),
                          output_kernel_init=nnx.initializers.lecun_normal())
  lively.eval()
  assert not np.allclose(_jit_forward(lively)(m, z, mm, pm)[1], z)


def test_bfloat16_compute_keeps_float32_params():
  block = EvoformerBlock(S.c_m, S.c_z, **S.block_kwargs(), dtype=jnp.bfloat16,
                         rngs=nnx.Rngs(0))
  ref.randomize_params(block, seed=3)
  block.eval()
  m, z, mm, pm = ref.random_inputs(np.random.default_rng(), N_SEQ, N_RES, S.c_m, S.c_z)
  out_m, out_z = _jit_forward(block)(jnp.asarray(m, jnp.bfloat16), jnp.asarray(z, jnp.bfloat16),
                                     mm, pm)
  assert out_m.dtype == out_z.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(block, nnx.Param)))
  f32 = EvoformerBlock(S.c_m, S.c_z, **S.block_kwargs(), rngs=nnx.Rngs(0))
  nnx.update(f32, nnx.state(block, nnx.Param))
  f32.eval()
  _, exp_z = _jit_forward(f32)(jnp.asarray(m), jnp.asarray(z), mm, pm)
  valid = np.asarray(pm)
  err = np.abs(np.asarray(out_z, np.float32) - np.asarray(exp_z))[valid].max()
  assert err < 0.1 * np.abs(np.asarray(exp_z))[valid].max()


@pytest.mark.parametrize("bad_call, match", [
    (lambda mods, m, z, mm, pm: mods["msa_row"][0](m[..., :-1], z, mm), "c_m"),
    (lambda mods, m, z, mm, pm: mods["msa_row"][0](m, z[:-1, :-1], mm), "z must have shape"),
    (lambda mods, m, z, mm, pm: mods["msa_column"][0](m, mm[:, :-1]), "msa_mask"),
    (lambda mods, m, z, mm, pm: mods["triangle_attention_starting"][0](z[:, :-1]), "square"),
    (lambda mods, m, z, mm, pm: mods["pair_transition"][0](z, pm, chunk_size=0), "chunk_size"),
    (lambda mods, m, z, mm, pm: mods["outer_product_mean"][0](m, mm, chunk_size=2.5),
     "chunk_size"),
])
def test_bad_inputs_raise_value_error(modules, inputs, bad_call, match):
  with pytest.raises(ValueError, match=match):
    bad_call(modules, *inputs)


def test_bad_constructor_arguments_raise_value_error():
  with pytest.raises(ValueError, match="num_heads"):
    MSAColumnAttention(S.c_m, num_heads=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="msa_dropout"):
    EvoformerBlock(S.c_m, S.c_z, **S.block_kwargs(), msa_dropout=1.0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_project_equals_the_layers_applied_one_by_one(dtype):
  rngs = nnx.Rngs(7)
  layers = [nnx.Linear(6, 3, dtype=dtype, rngs=rngs),
            nnx.Linear(6, 5, use_bias=False, dtype=dtype, rngs=rngs),
            nnx.Linear(6, 2, dtype=dtype, bias_init=nnx.initializers.normal(1.0), rngs=rngs)]
  x = jax.random.normal(jax.random.key(8), (4, 5, 6))
  weights = [jax.random.normal(jax.random.key(9 + i), (4, 5, l.out_features))
             for i, l in enumerate(layers)]

  def loss(outs):  # the second output unused: its cotangent is zero
    return sum(jnp.sum(w * jnp.sin(o.astype(jnp.float32)))
               for i, (w, o) in enumerate(zip(weights, outs)) if i != 1)

  together = linear.project(x, *layers)
  one_by_one = [layer(x) for layer in layers]
  # One wider product may sum in another order than three narrow ones: float32 rounding.
  value_tol = 1e-6 if dtype is None else 1e-2
  for a, b in zip(together, one_by_one):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=value_tol, atol=value_tol)
  # Gradients for x and every kernel and bias, against nnx.Linear's own (autodiff) ones.
  grad = nnx.grad(lambda layers, x: loss(linear.project(x, *layers)), argnums=(0, 1))
  grad_ref = nnx.grad(lambda layers, x: loss([nnx.Linear.__call__(l, x) for l in layers]),
                      argnums=(0, 1))
  tol = 1e-5 if dtype is None else 2e-2
  got, want = grad(layers, x), grad_ref(layers, x)
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves) == 1 + 3 + 2  # x, three kernels, two biases
  for a, b in zip(got_leaves, want_leaves):
    assert a.dtype == b.dtype and a.shape == b.shape
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("use_bias", [True, False])
def test_linear_is_nnx_linear_with_the_same_gradients(use_bias):
  """linear.Linear (every module's layer) computes nnx.Linear's values and gradients, in float32 on
  leading batch dims, and has its parameters, so that parameter files load unchanged."""
  rngs = nnx.Rngs(3)
  ours = linear.linear(5, 7, use_bias=use_bias, bias_init=nnx.initializers.normal(1.0),
                  dtype=None, param_dtype=jnp.float32, rngs=rngs)
  ref = nnx.Linear(5, 7, use_bias=use_bias, rngs=rngs)
  nnx.update(ref, nnx.state(ours))
  x = jax.random.normal(jax.random.key(4), (2, 3, 5))
  w = jax.random.normal(jax.random.key(5), (2, 3, 7))
  loss = lambda layer, x: jnp.sum(w * jnp.tanh(layer(x)))
  np.testing.assert_allclose(ours(x), ref(x), rtol=1e-6, atol=1e-6)
  got = nnx.grad(loss, argnums=(0, 1))(ours, x)
  want = nnx.grad(loss, argnums=(0, 1))(ref, x)
  assert jax.tree.structure(jax.tree.map(np.shape, nnx.state(ours))) == \
      jax.tree.structure(jax.tree.map(np.shape, nnx.state(ref)))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_project_applies_differing_layers_one_by_one():
  rngs = nnx.Rngs(7)
  layers = [nnx.Linear(6, 3, rngs=rngs), nnx.Linear(6, 4, dtype=jnp.bfloat16, rngs=rngs)]
  x = jax.random.normal(jax.random.key(8), (2, 6))
  outs = linear.project(x, *layers)
  assert [o.dtype for o in outs] == [jnp.float32, jnp.bfloat16]
  np.testing.assert_array_equal(np.asarray(outs[1], np.float32),
                                np.asarray(layers[1](x), np.float32))


def test_checkpoint_policies_see_the_linear_layer_as_one_call(capsys):
  """What EvoformerStack's docstring says of remat policies: dots_saveable keeps a plain
  dot_general's output, but not that of a jevo linear layer (one custom VJP); both gradients
  agree."""
  rngs = nnx.Rngs(0)
  layer = linear.linear(8, 16, dtype=None, param_dtype=jnp.float32, rngs=rngs)
  x = jax.random.normal(jax.random.key(1), (4, 8))

  def saved(fn):
    policy = jax.checkpoint_policies.dots_saveable
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(fn, policy=policy), x)
    return [line for line in capsys.readouterr().out.splitlines() if "dot_general" in line]

  ours = lambda x: jnp.sum(jnp.tanh(layer(x)))
  plain = lambda x: jnp.sum(jnp.tanh(nnx.Linear.__call__(layer, x)))
  assert saved(ours) == []
  assert len(saved(plain)) == 1
  np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(plain)(x), rtol=1e-6, atol=1e-6)


def test_checkpoint_policies_save_linear_outputs_by_name(capsys):
  """Every linear layer's output is named LINEAR_OUTPUT_NAME, as EvoformerStack's docstring
  says, so a policy can keep it by name: one layer, and projections of one input together."""
  rngs = nnx.Rngs(0)
  layers = [linear.linear(8, n, dtype=None, param_dtype=jnp.float32, rngs=rngs) for n in (16, 3, 5)]
  x = jax.random.normal(jax.random.key(1), (4, 8))
  by_name = jax.checkpoint_policies.save_only_these_names(jevo.nn.LINEAR_OUTPUT_NAME)

  def saved(fn, policy):
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(fn, policy=policy), x)
    return [line.split(" named ")[0] for line in capsys.readouterr().out.splitlines()
            if f"named '{jevo.nn.LINEAR_OUTPUT_NAME}'" in line]

  one = lambda x: jnp.sum(jnp.tanh(layers[0](x)))

  def both(x):
    a, b = linear.project(x, layers[1], layers[2])
    return jnp.sum(jnp.tanh(a)) + jnp.sum(jnp.sin(b))

  assert saved(one, by_name) == ["f32[4,16]"]
  assert saved(both, by_name) == ["f32[4,8]"]  # the two projections, as one product
  assert saved(one, jax.checkpoint_policies.nothing_saveable) == []
