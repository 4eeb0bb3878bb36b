"""The CUDA kernels: the shared backend suite, plus determinism, odd sizes, the bias-gradient
reduction over many N, 64-bit offsets and errors from the FFI handlers. Needs a CUDA GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jevo
from backend_suite import AttentionBackendSuite
from cases import Case, assert_accurate, make_inputs, max_error, random_cotangent, to_f64
import reference

pytestmark = pytest.mark.gpu


class TestCuda(AttentionBackendSuite):
  implementation = "cuda"
  dtypes = ("bf16", "fp16")


def _family_unusable(name):
  """Why the kernel family `name` cannot run here, or None."""
  from jevo.ops import cuda_backend
  return cuda_backend.family_unsupported_reason(name)


class TestCudaSm80(AttentionBackendSuite):
  """The mma.sync family, which every GPU from sm_80 on runs (on an H200 too, when asked)."""
  implementation = "cuda_sm80"
  dtypes = ("bf16", "fp16")


@pytest.mark.skipif(_family_unusable("sm90") is not None,
                    reason=f"sm90 kernels: {_family_unusable('sm90')}")
class TestCudaSm90(AttentionBackendSuite):
  """The wgmma family (H100/H200), forward and backward."""
  implementation = "cuda_sm90"
  dtypes = ("bf16", "fp16")


@pytest.mark.skipif(_family_unusable("sm90") is not None,
                    reason=f"sm90 kernels: {_family_unusable('sm90')}")
def test_device_picks_sm90_on_hopper():
  """By default the handler runs the newest family the device runs: on sm_90, the sm90 kernels,
  whose outputs differ from sm80's in the last bits (another summation order)."""
  case = Case(200, 32, "bf16", n=4, h=2, bias="normal")
  inputs = make_inputs(case)
  run = lambda impl: np.asarray(jevo.evoformer_attention(
      inputs["q"], inputs["k"], inputs["v"], mask=inputs["mask"], bias=inputs["bias"],
      implementation=impl).astype(jnp.float32))
  auto, sm90, sm80 = run("cuda"), run("cuda_sm90"), run("cuda_sm80")
  np.testing.assert_array_equal(auto, sm90)
  np.testing.assert_allclose(sm90, sm80, atol=2e-2)


def _grads(inputs, d_out, implementation="cuda", deterministic=False):
  mask = inputs["mask"]

  def f(q, k, v, bias):
    out = jevo.evoformer_attention(q, k, v, mask=mask, bias=bias, implementation=implementation,
                                   deterministic=deterministic)
    return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32))

  return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(inputs["q"], inputs["k"], inputs["v"],
                                                   inputs["bias"])


@pytest.mark.parametrize("implementation", ["cuda_sm80", "cuda_sm90"])
@pytest.mark.parametrize("s,d,n", [(1, 8, 3), (65, 24, 5), (129, 40, 2), (385, 128, 2),
                                   (64, 16, 300), (200, 32, 257)])
def test_odd_sizes_and_many_rows(s, d, n, implementation):
  """Sizes off the 64-row tiles, odd head dims (padded inside the kernel), and N large enough
  that the bias gradient is reduced over several chunks."""
  if implementation == "cuda_sm90" and _family_unusable("sm90"):
    pytest.skip(f"sm90 kernels: {_family_unusable('sm90')}")
  case = Case(s, d, "bf16", n=n, h=3, mask="empty_rows")
  inputs = make_inputs(case)
  d_out = random_cotangent(case)
  args = [to_f64(inputs[x]) for x in ("q", "k", "v")]
  mask, bias = np.asarray(inputs["mask"]), to_f64(inputs["bias"])
  want = reference.attention_vjp(*args, to_f64(d_out), mask=mask, bias=bias)
  got = _grads(inputs, d_out, implementation=implementation)
  base = _grads(inputs, d_out, implementation="xla")
  for name, g, b, w in zip(("dq", "dk", "dv", "dbias"), got, base, want):
    assert_accurate(g, w, "bf16", baseline_error=max_error(b, w), factor=2.0, ulps=4.0, what=name)


def test_deterministic_gradients_are_bitwise_reproducible():
  case = Case(300, 32, "bf16", n=64, h=4, bias="normal")
  inputs = make_inputs(case)
  d_out = random_cotangent(case)
  first = _grads(inputs, d_out, deterministic=True)
  for _ in range(3):
    again = _grads(inputs, d_out, deterministic=True)
    for a, b in zip(first, again):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_default_backend_on_gpu_is_cuda_for_bf16(monkeypatch):
  from jevo.ops import cuda_backend
  calls = []
  original = cuda_backend.attention
  monkeypatch.setattr(cuda_backend, "attention", lambda *a, **k: calls.append(1) or original(*a, **k))
  case = Case(33, 32, "bf16")
  inputs = make_inputs(case)
  jevo.evoformer_attention(inputs["q"], inputs["k"], inputs["v"], mask=inputs["mask"],
                           bias=inputs["bias"])
  assert calls, "implementation=None did not pick the CUDA kernels for bf16 on a GPU"


def test_handler_errors_are_exceptions_and_the_process_goes_on():
  call = jax.ffi.ffi_call("jevo_selftest", jax.ShapeDtypeStruct((4,), jnp.float32))
  with pytest.raises(Exception, match="x and y must have the same size"):
    jax.block_until_ready(call(jnp.ones(4), jnp.ones(5), alpha=np.float32(1.0)))
  q = jax.random.normal(jax.random.key(0), (1, 2, 16, 2, 32), jnp.bfloat16)
  out = jevo.evoformer_attention(q, q, q, implementation="cuda")
  assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


_BAD_DIRECT_CALLS = """
import jax, jax.numpy as jnp, numpy as np
import jevo
from jevo._cuda_lib import FORWARD_TARGET

bf = jnp.bfloat16
q = jnp.ones((1, 2, 16, 2, 32), bf)
none, no_bias = jnp.zeros((0,), jnp.bool_), jnp.zeros((0,), bf)
for q_in, k_in, lse_shape in [(q[0], q[0], (1, 2, 2, 16)),                     # rank 4
                              (q, jnp.ones((1, 2, 24, 2, 32), bf), (1, 2, 2, 16)),  # k's S
                              (q, q, (1, 2, 2, 17))]:                              # lse's shape
  call = jax.ffi.ffi_call(FORWARD_TARGET, (jax.ShapeDtypeStruct(q_in.shape, bf),
                                           jax.ShapeDtypeStruct(lse_shape, jnp.float32)))
  try:
    jax.block_until_ready(call(q_in, k_in, k_in, none, no_bias, scale=np.float32(0.1), family=np.int64(0)))
    print("no error")
  except Exception as e:
    print("raised:", e)
lse = jax.ShapeDtypeStruct((1, 2, 2, 16), jnp.float32)
for residual in [jax.ShapeDtypeStruct(q.shape, jnp.float32),           # residual's dtype
                 jax.ShapeDtypeStruct((1, 2, 16, 2, 24), bf)]:          # residual's shape
  call = jax.ffi.ffi_call(FORWARD_TARGET, (jax.ShapeDtypeStruct(q.shape, bf), lse, residual))
  try:
    jax.block_until_ready(call(q, q, q, none, no_bias, scale=np.float32(0.1), family=np.int64(0)))
    print("no error")
  except Exception as e:
    print("raised:", e)
call = jax.ffi.ffi_call(FORWARD_TARGET, (jax.ShapeDtypeStruct(q.shape, bf), lse))
try:
  jax.block_until_ready(call(q, q, q, none, no_bias, scale=np.float32(0.1), family=np.int64(70)))
  print("no error")
except Exception as e:
  print("raised:", e)
out = jevo.evoformer_attention(q, q, q, implementation="cuda")
print("finite after:", bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))))
"""


def test_direct_kernel_calls_with_bad_shapes_raise_and_the_process_goes_on():
  """The handlers' own shape checks, reached by calling the FFI target without the Python API's
  checks. In a child process, so that a crash fails this test instead of ending the run."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(jevo.__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
  run = subprocess.run([sys.executable, "-c", _BAD_DIRECT_CALLS], capture_output=True, text=True,
                       env=env, timeout=600)
  assert run.returncode == 0, f"exit code {run.returncode}; stderr tail:\n{run.stderr[-3000:]}"
  assert "q must have rank 5, got shape [2, 16, 2, 32]" in run.stdout
  assert "k must have q's shape [1, 2, 16, 2, 32], got [1, 2, 24, 2, 32]" in run.stdout
  assert "lse must have shape [1, 2, 2, 16], got [1, 2, 2, 17]" in run.stdout
  assert "o_residual must be bfloat16" in run.stdout
  assert "o_residual must have q's shape [1, 2, 16, 2, 32], got [1, 2, 16, 2, 24]" in run.stdout
  assert "family must be 0 (by device), 80 or 90, got 70" in run.stdout
  assert "no error" not in run.stdout
  assert "finite after: True" in run.stdout


def test_tensors_over_two_to_the_31_elements():
  """64-bit offsets: q of 2^31 + 2^24 elements; the last rows checked against the reference."""
  n, s, h, d = 16448, 512, 8, 32  # n * s * h * d = 2^31 + 2^24
  key = jax.random.key(3)
  kq, kk, kv, kb = jax.random.split(key, 4)
  shape = (1, n, s, h, d)
  q, k, v = (jax.random.normal(x, shape, jnp.bfloat16) for x in (kq, kk, kv))
  bias = jax.random.normal(kb, (1, 1, h, s, s), jnp.bfloat16)
  out = jevo.evoformer_attention(q, k, v, bias=bias, implementation="cuda")
  tail = slice(n - 2, n)
  want = reference.attention(*(to_f64(x[:, tail]) for x in (q, k, v)), bias=to_f64(bias))
  got = np.asarray(out[:, tail].astype(jnp.float32))
  np.testing.assert_allclose(got, want, atol=3e-2, rtol=3e-2)
