"""A plan for a stack, and how it is made: `plan_stack`."""

from __future__ import annotations

import dataclasses
import os
import re
import time

from jevo.plan import candidates as cand
from jevo.plan import costs as cst
from jevo.plan import room, search, sub_modules

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
  product mean, triangle multiplications, transitions: the stack's `chunk_size`; one size, or
  sizes by sub-module name, `plan_stack`'s default where the whole forward does not fit). With the
  predicted peak device bytes and step time, and why.

  `xla_peak` is XLA's memory analysis of the whole planned step, compiled once the plan was
  chosen (None where `verify=False`): the figure the plan was checked against, at most
  `budget - headroom`. `predicted_peak` is the cost model's extrapolation from stacks of 2 and
  3 blocks (before any correction from a check). `planning_s` is the planner's own time,
  `check_s` the part of it spent compiling whole steps to check them (`checks` of them,
  rejected plans included). `device_peak` is the allocator's peak running the planned step
  once in a fresh process (on a GPU with `verify=True`; None elsewhere or where it could not
  be measured, which the reasons say): the plan fits by it too.

  `stack_remat` is what `EvoformerStack(..., remat=...)` takes; `chunk_size` what its call takes.
  """

  training: bool
  blocks: int
  budget: int
  runs: tuple[Run, ...]
  chunk_size: int | None | dict
  predicted_peak: int
  predicted_ms: float
  time_source: str
  reasons: tuple[str, ...]
  planning_s: float
  xla_peak: int | None = None
  headroom: int = 0
  checks: int = 0
  check_s: float = 0.0
  device_peak: int | None = None

  @property
  def stack_remat(self):
    """A stack's `remat` for this plan: one choice, or runs of (blocks, choice)."""
    if len(self.runs) == 1:
      return cand.by_name(self.runs[0].candidate).stack_remat()
    return tuple((r.blocks, cand.by_name(r.candidate).stack_remat()) for r in self.runs)

  @property
  def verified(self) -> bool:
    return self.xla_peak is not None

  def describe(self) -> str:
    kind = "training step" if self.training else "inference forward"
    within = size_text(self.budget)
    if self.headroom:
      within += f" ({size_text(self.headroom)} of it left for the allocator)"
    if self.verified:
      peak = (f"XLA's analysis of the whole planned step {size_text(self.xla_peak)} "
              f"(predicted {size_text(self.predicted_peak)})")
      if self.device_peak is not None:
        peak += f", the allocator's peak running it {size_text(self.device_peak)}"
      cost = (f"planned in {self.planning_s:.1f} s, {self.check_s:.1f} s of it checking "
              f"{self.checks} whole step{'s' if self.checks != 1 else ''}")
    else:
      peak = (f"predicted peak {size_text(self.predicted_peak)} (not checked against the "
              "whole step: verify=False)")
      cost = f"planned in {self.planning_s:.1f} s"
    lines = [f"Plan for a {self.blocks}-block {kind} within {within}: {peak}, step "
             f"{self.predicted_ms:.1f} ms ({self.time_source}); {cost}."]
    for r in self.runs:
      lines.append(f"- {r.blocks} blocks keep {cand.by_name(r.candidate).keeps} "
                   f"(remat={r.remat!r})")
    if not self.training or self.chunk_size is not None:
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


def parse_headroom(text) -> int:
  """A headroom in bytes: None for the default (GPU_HEADROOM on a GPU, else 0), 0, or a size."""
  if text is None:
    return GPU_HEADROOM if _measures_on_device() else 0
  if text in (0, "0"):
    return 0
  try:
    return parse_bytes(text)
  except ValueError:
    raise ValueError(f"headroom must be a size such as 256MiB, or 0, got {text!r}") from None


def _measures_on_device() -> bool:
  import jax
  return jax.devices()[0].platform == "gpu"


# The check of a plan: XLA's analysis of the whole planned step, compiled once. A training plan
# over the budget corrects the cost model (each of its blocks is charged an equal share of what
# the model under-predicted it by) and is re-planned within the budget less this fraction of
# it; an inference plan over the budget moves on to smaller chunks, each checked, within the
# budget less that margin. At most MAX_CHECKS whole steps are compiled per plan (one more for
# an inference plan per sub-module, `_plan_inference`), the last
# kept for the leanest plan (every block as the choice that keeps least, or the chunk size
# with the least peak), which is returned if it fits and otherwise names the smallest budget.
MAX_CHECKS = 4
REPLAN_MARGIN = 0.01
# XLA's figure must leave this much of the budget free on a GPU: on an H200 the allocator's
# peak was about 0.07 and 0.08 GiB above XLA's analysis of the whole step (7.82 against 7.75
# GiB for an offload plan, 14.19 against 14.11 GiB for a block_inputs plan).
GPU_HEADROOM = 256 * 2 ** 20


class _Checks:
  """Compiles whole planned steps (or reads them from the cache) and keeps what they gave. With
  `on_device` (a GPU), a step XLA's analysis fits within `limit` is also run once in a fresh
  process for the allocator's peak (`costs.device_peak`), and the larger figure is the check's.
  Where XLA's figure is not cached yet, the child's compile gives it, so that the planning
  process does not compile the same whole step as well (it does where the child could not).
  A step the child ran out of device memory running is over any limit, whatever XLA's figure
  (on an H200 a 128 x 4096 forward XLA put at 44.8 GiB could not run in 139 GiB)."""

  def __init__(self, spec, blocks, training, use_cache, limit: int, on_device: bool):
    self.spec, self.blocks, self.training, self.use_cache = spec, blocks, training, use_cache
    self.limit, self.on_device = limit, on_device
    # what -> (predicted, XLA's bytes, the device's figure or None, why not, out of memory)
    self.seen = {}
    self.seconds = 0.0

  def __call__(self, what: str, runs, chunk_size, predicted: int) -> int:
    if what not in self.seen:
      start = time.perf_counter()
      step = (self.spec, self.blocks, runs, chunk_size, self.training)
      nbytes, device, why_not = None, None, ""
      if self.use_cache and cst.whole_step_cached(*step):
        nbytes = cst.whole_step_bytes(*step)["bytes"]
      if self.on_device and (nbytes is None or nbytes <= self.limit):
        no_room = ("" if self.use_cache and cst.device_peak_cached(*step)
                   else room.why_no_room(self.limit, room.device_free_bytes()))
        measured = (dict(error=no_room) if no_room
                    else cst.device_peak(*step, use_cache=self.use_cache))
        device, why_not = measured.get("bytes"), measured.get("error", "")
        if nbytes is None and "xla_bytes" in measured:
          nbytes = cst.store_whole_step_bytes(*step, measured["xla_bytes"],
                                              measured.get("compile_s", 0.0),
                                              use_cache=self.use_cache)["bytes"]
      if nbytes is None:
        nbytes = cst.whole_step_bytes(*step, use_cache=self.use_cache)["bytes"]
      self.seconds += time.perf_counter() - start
      out_of_memory = device is None and cst.ran_out_of_memory(why_not)
      self.seen[what] = (predicted, nbytes, device, why_not, out_of_memory)
    return self.figure(what)

  def figure(self, what: str) -> int:
    """The checked peak of `what`: XLA's figure, or the allocator's where that is larger; past
    the limit and the device's memory where the device ran out of memory running it."""
    _, nbytes, device, _, out_of_memory = self.seen[what]
    if out_of_memory:
      return max(nbytes, self.limit, cst.device_bytes_limit() or 0) + 1
    return nbytes if device is None else max(nbytes, device)

  def peaks(self, what: str) -> tuple[int, int | None]:
    return self.seen[what][1], self.seen[what][2]

  def ran_out_of_memory(self, what: str) -> bool:
    """Whether the device ran out of memory running `what` in its check."""
    return self.seen[what][4]

  def plan_error(self, what: str, failed: str, detail: str, headroom: int) -> PlanError:
    """The PlanError where `what`, the leanest plan (`detail` says what it keeps), is over the
    limit in its check: naming the smallest budget it needs, or, where the device ran out of
    memory running it, saying that no budget fits it on this device."""
    smallest = self.figure(what) + headroom
    if self.ran_out_of_memory(what):
      return PlanError(f"{failed}: even the leanest plan ({detail}) cannot run on this device, "
                       f"whatever the budget: {self.text(what)}", smallest)
    return PlanError(f"{failed}: the smallest budget the planner can meet is "
                     f"{size_text(smallest)} ({smallest} bytes; {detail}: {self.text(what)}"
                     f"{_headroom_text(headroom)})", smallest)

  def text(self, what: str) -> str:
    predicted, nbytes, device, why_not, out_of_memory = self.seen[what]
    out = f"XLA's analysis of the whole step {size_text(nbytes)}"
    if device is not None:
      out += f", the allocator's peak running it {size_text(device)}"
    elif out_of_memory:
      out += f" (the device ran out of memory running it: {why_not})"
    elif why_not:
      out += f" (the allocator's peak not measured: {why_not})"
    return out + f", predicted {size_text(predicted)}"

  def reasons(self) -> list[str]:
    return [f"checked {what}: {self.text(what)}: "
            + ("fits" if self.figure(what) <= self.limit
               else "over the limit" if self.ran_out_of_memory(what)
               else f"{size_text(self.figure(what) - self.limit)} over the limit")
            for what in self.seen]


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
               measure: bool | None = None, candidates=None, use_cache: bool = True,
               verify: bool | str = True, headroom=None,
               compile_workers: int | None = None, per_sub_module: bool = True) -> Plan:
  """The fastest plan for a stack of `blocks` blocks of `spec` whose peak device memory fits
  `budget` (bytes or '16GiB'), less `headroom` (bytes or a size; default 256 MiB on a GPU,
  where the allocator's peak runs a little above XLA's analysis, none elsewhere).

  Memory: for each candidate, the compiled training step of stacks of 2 and 3 blocks (or the
  inference forward for each chunk size), extrapolated linearly to `blocks`; time: measured on
  the device when it is a GPU (or `measure=True`), else XLA's cost analysis. With `verify`
  (the default) the chosen plan's whole step is then compiled and its peak read from XLA's
  memory analysis and, on a GPU, where that fits, run once in a fresh process for the
  allocator's peak (`verify="xla"` skips the run; on an H200 a mixed plan peaked at twice
  XLA's figure); the larger figure is the check's. A plan over the limit is re-planned a
  bounded number of times (MAX_CHECKS compiles in all, one more per sub-module), and where no
  checked plan fits, PlanError names the smallest budget that does (the leanest plan's checked
  peak plus the headroom), or says that the device cannot run even that. Figures, the checks'
  included, are cached on disk (`costs.cache_dir()`). `compile_workers` training steps are
  compiled at a time, after a first one alone whose autotuning results the others reuse
  (default: one per four CPU cores on a GPU machine, where XLA's compiles leave cores idle;
  one on a CPU, where running them side by side was measured slower).

  `per_sub_module` (inference, the default): where the whole forward does not fit, chunk each
  sub-module by the largest size at which it fits (`jevo.plan.sub_modules`: one compile of
  each sub-module whole, more only for those that do not fit whole), taken where its whole
  step's check fits; one chunk size for every sub-module otherwise, or with
  `per_sub_module=False`.

  The planner's own cost is compiles: two per candidate (five for training, up to twelve chunk
  sizes for inference; where no training plan fits unchunked, two more per chunked candidate
  and chunk size) and one per check (on a GPU the allocator check's process compiles it and
  reports XLA's analysis too), each about as long as compiling one step of the stack (its
  scans make that nearly independent of the number of blocks). On a busy 2-core CPU
  at tiny sizes (8 x 12, c_m 32, 6 blocks, candidates "everything" and "block_inputs", a budget
  that needs a mix) planning from an empty cache took 74 s without the check and 91 s with it
  (one check, 25 s: the mix's two scans compile slower than one); a cost model made to
  under-predict took two checks, 13 s; with every figure cached, under 0.01 s either way. The
  check is not idle there: XLA gave that mix 3.75 MiB where the model predicted 3.40 MiB.
  """
  start = time.perf_counter()
  budget = parse_bytes(budget)
  if not isinstance(blocks, int) or blocks <= 0:
    raise ValueError(f"blocks must be a positive integer, got {blocks!r}")
  measure = _measures_on_device() if measure is None else measure
  headroom = parse_headroom(headroom)
  if verify not in (True, False, "xla"):
    raise ValueError(f"verify must be True, False or 'xla', got {verify!r}")
  checks = (_Checks(spec, blocks, training, use_cache, budget - headroom,
                    on_device=verify is True and _measures_on_device()) if verify else None)
  workers = default_compile_workers() if compile_workers is None else compile_workers
  if not isinstance(workers, int) or workers < 1:
    raise ValueError(f"compile_workers must be a positive integer, got {compile_workers!r}")
  if training:
    return _plan_training(spec, blocks, budget, headroom, measure, candidates, use_cache,
                          checks, start, workers)
  return _plan_inference(spec, blocks, budget, headroom, measure, use_cache, checks, start,
                         per_sub_module)


def _headroom_text(headroom: int) -> str:
  return f" plus {size_text(headroom)} left for the allocator" if headroom else ""


def default_compile_workers() -> int:
  """How many of the candidates' steps the planner compiles at a time by default."""
  if not _measures_on_device():
    return 1
  return max(1, (os.cpu_count() or 1) // 4)


def _plan_training(spec, blocks, budget, headroom, measure, candidates, use_cache, checks,
                   start, workers=1):
  """The fastest plan unchunked; where none fits, the same with the stack chunked by each of
  `TRAINING_CHUNKS` in turn (largest first) and the candidates that keep nothing of a block's
  internals. A budget no level meets raises the PlanError naming the smallest budget of all."""
  chosen = candidates or cand.TRAINING_CANDIDATES
  levels = [(None, chosen)] + [
      (chunk, [c for c in chosen if c.name in cand.CHUNKED_CANDIDATES])
      for chunk in cand.TRAINING_CHUNKS if chunk < max(spec.n_seq, spec.n_res)]
  best_error = unchunked = None
  for chunk, level in levels:
    if not level:
      continue
    try:
      plan = _plan_training_at(spec, blocks, budget, headroom, measure, level, use_cache,
                               checks, start, workers, chunk)
    except PlanError as err:
      unchunked = err if chunk is None else unchunked
      if best_error is None or err.smallest_budget < best_error.smallest_budget:
        best_error = err
      continue
    if chunk is not None:
      plan = dataclasses.replace(plan, reasons=(
          f"no plan fits unchunked (the smallest budget without chunking is "
          f"{size_text(unchunked.smallest_budget)}); chunk_size={chunk} recomputes each "
          "slice of the chunked modules in the backward pass",) + plan.reasons)
    return plan
  raise best_error


def _plan_training_at(spec, blocks, budget, headroom, measure, chosen, use_cache, checks, start,
                      workers, chunk):
  """The fastest plan of `chosen` candidates with the stack chunked by `chunk`, or PlanError."""
  ready = cst.precompile_training(spec, chosen, measure=measure, workers=workers,
                                  use_cache=use_cache, chunk_size=chunk)
  costs = {c.name: cst.training_cost(spec, c, measure=measure, use_cache=use_cache,
                                     ready=ready.get(c.name), chunk_size=chunk)
           for c in chosen}
  order = [c.name for c in chosen]  # fastest first
  limit = budget - headroom
  chunk_text = "" if chunk is None else f", chunk_size={chunk}"
  runs_of = lambda counts: tuple((counts[n], n) for n in order if n in counts)  # noqa: E731
  what = lambda counts: " + ".join(  # noqa: E731
      f"{k} x {n}" for k, n in runs_of(counts)) + chunk_text
  # `model` is the cost model as corrected by the checks: a checked plan over the limit charges
  # each of its blocks an equal share of what the model under-predicted it by.
  model, choice, checked, search_limit, fallback = dict(costs), None, None, limit, None
  for _ in range(MAX_CHECKS - 1 if checks is not None else 1):
    found = search.best_training_choice(model, blocks, search_limit)
    if found is None:
      break
    if checks is None:
      choice = found
      break
    nbytes = checks(what(found.counts), runs_of(found.counts), chunk,
                    search.peak_of(costs, found.counts, blocks))
    if nbytes <= limit:
      choice, checked = found, what(found.counts)
      break
    share = -(-(nbytes - found.peak) // blocks)  # > 0: found.peak <= limit < nbytes
    for n in found.counts:
      model[n] = dataclasses.replace(model[n], kept=model[n].kept + share)
    search_limit = limit - int(REPLAN_MARGIN * limit)
  if choice is None:
    leanest = min(order, key=lambda n: (model[n].peak(blocks), order.index(n)))
    least = costs[leanest].peak(blocks)
    every = (f"every block as {leanest!r}, keeping {cand.by_name(leanest).keeps}{chunk_text}")
    if checks is None:
      raise PlanError(f"no plan for {blocks} blocks at {spec.n_seq} x {spec.n_res} fits a "
                      f"budget of {size_text(budget)}: the smallest budget the planner can "
                      f"meet is {size_text(least + headroom)} ({least + headroom} bytes; "
                      f"{every}; predicted{_headroom_text(headroom)})", least + headroom)
    checked = what({leanest: blocks})
    if checks(checked, ((blocks, leanest),), chunk, least) > limit:
      raise checks.plan_error(checked, f"no plan for {blocks} blocks at {spec.n_seq} x "
                              f"{spec.n_res} fits a budget of {size_text(budget)}", every,
                              headroom)
    choice = search.Choice({leanest: blocks}, least, blocks * costs[leanest].ms)
    fallback = f"no faster plan checked fits: {every}"
  runs = tuple(Run(k, n, cand.by_name(n).remat) for k, n in runs_of(choice.counts))
  fastest = order[0]
  reasons = [f"{n}: {costs[n].kept / 2**20:.1f} MiB kept per block, working memory "
             f"{costs[n].fixed / 2**20:.1f} MiB, {costs[n].ms:.2f} ms per block"
             for n in order]
  if choice.counts.get(fastest) == blocks:
    reasons.insert(0, f"every block keeps {cand.by_name(fastest).keeps}: the fastest choice "
                   "fits the budget")
  else:
    reasons.insert(0, f"keeping {cand.by_name(fastest).keeps} in all {blocks} blocks would "
                   f"need {size_text(costs[fastest].peak(blocks))}; the programme over blocks "
                   "picked the fastest mix that fits")
  if fallback:
    reasons[0] = fallback
  if checks is not None:
    reasons[1:1] = checks.reasons()
  xla_peak, device_peak = checks.peaks(checked) if checked else (None, None)
  return Plan(True, blocks, budget, runs, chunk, search.peak_of(costs, choice.counts, blocks),
              choice.ms,
              costs[next(iter(choice.counts))].time_source, tuple(reasons),
              time.perf_counter() - start,
              xla_peak, headroom, len(checks.seen) if checks is not None else 0,
              checks.seconds if checks is not None else 0.0, device_peak)


def _plan_inference(spec, blocks, budget, headroom, measure, use_cache, checks, start,
                    per_sub_module=True):
  """The whole forward where it fits; else, with `per_sub_module`, each sub-module chunked by
  the largest size at which it fits (by the cost model each sub-module then runs at least as
  large a chunk as one size for all would give it); else, or where that plan's checks fail,
  the largest single chunk size that fits. A budget nothing meets raises the PlanError naming
  the smallest budget of the leanest chunk size.

  Checks: the whole forward's, at most two per-sub-module plans', at least one single size's
  and the leanest's, so up to MAX_CHECKS + 1 whole steps with `per_sub_module`."""
  # Time grows as the chunk shrinks, so the first chunk (largest first) that fits is best.
  # Memory mostly falls with the chunk, but not always at small sizes, so each is tried.
  chunks = [c for c in cand.INFERENCE_CHUNKS if c is None or c < max(spec.n_seq, spec.n_res)]
  limit = budget - headroom
  max_checks = MAX_CHECKS + (1 if per_sub_module else 0)
  cost_of = lambda i, within=None: cst.inference_cost(  # noqa: E731
      spec, chunks[i], measure=measure, use_cache=use_cache, time_within=within)
  # The unchunked forward is timed only where it may fit: otherwise the per-sub-module plan
  # takes its sub-modules' times instead.
  tried = {0: cost_of(0, limit)}
  whole = tried[0]

  def finish(chunk_size, peak, ms, reasons, checked, time_source):
    if checks is not None:
      reasons[1:1] = checks.reasons()
    xla_peak, device_peak = checks.peaks(checked) if checked else (None, None)
    return Plan(False, blocks, budget, (), chunk_size, peak, blocks * ms, time_source,
                tuple(reasons), time.perf_counter() - start, xla_peak, headroom,
                len(checks.seen) if checks is not None else 0,
                checks.seconds if checks is not None else 0.0, device_peak)

  def one_size_reasons():
    return [f"chunk_size={chunks[j]}: peak {size_text(c.peak(blocks))}, {c.ms:.2f} ms per block"
            for j, c in sorted(tried.items(), key=lambda kv: kv[0])]

  whole_text = "chunk_size=None"
  if whole.peak(blocks) <= limit:
    if checks is None or checks(whole_text, (), None, whole.peak(blocks)) <= limit:
      return finish(None, whole.peak(blocks), whole.ms,
                    ["the whole forward fits: nothing is chunked"] + one_size_reasons(),
                    whole_text if checks is not None else None, whole.time_source)

  notes = []
  if per_sub_module:
    # The model's fixed part comes from the whole step's checked peak where it was checked
    # (XLA's figure where the device ran out of memory running it, which gives no peak).
    whole_peak = whole.peak(blocks)
    if checks is not None and whole_text in checks.seen:
      whole_peak = (checks.peaks(whole_text)[0] if checks.ran_out_of_memory(whole_text)
                    else checks.figure(whole_text))
    timed = whole.ms != cst.UNMEASURABLE_MS
    source = whole.time_source if timed else "measured: the sum of the sub-modules' times"
    search_limit = limit
    for _ in range(2):
      mixed = sub_modules.mixed_chunks(spec, chunks, whole_peak, whole.ms, search_limit,
                                       measure=measure, use_cache=use_cache,
                                       whole_time_source=whole.time_source)
      if isinstance(mixed, str):
        notes.append(f"per sub-module: {mixed}")
        break
      sizes, peak, ms, mixed_reasons = mixed
      what = f"chunk_size={sizes}"
      head = [f"per sub-module: the largest chunk of each sub-module that fits, predicted "
              f"{ms:.2f} ms per block (whole "
              + (f"{whole.ms:.2f})" if timed else "not timed)")]
      if checks is None:
        return finish(sizes, peak, ms, head + mixed_reasons, None, source)
      if len(checks.seen) >= max_checks - 2:  # one for a single size, one for the leanest
        break
      nbytes = checks(what, (), sizes, peak)
      if nbytes <= limit:
        return finish(sizes, peak, ms, head + mixed_reasons, what, source)
      notes.append(f"per sub-module: {what} over the limit in the whole step's check")
      if checks.ran_out_of_memory(what):
        break  # no figure to correct the model by
      # The model under-predicted by this much: plan again with that much less room.
      search_limit -= nbytes - peak + int(REPLAN_MARGIN * limit)

  chosen, checked, search_limit, leanest = None, None, limit, False
  for i in range(1, len(chunks)):
    tried[i] = cost_of(i)
    predicted = tried[i].peak(blocks)
    if predicted > search_limit:
      continue
    if checks is None:
      chosen = i
      break
    if len(checks.seen) >= max_checks - 1:  # one check is kept for the leanest plan
      break
    nbytes = checks(f"chunk_size={chunks[i]}", (), chunks[i], predicted)
    if nbytes <= limit:
      chosen, checked = i, f"chunk_size={chunks[i]}"
      break
    search_limit = limit - int(REPLAN_MARGIN * limit)  # one chunk's error says little of another's
  if chosen is None:
    for i in range(len(chunks)):  # the leanest of all
      if i not in tried:
        tried[i] = cost_of(i)
    i = min(tried, key=lambda j: tried[j].peak(blocks))
    least = tried[i].peak(blocks)
    failed = (f"no chunk size fits a budget of {size_text(budget)} for {blocks} blocks at "
              f"{spec.n_seq} x {spec.n_res}")
    if checks is None:
      raise PlanError(f"{failed}: the smallest budget the planner can meet is "
                      f"{size_text(least + headroom)} ({least + headroom} bytes; "
                      f"chunk_size={chunks[i]}; predicted{_headroom_text(headroom)})",
                      least + headroom)
    checked = f"chunk_size={chunks[i]}"
    if checks(checked, (), chunks[i], least) > limit:
      raise checks.plan_error(checked, failed, checked, headroom)
    chosen, leanest = i, True
  if chosen == 0 and cst.OVER_BUDGET in tried[0].time_source:  # over by the model, fits checked
    tried[0] = cost_of(0)
  best = tried[chosen]
  why = ("no larger chunk checked fits: the leanest chunk size" if leanest
         else "the largest chunk that fits (smaller chunks only cost time)")
  return finish(chunks[chosen], best.peak(blocks), best.ms, [why] + one_size_reasons() + notes,
                checked, best.time_source)
