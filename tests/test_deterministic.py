"""`deterministic=True`: the same inputs give the same output and gradients, bit for bit, on
every run; every backend meets it, so it never changes the computation."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jevo
from cases import Case, make_inputs, random_cotangent


@pytest.mark.parametrize("implementation", ["xla", "xla_chunked"])
def test_repeated_runs_are_bitwise_identical(implementation):
  case = Case(40, 16, "fp32", batch=(2,), n=3, h=2, mask="empty_rows")
  inputs = make_inputs(case)
  d_out = random_cotangent(case)

  def run(deterministic):
    def f(q, k, v, bias):
      return jevo.evoformer_attention(q, k, v, mask=inputs["mask"], bias=bias,
                                      implementation=implementation,
                                      deterministic=deterministic)

    # A fresh compilation each time: reproducible across programs, not only across calls.
    out, pull = jax.vjp(jax.jit(f), inputs["q"], inputs["k"], inputs["v"], inputs["bias"])
    return [np.asarray(x) for x in (out, *pull(d_out))]

  first = run(True)
  for again in (run(True), run(True), run(False)):
    for a, b in zip(first, again):
      np.testing.assert_array_equal(a, b)
