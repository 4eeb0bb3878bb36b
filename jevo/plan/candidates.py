"""What one block of a stack can keep for its backward pass: the planner's choices per block,
from fastest and largest to slowest and leanest."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One way to run a block in a training step. `remat` is what a stack's `remat` takes: "none",
  "block", "offload", or the name of a policy in `jevo.nn.policies`."""

  name: str
  remat: str
  keeps: str

  def stack_remat(self):
    """The value a stack's `remat` takes for this candidate."""
    if self.remat in ("none", "block", "offload"):
      return self.remat
    from jevo.nn import policies
    return getattr(policies, self.remat)


TRAINING_CANDIDATES = (
    Candidate("everything", "none", "every intermediate value (no recomputation)"),
    Candidate("all_products", "save_all_products",
              "every matrix product's output (recomputes elementwise work and attention)"),
    Candidate("linear_outputs", "save_linear_outputs",
              "every linear layer's output (recomputes the rest of the block)"),
    Candidate("block_inputs", "block", "only the block's inputs (recomputes the whole block)"),
    Candidate("offload", "offload",
              "only the block's inputs, in pinned host memory (recomputes the whole block)"),
)

# Training where no plan fits unchunked: these chunk sizes (largest first), with only the
# candidates below, which keep nothing of a block's internals (a chunked slice is recomputed
# in the backward pass from its inputs, `jevo.nn.chunking`, so named residuals inside it are
# not kept anyway).
TRAINING_CHUNKS = (64, 16)
CHUNKED_CANDIDATES = ("block_inputs", "offload")

# Inference: the chunk sizes tried along each sub-module's independent axis (None = whole).
INFERENCE_CHUNKS = (None, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)


def by_name(name: str) -> Candidate:
  for c in TRAINING_CANDIDATES:
    if c.name == name:
      return c
  raise ValueError(f"candidate must be one of {[c.name for c in TRAINING_CANDIDATES]}, "
                   f"got {name!r}")
