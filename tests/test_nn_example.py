"""The training-step example runs at its tiny default size and its loss goes down."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np

EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "train_step.py"


def test_train_step_example_learns():
  spec = importlib.util.spec_from_file_location("train_step_example", EXAMPLE)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  losses = example.main(["--steps", "4", "--seed", "1"])
  assert len(losses) == 4 and np.all(np.isfinite(losses))
  assert losses[-1] < losses[0]
