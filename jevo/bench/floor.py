"""The physical floor of an attention call on a known GPU.

floor = max(exponentials / exp rate, matrix FLOPs / tensor rate): one exponential per logit in
the forward and two in forward+backward (the backward recomputes the softmax); 4*B*N*H*S*S*D
matrix FLOPs forward and 3.5 times that forward+backward. The exponential rate is the
special-function units' 16 exp2 per clock per SM at the boost clock; the tensor rate is 80% of
the datasheet's dense bf16/fp16 peak, what large cuBLAS matrix products reach.
"""

from __future__ import annotations

import dataclasses

FLOOR_FORMULA = ("floor = max(exponentials / exp_rate, FLOPs / tensor_rate); exponentials = "
                 "B*N*H*S*S forward, twice that forward+backward; FLOPs = 4*B*N*H*S*S*D forward, "
                 "3.5x that forward+backward")
BACKWARD_FLOPS_FACTOR = 3.5


@dataclasses.dataclass(frozen=True)
class DeviceRates:
  name: str
  exp_per_s: float
  tensor_flops_per_s: float


def _rates(name, sms, boost_ghz, dense_tflops):
  return DeviceRates(name, sms * boost_ghz * 1e9 * 16, 0.8 * dense_tflops * 1e12)


# Matched against jax's device_kind in this order (the first substring that occurs wins).
KNOWN_DEVICES = (
    ("H200", _rates("H200", 132, 1.98, 989)),
    ("H100 PCIe", _rates("H100 PCIe", 114, 1.755, 756)),
    ("H100", _rates("H100 SXM", 132, 1.98, 989)),
    ("A100", _rates("A100", 108, 1.41, 312)),
)


def device_rates(device_kind: str) -> DeviceRates | None:
  """The rates of a device by jax's `device_kind`, or None for a device not in the table."""
  for key, rates in KNOWN_DEVICES:
    if key.lower() in device_kind.lower():
      return rates
  return None


def attention_floor_ms(case, backward: bool, rates: DeviceRates) -> float:
  """The floor in ms of one call of `case` (an AttentionCase), forward or forward+backward."""
  exps = case.logits * (2 if backward else 1)
  flops = case.flops_forward * (BACKWARD_FLOPS_FACTOR if backward else 1)
  return 1e3 * max(exps / rates.exp_per_s, flops / rates.tensor_flops_per_s)


def attention_flops(case, backward: bool) -> float:
  return case.flops_forward * (BACKWARD_FLOPS_FACTOR if backward else 1)
