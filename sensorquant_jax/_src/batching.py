"""Calibration and evaluation batches: what a batch means as model arguments."""

from __future__ import annotations

from typing import Any


def as_args(batch: Any) -> tuple:
  """A batch as positional model arguments: a tuple or list is the arguments,
  anything else (an array) is the single argument."""
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
