"""The dynamic programme over blocks: which candidate each block runs so that the training
step is fastest within a memory budget.

The step's device memory is its arguments and outputs (parameters, gradients, inputs: the same
for every candidate), what each block keeps for its backward pass (summed over blocks), and the
working memory of the block being run (the largest among the candidates used). The programme
goes block by block; its state is the memory kept so far (in quanta of the budget), its value
the least time; one pass per choice of the candidate whose working memory bounds the step.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# The kept-memory axis of the programme is cut into this many quanta of the budget; a
# candidate's kept bytes are rounded up, so the programme never under-counts memory.
QUANTA = 4096


@dataclasses.dataclass(frozen=True)
class Choice:
  counts: dict        # candidate name -> number of blocks
  peak: int           # predicted peak device bytes
  ms: float           # predicted step time


def best_training_choice(costs: dict, blocks: int, budget: int) -> Choice | None:
  """The fastest assignment of `blocks` blocks to the candidates in `costs` (name -> Cost) whose
  predicted peak fits `budget` bytes, or None when none fits."""
  names = list(costs)
  io = costs[names[0]].io_fixed + blocks * costs[names[0]].io_per_block
  best = None
  # Every block alike, checked exactly (the programme below rounds kept bytes up).
  for n in names:
    peak = costs[n].peak(blocks)
    if peak <= budget and (best is None or blocks * costs[n].ms < best.ms):
      best = Choice({n: blocks}, peak, blocks * costs[n].ms)
  for bound in names:  # the candidate whose working memory bounds the step
    fixed = costs[bound].fixed
    allowed = [n for n in names if costs[n].fixed <= fixed]
    room = budget - io - fixed
    if room < 0:
      continue
    quantum = max(room / QUANTA, 1.0)
    units = {n: max(0, int(np.ceil(costs[n].kept / quantum))) for n in allowed}
    limit = int(room // quantum)
    # time[u] = least time with u quanta kept; choice[i][u] = candidate index of block i
    time = np.full(limit + 1, np.inf)
    time[0] = 0.0
    picks = []
    for _ in range(blocks):
      new = np.full(limit + 1, np.inf)
      pick = np.full(limit + 1, -1)
      for j, n in enumerate(allowed):
        u = units[n]
        if u > limit:
          continue
        shifted = np.full(limit + 1, np.inf)
        shifted[u:] = time[:limit + 1 - u] + costs[n].ms
        better = shifted < new
        new[better], pick[better] = shifted[better], j
      time = new
      picks.append(pick)
    if not np.isfinite(time).any():
      continue
    u = int(np.argmin(time))
    counts = dict.fromkeys(allowed, 0)
    for pick in reversed(picks):
      n = allowed[pick[u]]
      counts[n] += 1
      u -= units[n]
    counts = {n: c for n, c in counts.items() if c}
    if bound not in counts:  # then a smaller working memory bounds it; another pass finds it
      continue
    peak = io + fixed + sum(c * costs[n].kept for n, c in counts.items())
    ms = sum(c * costs[n].ms for n, c in counts.items())
    if best is None or ms < best.ms or (ms == best.ms and peak < best.peak):
      best = Choice(counts, peak, ms)
  return best


def peak_of(costs: dict, counts: dict, blocks: int) -> int:
  """The predicted peak of `counts` (name -> blocks): as the programme counts it."""
  first = costs[next(iter(costs))]
  return (first.io_fixed + blocks * first.io_per_block + max(costs[n].fixed for n in counts)
          + sum(k * costs[n].kept for n, k in counts.items()))


def smallest_training_peak(costs: dict, blocks: int) -> int:
  """The least peak any assignment reaches: every block as the candidate that keeps least."""
  return min(c.io_fixed + blocks * (c.io_per_block + c.kept) + c.fixed for c in costs.values())
