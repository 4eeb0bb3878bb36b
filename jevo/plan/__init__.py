"""The memory-budget planner: the fastest remat and chunk settings for a stack that fit a device
memory budget, with memory from XLA's analysis of the compiled step (stacks of 2 and 3 blocks,
extrapolated; the chosen plan's whole step is then compiled and checked, `verify=True`).

    stack = jevo.nn.EvoformerStack(48, implementation="cuda", rngs=nnx.Rngs(0))
    plan = jevo.plan.plan_for(stack, m, z, budget="16GiB")        # or training=False
    stack = jevo.nn.EvoformerStack(48, implementation="cuda", plan=plan, rngs=nnx.Rngs(0))

`python -m jevo.plan --preset af2-finetune --budget 16GiB` plans from the command line.
"""

from jevo.plan.costs import StackSpec, cache_dir
from jevo.plan.plan import Plan, PlanError, Run, parse_bytes, plan_for, plan_stack, spec_of

__all__ = ["Plan", "PlanError", "Run", "StackSpec", "cache_dir", "parse_bytes", "plan_for",
           "plan_stack", "spec_of"]
