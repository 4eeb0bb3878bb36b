"""The pure-JAX backends: the shared suite, plus what is specific to them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jevo
from backend_suite import AttentionBackendSuite
from cases import Case, make_inputs, random_cotangent, to_f64
from jevo.ops import xla_chunked


class TestXla(AttentionBackendSuite):
  implementation = "xla"
  baseline = None  # It is the baseline: held to the float64 reference alone.


class TestXlaChunked(AttentionBackendSuite):
  implementation = "xla_chunked"

  @pytest.fixture(autouse=True)
  def _small_chunks(self, monkeypatch):
    # Small chunks so that every case runs several chunks, most with a padded last one.
    monkeypatch.setattr(xla_chunked, "QUERY_CHUNK_SIZE", 16)


@pytest.mark.parametrize("implementation", ["xla", "xla_chunked"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "mask"])
def test_check_grads(implementation, with_mask, monkeypatch):
  """Finite differences agree with the gradients for q, k, v and bias (fp32, small)."""
  monkeypatch.setattr(xla_chunked, "QUERY_CHUNK_SIZE", 4)
  case = Case(9, 8, "fp32", batch=(2,), n=2, h=2, mask="random" if with_mask else "none")
  inputs = make_inputs(case)

  def f(q, k, v, bias):
    return jevo.evoformer_attention(q, k, v, mask=inputs["mask"], bias=bias,
                                    implementation=implementation)

  check_grads(f, (inputs["q"], inputs["k"], inputs["v"], inputs["bias"]), order=1,
              modes=("rev",), eps=1e-3, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("chunk", [1, 7, 16, 100])
def test_chunked_equals_xla(chunk):
  """Outputs and all gradients agree with the unchunked backend for any chunk size."""
  case = Case(45, 16, "fp32", batch=(2,), n=3, h=2, mask="empty_rows")
  inputs = make_inputs(case)
  d_out = random_cotangent(case)

  def run(implementation, **kwargs):
    def f(q, k, v, bias):
      if implementation == "xla":
        return jevo.evoformer_attention(q, k, v, mask=inputs["mask"], bias=bias,
                                        implementation="xla")
      b = int(np.prod(q.shape[:-4]))
      canon = [x.reshape((b,) + x.shape[-4:]) for x in (q, k, v)]
      mask = jnp.broadcast_to(inputs["mask"], q.shape[:-4] + (3, 1, 1, 45)).reshape(b, 3, 45)
      out = xla_chunked.attention(*canon, mask, bias.reshape(b, 2, 45, 45), scale=16**-0.5,
                                  deterministic=False, **kwargs)
      return out.reshape(q.shape)
    @jax.jit
    def run_jitted(q, k, v, bias, d_out):
      out, vjp = jax.vjp(f, q, k, v, bias)
      return (out,) + vjp(d_out)

    return run_jitted(inputs["q"], inputs["k"], inputs["v"], inputs["bias"], d_out)

  for got, want in zip(run("xla_chunked", query_chunk_size=chunk), run("xla")):
    np.testing.assert_allclose(to_f64(got), to_f64(want), rtol=2e-5, atol=2e-6)


def _output_sizes(jaxpr):
  """Element counts of every value a jaxpr computes, including inside loops and calls."""
  for eqn in jaxpr.eqns:
    yield from (int(np.prod(var.aval.shape)) for var in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
        if hasattr(sub, "eqns"):
          yield from _output_sizes(sub)


def test_chunked_never_materialises_full_logits():
  """No value in the forward or backward computation has N * H * S * S elements or more."""
  b, n, s, h, d = 1, 8, 64, 2, 8
  inputs = make_inputs(Case(s, d, "fp32", batch=(b,), n=n, h=h))

  def loss(q, k, v, bias):
    out = xla_chunked.attention(q, k, v, None, bias.reshape(b, h, s, s), scale=0.3,
                                deterministic=False, query_chunk_size=16)
    return jnp.sum(out * out)

  args = (inputs["q"], inputs["k"], inputs["v"], inputs["bias"])
  sizes = list(_output_sizes(jax.make_jaxpr(jax.value_and_grad(loss, (0, 1, 2, 3)))(*args).jaxpr))
  assert max(sizes) < n * h * s * s, max(sizes)
  assert n * h * 16 * s in sizes  # the chunk-sized logits block


@pytest.mark.parametrize("dims, requested, expected", [
    ((1, 4, 2, 100), 16, 15),    # 7 chunks of 15 cover 100 with 5 rows of padding
    ((1, 4, 2, 384), 16, 16),
    ((1, 4, 2, 10), 64, 10),     # never more than S
    ((1, 4, 2, 1), None, 1),
    ((1, 512, 8, 384), None, 16),  # AlphaFold MSA rows: the automatic choice bounds memory
    ((1, 2, 2, 256), None, 256),   # small problems run in one chunk
])
def test_choose_query_chunk(dims, requested, expected):
  assert xla_chunked.choose_query_chunk(*dims, requested) == expected


def test_choose_query_chunk_rejects_bad_sizes():
  with pytest.raises(ValueError, match="query chunk size must be a positive int"):
    xla_chunked.choose_query_chunk(1, 1, 1, 8, 0)
