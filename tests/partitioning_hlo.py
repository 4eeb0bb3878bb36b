"""Reading compiled HLO text: which collectives gather the attention's inputs, and the shapes
that the kernels' custom calls see."""

from __future__ import annotations

import re

_INSTRUCTION = re.compile(r"%\S+\s*=\s*(?P<result>.*?)\s+(?P<op>[a-z][a-z0-9-]*)\(")
_ARRAY = re.compile(r"\b[a-z][a-z0-9]*\[([0-9,]*)\]")
# The collectives that bring blocks of an array together (all-reduce adds them instead).
GATHERS = ("all-gather", "all-gather-start", "all-to-all", "collective-permute",
           "collective-permute-start")


def instructions(hlo: str):
  """(opcode, result shapes, line) of every instruction in HLO text."""
  for line in hlo.splitlines():
    match = _INSTRUCTION.search(line)
    if match:
      shapes = [tuple(int(d) for d in dims.split(",") if d)
                for dims in _ARRAY.findall(match["result"])]
      yield match["op"], shapes, line


def input_shapes(shape, batch=None) -> set[tuple[int, ...]]:
  """The global shapes of q (k, v), the mask and the bias for q of `shape` [B, N, S, H, D];
  with `batch`, also as vmapped over a leading axis of that size (and folded into B)."""
  b, n, s, h, d = shape
  shapes = {(b, n, s, h, d), (b, n, s), (b, h, s, s)}
  if batch:
    shapes |= {(batch,) + x for x in shapes} | {(batch * x[0],) + x[1:] for x in shapes}
  return shapes


def _block_of(block, shape) -> bool:
  return len(block) == len(shape) and all(b and s % b == 0 for b, s in zip(block, shape))


def gathers_of(hlo: str, shapes) -> list[str]:
  """The gathering collectives in `hlo` whose result is an array of one of `shapes`, or a
  block of one (any dtype: the CPU gathers bf16 as f32), as their lines."""
  return [line.strip()[:160] for op, result, line in instructions(hlo)
          if op in GATHERS and any(_block_of(r, x) for r in result for x in shapes)]


def kernel_calls(hlo: str) -> dict[str, list[tuple[int, ...]]]:
  """Per FFI target of jevo's kernels, the shape of the first result of each of its calls."""
  calls = {}
  for _, result, line in instructions(hlo):
    target = re.search(r'custom_call_target="(jevo_attention_\w+)"', line)
    if target:
      calls.setdefault(target[1], []).append(result[0])
  return calls
