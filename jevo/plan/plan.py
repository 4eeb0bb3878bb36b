"""A plan for a stack, and how it is made: `plan_stack`."""

from __future__ import annotations

import dataclasses
import re
import time

from jevo.plan import candidates as cand
from jevo.plan import costs as cst
from jevo.plan import search

GIB = 2 ** 30


def size_text(nbytes: int) -> str:
  """Bytes as GiB, MiB below one GiB, KiB below one MiB."""
  for unit, size in (("GiB", GIB), ("MiB", 2 ** 20)):
    if nbytes >= size:
      return f"{nbytes / size:.2f} {unit}"
  return f"{nbytes / 2 ** 10:.1f} KiB"


class PlanError(ValueError):
  """The budget cannot be met; `smallest_budget` is the least the planner can meet."""

  def __init__(self, message: str, smallest_budget: int):
    super().__init__(message)
    self.smallest_budget = smallest_budget


@dataclasses.dataclass(frozen=True)
class Run:
  """`blocks` consecutive blocks that keep what `candidate` keeps for the backward pass."""

  blocks: int
  candidate: str
  remat: str


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a stack should run: for training, its blocks split into runs, each with what it keeps
  for the backward pass; for inference, the chunk size of its sub-modules (attention, outer
  product mean, triangle multiplications, transitions: the stack's `chunk_size`). With the
  predicted peak device bytes and step time, and why.

  `stack_remat` is what `EvoformerStack(..., remat=...)` takes; `chunk_size` what its call takes.
  """

  training: bool
  blocks: int
  budget: int
  runs: tuple[Run, ...]
  chunk_size: int | None
  predicted_peak: int
  predicted_ms: float
  time_source: str
  reasons: tuple[str, ...]
  planning_s: float

  @property
  def stack_remat(self):
    """A stack's `remat` for this plan: one choice, or runs of (blocks, choice)."""
    if len(self.runs) == 1:
      return cand.by_name(self.runs[0].candidate).stack_remat()
    return tuple((r.blocks, cand.by_name(r.candidate).stack_remat()) for r in self.runs)

  def describe(self) -> str:
    kind = "training step" if self.training else "inference forward"
    lines = [f"Plan for a {self.blocks}-block {kind} within {size_text(self.budget)}: "
             f"predicted peak {size_text(self.predicted_peak)}, step "
             f"{self.predicted_ms:.1f} ms ({self.time_source}); planned in "
             f"{self.planning_s:.1f} s."]
    for r in self.runs:
      lines.append(f"- {r.blocks} blocks keep {cand.by_name(r.candidate).keeps} "
                   f"(remat={r.remat!r})")
    if not self.training:
      lines.append(f"- chunk_size={self.chunk_size}")
    lines += [f"  {reason}" for reason in self.reasons]
    return "\n".join(lines)


_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kb": 10 ** 3, "kib": 2 ** 10, "m": 2 ** 20,
          "mb": 10 ** 6, "mib": 2 ** 20, "g": GIB, "gb": 10 ** 9, "gib": GIB, "t": 2 ** 40,
          "tb": 10 ** 12, "tib": 2 ** 40}


def parse_bytes(text) -> int:
  """'16GiB', '40 GB', '1.5g', 123456 -> bytes; ValueError naming the expected form."""
  if isinstance(text, (int, float)) and not isinstance(text, bool):
    if text <= 0:
      raise ValueError(f"budget must be positive, got {text!r}")
    return int(text)
  match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
  unit = match and match.group(2).lower()
  if not match or unit not in _UNITS or float(match.group(1)) <= 0:
    raise ValueError(f"budget must be a positive size such as 16GiB, 40GB or 1.5e9, got {text!r}")
  return int(float(match.group(1)) * _UNITS[unit])


def _measures_on_device() -> bool:
  import jax
  return jax.devices()[0].platform == "gpu"


def spec_of(stack, m, z) -> cst.StackSpec:
  """The StackSpec of an EvoformerStack or ExtraMSAStack and its inputs m `[N_seq, N_res, c]`
  and z (arrays or anything with a shape)."""
  from jevo.nn import ExtraMSAStack
  if not hasattr(stack, "block_config"):
    raise TypeError(f"stack must be an EvoformerStack or ExtraMSAStack, got {type(stack)}")
  if len(m.shape) != 3 or len(z.shape) != 3:
    raise ValueError(f"the planner takes unbatched m [N_seq, N_res, c_m] and z "
                     f"[N_res, N_res, c_z], got shapes {m.shape} and {z.shape}")
  return cst.StackSpec(m.shape[0], m.shape[1], stack.block_config,
                       isinstance(stack, ExtraMSAStack))


def plan_for(stack, m, z, *, budget, training: bool = True, **kwargs) -> Plan:
  """`plan_stack` for this stack (its sizes and block options) and these inputs."""
  return plan_stack(spec_of(stack, m, z), stack.num_blocks, budget=budget, training=training,
                    **kwargs)


def plan_stack(spec: cst.StackSpec, blocks: int, *, budget, training: bool = True,
               measure: bool | None = None, candidates=None, use_cache: bool = True) -> Plan:
  """The fastest plan for a stack of `blocks` blocks of `spec` whose peak device memory, as
  XLA's memory analysis of the compiled step predicts it, fits `budget` (bytes or '16GiB').

  Memory: for each candidate, the compiled training step of stacks of 2 and 3 blocks (or the
  inference forward for each chunk size); time: measured on the device when it is a GPU (or
  `measure=True`), else XLA's cost analysis. Figures are cached on disk (`costs.cache_dir()`).
  Raises PlanError naming the smallest budget that can be met.
  """
  start = time.perf_counter()
  budget = parse_bytes(budget)
  if not isinstance(blocks, int) or blocks <= 0:
    raise ValueError(f"blocks must be a positive integer, got {blocks!r}")
  measure = _measures_on_device() if measure is None else measure
  if training:
    return _plan_training(spec, blocks, budget, measure, candidates, use_cache, start)
  return _plan_inference(spec, blocks, budget, measure, use_cache, start)


def _plan_training(spec, blocks, budget, measure, candidates, use_cache, start):
  chosen = candidates or cand.TRAINING_CANDIDATES
  costs = {c.name: cst.training_cost(spec, c, measure=measure, use_cache=use_cache)
           for c in chosen}
  choice = search.best_training_choice(costs, blocks, budget)
  if choice is None:
    least = search.smallest_training_peak(costs, blocks)
    raise PlanError(f"no plan for {blocks} blocks at {spec.n_seq} x {spec.n_res} fits a budget "
                    f"of {size_text(budget)}: the smallest budget the planner can meet is "
                    f"{size_text(least)} ({least} bytes; every block keeping only its inputs"
                    f"{' in host memory' if 'offload' in costs else ''})", least)
  order = [c.name for c in chosen]  # fastest first
  runs = tuple(Run(choice.counts[n], n, cand.by_name(n).remat) for n in order
               if n in choice.counts)
  fastest = order[0]
  reasons = [f"{n}: {costs[n].kept / 2**20:.1f} MiB kept per block, working memory "
             f"{costs[n].fixed / 2**20:.1f} MiB, {costs[n].ms:.2f} ms per block"
             for n in order]
  if choice.counts.get(fastest) == blocks:
    reasons.insert(0, "every block keeps everything: the fastest choice fits the budget")
  else:
    reasons.insert(0, f"keeping everything in all {blocks} blocks would need "
                   f"{size_text(costs[fastest].peak(blocks))}; the programme over blocks "
                   "picked the fastest mix that fits")
  return Plan(True, blocks, budget, runs, None, choice.peak, choice.ms,
              costs[fastest].time_source, tuple(reasons), time.perf_counter() - start)


def _plan_inference(spec, blocks, budget, measure, use_cache, start):
  # Time grows as the chunk shrinks, so the first chunk (largest first) that fits is best.
  # Memory mostly falls with the chunk, but not always at small sizes, so each is tried.
  chunks = [c for c in cand.INFERENCE_CHUNKS if c is None or c < max(spec.n_seq, spec.n_res)]
  tried = {}
  for i, chunk in enumerate(chunks):
    tried[i] = cst.inference_cost(spec, chunk, measure=measure, use_cache=use_cache)
    if tried[i].peak(blocks) <= budget:
      break
  else:
    i = min(tried, key=lambda j: tried[j].peak(blocks))
    least = tried[i].peak(blocks)
    raise PlanError(f"no chunk size fits a budget of {size_text(budget)} for {blocks} "
                    f"blocks at {spec.n_seq} x {spec.n_res}: the smallest budget the planner "
                    f"can meet is {size_text(least)} ({least} bytes; chunk_size={chunks[i]})",
                    least)
  lo = i
  best = tried[lo]
  reasons = [f"chunk_size={chunks[i]}: peak {size_text(c.peak(blocks))}, "
             f"{c.ms:.2f} ms per block" for i, c in sorted(tried.items(), key=lambda kv: kv[0])]
  reasons.insert(0, "the largest chunk that fits (smaller chunks only cost time)")
  return Plan(False, blocks, budget, (), chunks[lo], best.peak(blocks), blocks * best.ms,
              best.time_source, tuple(reasons), time.perf_counter() - start)
