"""The tests every attention backend must pass, as a base class to subclass per backend.

    class TestMyBackend(AttentionBackendSuite):
      implementation = "my_backend"
      dtypes = ("bf16", "fp16")          # capability flags: cases outside them are skipped

Accuracy is judged against the float64 reference: a backend's error may be at most `factor`
times the error of the `baseline` backend ("xla", fp32 math) on the same inputs, plus `ulps`
units of the dtype at the largest reference value. The baseline itself is held to the ulps term
alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jevo
from cases import Case, assert_accurate, make_inputs, max_error, random_cotangent, to_f64
import reference

# A spread of sizes rather than a full product: every S, every head dim and every dtype appears,
# the large S only a few times (CPU time).
FORWARD_CASES = [
    Case(1, 32, "bf16"),
    Case(1, 8, "fp32", mask="none"),
    Case(17, 8, "bf16"),
    Case(17, 16, "fp16"),
    Case(17, 32, "fp32"),
    Case(17, 64, "bf16", bias="none"),
    Case(17, 128, "fp16"),
    Case(100, 16, "fp32"),
    Case(100, 32, "bf16"),
    Case(100, 64, "fp16", mask="none"),
    Case(300, 32, "fp16", n=1),
    Case(300, 128, "fp32", n=1, h=1),
    Case(384, 32, "fp32", n=1),
    Case(384, 64, "bf16", n=1),
    Case(384, 128, "bf16", n=1, h=1),
]

GRAD_CASES = [
    Case(1, 16, "fp32"),
    Case(17, 8, "fp32"),
    Case(17, 32, "bf16"),
    Case(17, 128, "fp16", n=1),
    Case(100, 16, "fp16"),
    Case(100, 64, "fp32", mask="none"),
    Case(300, 32, "bf16", n=1, h=1),
    Case(384, 128, "fp32", n=1, h=1),
]

VARIANTS = ("msa_row", "msa_column", "triangle_start", "triangle_end")


def variant_inputs(variant, dtype, seed=0):
  """Inputs of one of the four Evoformer attentions, built the way the modules build them.

  An MSA of 6 sequences x 20 residues, a pair representation of 20 x 20, 2 heads of dim 16.
  """
  rng = np.random.default_rng([seed, VARIANTS.index(variant)])
  b, n_seq, n_res, h, d = 1, 6, 20, 2, 16
  cast = lambda x: jnp.asarray(x.astype(np.float32), dtype)  # noqa: E731
  if variant.startswith("msa"):
    q, k, v = (rng.standard_normal((b, n_seq, n_res, h, d)) for _ in range(3))
    mask = rng.random((b, n_seq, n_res)) < 0.85
  else:
    q, k, v = (rng.standard_normal((b, n_res, n_res, h, d)) for _ in range(3))
    mask = rng.random((b, n_res, n_res)) < 0.85
  bias = rng.standard_normal((b, 1, h, n_res, n_res))
  if variant in ("msa_column", "triangle_end"):
    # Column attention attends over sequences, the ending node over the first residue index:
    # both are the row computation on the transposed tensor.
    q, k, v = (np.swapaxes(x, 1, 2) for x in (q, k, v))
    mask = np.swapaxes(mask, 1, 2)
  if variant == "msa_column":
    bias = None
  return dict(q=cast(q), k=cast(k), v=cast(v), mask=jnp.asarray(mask[:, :, None, None, :]),
              bias=None if bias is None else cast(bias))


def _reference(inputs, d_out=None, scale=None):
  args = [to_f64(inputs[name]) for name in ("q", "k", "v")]
  mask = None if inputs["mask"] is None else np.asarray(inputs["mask"])
  bias = to_f64(inputs["bias"])
  if d_out is None:
    return reference.attention(*args, mask=mask, bias=bias, scale=scale)
  return reference.attention_vjp(*args, to_f64(d_out), mask=mask, bias=bias, scale=scale)


def _logit_magnitude(inputs):
  """About the largest |logit|: the bias plus a few units for q.k (inputs are standard normal)."""
  bias = inputs["bias"]
  return 8.0 + (0.0 if bias is None else float(np.max(np.abs(to_f64(bias)))))


class AttentionBackendSuite:
  """Subclass with `implementation` set; override the capability flags where needed."""

  implementation: str = ""
  baseline: str | None = "xla"
  dtypes: tuple[str, ...] = ("bf16", "fp16", "fp32")
  head_dims: tuple[int, ...] = (8, 16, 32, 64, 128)
  factor = 2.0
  ulps = {"bf16": 2.0, "fp16": 2.0, "fp32": 64.0}
  # Gradients sum over S (and the bias gradient over N as well): a few more units of slack.
  grad_ulps = {"bf16": 4.0, "fp16": 4.0, "fp32": 256.0}

  # -- helpers ------------------------------------------------------------------------------

  def require(self, dtype, d=None):
    if dtype not in self.dtypes:
      pytest.skip(f"{self.implementation} does not run {dtype}")
    if d is not None and d not in self.head_dims:
      pytest.skip(f"{self.implementation} does not run head dim {d}")

  def attention(self, q, k, v, implementation=None, **kwargs):
    return jevo.evoformer_attention(q, k, v, implementation=implementation or self.implementation,
                                    **kwargs)

  def run_forward(self, inputs, implementation=None):
    # One jit per call: a single compilation instead of many eager ones, and no cache shared
    # between tests (a test may change a backend's module-level settings).
    f = jax.jit(lambda q, k, v, mask, bias: self.attention(q, k, v, mask=mask, bias=bias,
                                                           implementation=implementation))
    return f(**inputs)

  def outputs_and_grads(self, inputs, d_out, implementation=None, scale=None):
    """out and (dq, dk, dv, dbias) of sum(d_out * out), under jit."""

    @jax.jit
    def run(q, k, v, mask, bias, d_out):
      f = lambda q, k, v, bias: self.attention(  # noqa: E731
          q, k, v, mask=mask, bias=bias, implementation=implementation, scale=scale)
      out, vjp = jax.vjp(f, q, k, v, bias)
      return out, vjp(d_out)

    return run(**inputs, d_out=d_out)

  def check_forward(self, inputs, dtype):
    expected = _reference(inputs)
    out = self.run_forward(inputs)
    assert out.shape == inputs["q"].shape and out.dtype == inputs["q"].dtype
    baseline_error = None
    if self.baseline is not None:
      baseline_error = max_error(self.run_forward(inputs, self.baseline), expected)
    assert_accurate(out, expected, dtype, baseline_error=baseline_error, factor=self.factor,
                    ulps=self.ulps[dtype], logit_magnitude=_logit_magnitude(inputs))
    return out

  def check_forward_and_gradients(self, inputs, d_out, dtype, scale=None, logit_magnitude=None):
    """Checks the output and (dq, dk, dv, dbias) of sum(d_out * out); returns them."""
    expected = _reference(inputs, d_out, scale)
    out, grads = self.outputs_and_grads(inputs, d_out, scale=scale)
    baseline_out, baseline_grads = None, (None,) * 4
    if self.baseline is not None:
      baseline_out, baseline_grads = self.outputs_and_grads(inputs, d_out, self.baseline, scale)
    expected_out = _reference(inputs, scale=scale)
    if logit_magnitude is None:
      logit_magnitude = _logit_magnitude(inputs)
    assert_accurate(out, expected_out, dtype,
                    baseline_error=None if baseline_out is None else max_error(baseline_out,
                                                                                expected_out),
                    factor=self.factor, ulps=self.ulps[dtype], logit_magnitude=logit_magnitude)
    # One scale for all four: a gradient can be exactly 0 (dq and dk when S = 1).
    magnitude = max(float(np.max(np.abs(g))) for g in expected if g is not None)
    for name, got, want, base in zip(("dq", "dk", "dv", "dbias"), grads, expected,
                                     baseline_grads):
      if want is None:
        assert got is None, name
        continue
      assert got.dtype == inputs["q"].dtype, (name, got.dtype)
      base_err = None if base is None else max_error(base, want)
      assert_accurate(got, want, dtype, baseline_error=base_err, factor=self.factor,
                      ulps=self.grad_ulps[dtype], magnitude=magnitude,
                      logit_magnitude=logit_magnitude, what=name)
    return out, grads

  # -- accuracy -----------------------------------------------------------------------------

  @pytest.mark.parametrize("case", FORWARD_CASES, ids=str)
  def test_forward_matches_reference(self, case):
    self.require(case.dtype, case.d)
    self.check_forward(make_inputs(case), case.dtype)

  @pytest.mark.parametrize("case", GRAD_CASES, ids=str)
  def test_gradients_match_reference(self, case):
    self.require(case.dtype, case.d)
    self.check_forward_and_gradients(make_inputs(case), random_cotangent(case), case.dtype)

  @pytest.mark.parametrize("dtype", ["bf16", "fp32"])
  @pytest.mark.parametrize("variant", VARIANTS)
  def test_evoformer_variants(self, variant, dtype):
    self.require(dtype, 16)
    inputs = variant_inputs(variant, jnp.dtype({"bf16": jnp.bfloat16, "fp32": jnp.float32}[dtype]))
    self.check_forward(inputs, dtype)

  @pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
  def test_large_bias(self, dtype):
    case = Case(100, 32, dtype, bias="large")
    self.require(dtype, case.d)
    self.check_forward_and_gradients(make_inputs(case), random_cotangent(case), dtype)

  @pytest.mark.parametrize("bias", ["none", "normal"])
  @pytest.mark.parametrize("scale", [-0.7, 0.0, 1.5])
  def test_any_finite_scale(self, scale, bias):
    """A negative, zero or large logit scale, with and without a bias (kernels may fold a
    positive scale into their exponentials and must hand the others to a path that does not)."""
    case = Case(136, 32, "bf16", bias=bias)
    self.require(case.dtype, case.d)
    inputs = make_inputs(case)
    q, k = to_f64(inputs["q"]), to_f64(inputs["k"])
    logits = scale * np.einsum("...nihd,...njhd->...nhij", q, k)
    magnitude = float(np.max(np.abs(logits))) + _logit_magnitude(inputs)
    self.check_forward_and_gradients(inputs, random_cotangent(case), case.dtype, scale=scale,
                                     logit_magnitude=magnitude)

  @pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
  def test_fully_masked_rows_give_zero_output_and_gradient(self, dtype):
    case = Case(17, 16, dtype, batch=(2,), mask="empty_rows")
    self.require(dtype, case.d)
    inputs = make_inputs(case)
    d_out = random_cotangent(case)
    empty = ~np.asarray(inputs["mask"]).any(axis=(-3, -2, -1))  # [*B, N]
    assert empty.any() and not empty.all()
    out, (dq, dk, dv, dbias) = self.check_forward_and_gradients(inputs, d_out, dtype)
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv), ("dbias", dbias)):
      assert np.all(np.isfinite(to_f64(x))), f"{name} has non-finite values"
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
      assert np.all(to_f64(x)[empty] == 0), f"{name} is not exactly 0 on fully masked rows"

  @pytest.mark.parametrize("batch", [(), (3,), (2, 2)], ids=lambda b: f"batch{len(b)}")
  def test_leading_batch_dims(self, batch):
    dtype = self.dtypes[0]
    case = Case(24, 16, dtype, batch=batch, n=3)
    self.require(dtype, case.d)
    self.check_forward_and_gradients(make_inputs(case), random_cotangent(case), dtype)

  def test_mask_and_bias_broadcast_over_batch(self):
    dtype = self.dtypes[0]
    case = Case(24, 16, dtype, batch=(2, 3), n=4)
    self.require(dtype, case.d)
    inputs = make_inputs(case)
    rng = np.random.default_rng(7)
    # A mask shared by the first batch dim and a bias shared by all of them.
    inputs["mask"] = jnp.asarray(rng.random((3, 4, 1, 1, 24)) < 0.7)
    inputs["bias"] = jnp.asarray(rng.standard_normal((1, 2, 24, 24)).astype(np.float32),
                                 inputs["q"].dtype)
    _, grads = self.check_forward_and_gradients(inputs, random_cotangent(case), dtype)
    assert grads[3].shape == (1, 2, 24, 24)

  # -- transformations ----------------------------------------------------------------------

  def _small(self):
    dtype = self.dtypes[-1]
    case = Case(33, 16, dtype, batch=(3,))
    self.require(dtype, case.d)
    return case, make_inputs(case)

  def _close(self, a, b, dtype):
    tol = 8 * {"bf16": 2.0**-7, "fp16": 2.0**-10, "fp32": 2.0**-20}[dtype]
    np.testing.assert_allclose(to_f64(a), to_f64(b), rtol=tol, atol=tol)

  def test_jit(self):
    case, inputs = self._small()
    eager = self.attention(**inputs)
    jitted = jax.jit(lambda q, k, v, mask, bias: self.attention(q, k, v, mask=mask, bias=bias))
    self._close(jitted(**inputs), eager, case.dtype)

  def test_vmap_matches_batch_dim(self):
    case, inputs = self._small()
    batched = self.attention(**inputs)
    f = lambda q, k, v, mask, bias: self.attention(q, k, v, mask=mask, bias=bias)  # noqa: E731
    mapped = jax.jit(jax.vmap(f))(inputs["q"], inputs["k"], inputs["v"], inputs["mask"],
                                  inputs["bias"])
    self._close(mapped, batched, case.dtype)

  def test_vmap_over_inner_axis_with_unmapped_bias(self):
    # vmap over N (axis 1) with a bias shared by everything: each call sees the batch axis as
    # its N, and the bias without batch dims.
    case, inputs = self._small()
    bias = inputs["bias"][:1]
    direct = self.attention(inputs["q"], inputs["k"], inputs["v"], mask=inputs["mask"], bias=bias)
    f = lambda q, k, v, mask: self.attention(q, k, v, mask=mask, bias=bias[0])  # noqa: E731
    mapped = jax.jit(jax.vmap(f, in_axes=1, out_axes=1))(inputs["q"], inputs["k"], inputs["v"],
                                                          inputs["mask"])
    self._close(mapped, direct, case.dtype)

  def test_grad_under_vmap_and_checkpoint(self):
    case, inputs = self._small()
    d_out = random_cotangent(case)

    def loss(q, k, v, bias, mask):
      out = self.attention(q, k, v, mask=mask, bias=bias)
      return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32))

    args = (inputs["q"], inputs["k"], inputs["v"], inputs["bias"], inputs["mask"])
    plain = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
    remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2, 3)))(*args)
    for a, b in zip(remat, plain):
      self._close(a, b, case.dtype)
    # Per-example gradients under vmap: the op sees no batch dims, the bias is per example.
    per_example = lambda q, k, v, bias, mask, g: jax.grad(  # noqa: E731
        lambda *a: jnp.sum(self.attention(*a[:3], mask=mask, bias=a[3]).astype(jnp.float32)
                           * g.astype(jnp.float32)), argnums=(0, 1, 2, 3))(q, k, v, bias)
    mapped = jax.jit(jax.vmap(per_example))(*args, d_out)
    for a, b in zip(mapped, plain):
      self._close(a, b, case.dtype)
