"""Inputs and accuracy checks shared by the attention tests of every backend.

Inputs are fresh random numbers from a seeded generator, rounded to the test dtype; the float64
reference (tests/reference.py) sees exactly the rounded values, so the error measured is the
backend's own.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax.numpy as jnp
import numpy as np

DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}

# Machine epsilon of each dtype: the size of one unit in the last place at 1.0.
EPS = {"bf16": 2.0**-7, "fp16": 2.0**-10, "fp32": 2.0**-23}


@dataclasses.dataclass(frozen=True)
class Case:
  """One attention problem: q, k, v `[*batch, n, s, h, d]`, optional mask and bias."""

  s: int
  d: int
  dtype: str = "fp32"
  batch: tuple[int, ...] = (1,)
  n: int = 2
  h: int = 2
  mask: str = "random"  # "none", "random", or "empty_rows" (some (b, n) with every key masked)
  bias: str = "normal"  # "none", "normal", or "large" (uniform in [-1e4, 1e4])

  def __str__(self):
    return (f"B{'x'.join(map(str, self.batch)) or '-'}_N{self.n}_S{self.s}_H{self.h}_D{self.d}_"
            f"{self.dtype}_mask-{self.mask}_bias-{self.bias}")

  @property
  def shape(self):
    return self.batch + (self.n, self.s, self.h, self.d)


def rng_for(case, salt=0):
  """A generator seeded from the case, so each case has its own (reproducible) numbers."""
  return np.random.default_rng([zlib.crc32(str(case).encode()), salt])


def make_inputs(case, salt=0):
  """dict(q, k, v, mask, bias) as jax arrays; q, k, v and bias in the case's dtype."""
  rng = rng_for(case, salt)
  dtype = DTYPES[case.dtype]
  q, k, v = (jnp.asarray(rng.standard_normal(case.shape, np.float32), dtype) for _ in range(3))
  mask = None
  if case.mask != "none":
    mask = rng.random(case.batch + (case.n, 1, 1, case.s)) < 0.8
    if case.mask == "empty_rows":
      flat = mask.reshape(-1, case.s)
      flat[:: 2] = False  # every other (b, n): no key to attend to
    mask = jnp.asarray(mask)
  bias = None
  if case.bias == "normal":
    bias = rng.standard_normal(case.batch + (1, case.h, case.s, case.s), np.float32)
  elif case.bias == "large":
    bias = rng.uniform(-1e4, 1e4, case.batch + (1, case.h, case.s, case.s)).astype(np.float32)
  if bias is not None:
    bias = jnp.asarray(bias, dtype)
  return dict(q=q, k=k, v=v, mask=mask, bias=bias)


def random_cotangent(case, salt=1):
  rng = rng_for(case, salt)
  return jnp.asarray(rng.standard_normal(case.shape, np.float32), DTYPES[case.dtype])


def to_f64(x):
  return None if x is None else np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def max_error(actual, expected):
  return float(np.max(np.abs(to_f64(actual) - expected), initial=0.0))


def assert_accurate(actual, expected, dtype, *, baseline_error=None, factor=2.0, ulps=2.0,
                    magnitude=None, logit_magnitude=0.0, what="output"):
  """Error vs the float64 reference within `factor` x the baseline backend's error in the same
  dtype, plus `ulps` units of the dtype at the reference's largest magnitude.

  Without a baseline (for the baseline itself) only the ulps term applies. `magnitude` replaces
  the reference's largest magnitude where that can be 0 (the gradient of q for S = 1).

  Softmax runs in fp32 whatever the dtype, and rounding logits of size L to fp32 moves the
  probabilities by about EPS32 * L: with a bias of 1e4 that term can exceed the dtype's own. Pass
  `logit_magnitude` (about max |logit|) to allow for it.
  """
  actual_f64 = to_f64(actual)
  assert actual_f64.shape == expected.shape, (what, actual_f64.shape, expected.shape)
  assert np.all(np.isfinite(actual_f64)), f"{what}: non-finite values"
  if magnitude is None:
    magnitude = float(np.max(np.abs(expected), initial=0.0))
  err = max_error(actual, expected)
  bound = (ulps * EPS[dtype] + EPS["fp32"] * logit_magnitude) * max(magnitude, 1e-6)
  if baseline_error is not None:
    bound += factor * baseline_error
  assert err <= bound, (f"{what}: max |error| {err:.3g} > bound {bound:.3g} (baseline error "
                        f"{baseline_error}, max |reference| {magnitude:.3g}, dtype {dtype})")
  return err
