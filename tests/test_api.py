"""The public `evoformer_attention`: validation, backend selection, scale, dtypes, edge shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jevo
import reference
from cases import Case, make_inputs, to_f64
from jevo.ops import resolve_implementation

B, N, S, H, D = 2, 3, 10, 4, 8


def _qkv(dtype=jnp.float32, shape=(B, N, S, H, D)):
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for _ in range(3)]


def _call(**overrides):
  q, k, v = _qkv()
  args = dict(q=q, k=k, v=v)
  args.update(overrides)
  return jevo.evoformer_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_exports():
  assert callable(jevo.evoformer_attention) and callable(jevo.DS4Sci_EvoformerAttention)
  assert isinstance(jevo.__version__, str) and jevo.__version__
  assert isinstance(jevo.cuda_status().reason, str)


# Each bad input, the exception it raises and text that must appear: the argument's name and
# what was expected or found.
BAD_INPUTS = {
    "q_rank": (dict(q=jnp.ones((S, H, D))), ValueError, r"q must be \[\*B, N, S, H, D\].*rank 3"),
    "q_none": (dict(q=None), TypeError, r"q is required"),
    "q_not_array": (dict(q="queries"), TypeError, r"q must be an array, got str"),
    "k_rank": (dict(k=jnp.ones((1, B, N, S, H, D))), ValueError,
               r"k must have the same shape as q.*rank 6"),
    "k_seq": (dict(k=jnp.ones((B, N, S + 1, H, D))), ValueError,
              r"k .*sequence length S differs \(q: 10, k: 11\)"),
    "v_heads": (dict(v=jnp.ones((B, N, S, H + 1, D))), ValueError,
                r"v .*number of heads H differs \(q: 4, v: 5\)"),
    "k_head_dim": (dict(k=jnp.ones((B, N, S, H, 2 * D))), ValueError,
                   r"k .*head dim D differs \(q: 8, k: 16\)"),
    "v_rows": (dict(v=jnp.ones((B, N + 1, S, H, D))), ValueError, r"v .*N axis differs"),
    "k_batch": (dict(k=jnp.ones((B + 1, N, S, H, D))), ValueError, r"k .*batch dims \*B differ"),
    "q_int": (dict(q=jnp.ones((B, N, S, H, D), jnp.int32)), TypeError,
              r"q has dtype int32; supported: bfloat16, float16, float32"),
    "v_complex": (dict(v=jnp.ones((B, N, S, H, D), jnp.complex64)), TypeError,
                  r"v has dtype complex64"),
    "mixed_dtypes": (dict(k=jnp.ones((B, N, S, H, D), jnp.bfloat16)), TypeError,
                     r"q, k and v must have one dtype, got q float32, k bfloat16, v float32"),
    "mask_float": (dict(mask=jnp.ones((B, N, 1, 1, S))), TypeError,
                   r"mask must be boolean .*got dtype float32"),
    "mask_shape": (dict(mask=jnp.ones((B, N, 1, 1, S + 1), bool)), ValueError,
                   r"mask must be broadcastable to \[\*B, N, 1, 1, S\] = \(2, 3, 1, 1, 10\), "
                   r"got shape \(2, 3, 1, 1, 11\)"),
    "mask_per_query": (dict(mask=jnp.ones((B, N, 1, S, S), bool)), ValueError,
                       r"mask must be broadcastable"),
    "bias_int": (dict(bias=jnp.ones((B, 1, H, S, S), jnp.int32)), TypeError,
                 r"bias must be floating point, got dtype int32"),
    "bias_per_row": (dict(bias=jnp.ones((B, N, H, S, S))), ValueError,
                     r"bias must be broadcastable to \[\*B, 1, H, S, S\] = \(2, 1, 4, 10, 10\) "
                     r"\(shared over N\), got shape \(2, 3, 4, 10, 10\)"),
    "bias_heads": (dict(bias=jnp.ones((B, 1, H + 1, S, S))), ValueError,
                   r"bias must be broadcastable"),
    "scale_array": (dict(scale=jnp.ones(3)), TypeError, r"scale must be a static"),
    "scale_inf": (dict(scale=float("inf")), ValueError, r"scale must be finite, got inf"),
    "scale_bool": (dict(scale=True), TypeError, r"scale must be a number, got True"),
    "implementation_unknown": (dict(implementation="flash"), ValueError,
                               r"implementation must be None or one of 'cuda', 'xla_chunked', "
                               r"'xla', 'cuda_sm80', 'cuda_sm90', got 'flash'"),
    "implementation_not_str": (dict(implementation=1), ValueError,
                               r"implementation must be None or one of .* got 1"),
    "deterministic_str": (dict(deterministic="yes"), TypeError,
                          r"deterministic must be a bool, got 'yes'"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(name):
  overrides, error, pattern = BAD_INPUTS[name]
  with pytest.raises(error, match=r"evoformer_attention: " + pattern):
    _call(**overrides)


def test_traced_scale_is_rejected_under_jit():
  q, k, v = _qkv()
  with pytest.raises(TypeError, match=r"scale must be a static"):
    jax.jit(lambda s: jevo.evoformer_attention(q, k, v, scale=s))(0.5)


def test_explicit_cuda_without_kernels_raises():
  status = jevo.cuda_status()
  if status.available:
    pytest.skip("the CUDA kernels are available here")
  q, k, v = _qkv(jnp.bfloat16)
  with pytest.raises(ValueError, match=r"implementation='cuda' cannot run these inputs: ") as err:
    jevo.evoformer_attention(q, k, v, implementation="cuda")
  assert status.reason in str(err.value)


def test_automatic_choice():
  q, k, v = _qkv(jnp.bfloat16)
  expected = "cuda" if jevo.cuda_status().available else "xla_chunked"
  assert resolve_implementation(q, k, v) == expected
  # float32 never runs on the CUDA kernels.
  assert resolve_implementation(*_qkv(jnp.float32)) == "xla_chunked"
  assert resolve_implementation(q, k, v, implementation="xla") == "xla"


@pytest.mark.parametrize("scale", [None, 0.3])
def test_scale(scale):
  case = Case(12, 8, "fp32", batch=(), n=2)
  inputs = make_inputs(case)
  out = jevo.evoformer_attention(**inputs, scale=scale)
  args = [to_f64(inputs[x]) for x in ("q", "k", "v")]
  want = reference.attention(*args, mask=np.asarray(inputs["mask"]), bias=to_f64(inputs["bias"]),
                             scale=scale)
  np.testing.assert_allclose(to_f64(out), want, rtol=1e-5, atol=1e-5)
  if scale is None:  # the default is D ** -0.5
    explicit = jevo.evoformer_attention(**inputs, scale=8**-0.5)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(explicit))


@pytest.mark.parametrize("implementation", ["xla", "xla_chunked"])
def test_bias_is_cast_to_q_dtype_and_gradient_keeps_its_dtype(implementation):
  case = Case(16, 8, "bf16", n=2)
  inputs = make_inputs(case)
  bias32 = jnp.asarray(np.random.default_rng(3).standard_normal((1, 1, 2, 16, 16)), jnp.float32)

  def f(bias):
    out = jevo.evoformer_attention(inputs["q"], inputs["k"], inputs["v"], mask=inputs["mask"],
                                   bias=bias, implementation=implementation)
    return out, jnp.sum(out.astype(jnp.float32))

  out, _ = f(bias32)
  assert out.dtype == jnp.bfloat16
  # Same result as rounding the bias to bfloat16 first.
  rounded, _ = f(bias32.astype(jnp.bfloat16))
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(rounded, np.float32))
  grad = jax.grad(lambda b: f(b)[1])(bias32)
  assert grad.dtype == jnp.float32 and grad.shape == bias32.shape
  assert np.all(np.isfinite(np.asarray(grad))) and np.any(np.asarray(grad) != 0)


def test_mask_none_equals_all_true_mask():
  q, k, v = _qkv()
  everything = jnp.ones((B, N, 1, 1, S), bool)
  np.testing.assert_allclose(np.asarray(jevo.evoformer_attention(q, k, v)),
                             np.asarray(jevo.evoformer_attention(q, k, v, mask=everything)),
                             rtol=1e-6, atol=1e-6)


def test_numpy_inputs_are_accepted():
  q, k, v = (np.asarray(x) for x in _qkv())
  out = jevo.evoformer_attention(q, k, v, mask=np.ones((N, 1, 1, S), bool))
  assert out.shape == q.shape and out.dtype == jnp.float32


@pytest.mark.parametrize("shape", [(B, 0, S, H, D), (0, N, S, H, D), (B, N, 0, H, D)],
                         ids=["no_rows", "no_batch", "no_keys"])
@pytest.mark.parametrize("implementation", [None, "xla"])
def test_empty_inputs_give_empty_or_zero_outputs(shape, implementation):
  q, k, v = _qkv(shape=shape)
  bias = jnp.ones(shape[:1] + (1, H, shape[2], shape[2]))

  def loss(q, bias):
    out = jevo.evoformer_attention(q, k, v, bias=bias, implementation=implementation)
    return jnp.sum(out), out

  (_, out), (dq, dbias) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(q, bias)
  assert out.shape == shape and dq.shape == shape and dbias.shape == bias.shape
  assert not np.any(np.asarray(dbias))


def test_cuda_is_not_chosen_for_computation_placed_off_the_gpu(monkeypatch):
  """With the kernels available, inputs on the CPU (or a CPU default device) still go to a
  backend that runs there, and an explicit "cuda" says why it cannot."""
  from jevo._cuda_lib import CudaStatus
  from jevo.ops import cuda_backend
  monkeypatch.setattr(cuda_backend, "cuda_status",
                      lambda: CudaStatus(available=True, reason="pretend"))
  cpu = jax.devices("cpu")[0]
  q, k, v = (jax.device_put(x, cpu) for x in _qkv(jnp.bfloat16))
  assert resolve_implementation(q, k, v) == "xla_chunked"
  with pytest.raises(ValueError, match="inputs live on cpu"):
    jevo.evoformer_attention(q, k, v, implementation="cuda")
  with jax.default_device(cpu):
    traced = jax.jit(lambda q, k, v: jnp.asarray(resolve_implementation(q, k, v) == "xla_chunked"))
    assert bool(traced(q, k, v))
