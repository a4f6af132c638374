"""Calibration records (``int8.rs``'s ``LayerCalibration``), their JSON files and
the static activation scales they give."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from sensorquant_jax._src import fileio


@dataclasses.dataclass
class LayerCalibration:
  """Calibration statistics for one Linear layer (``int8.rs`` field order)."""

  name: str
  w_min: float
  w_max: float
  act_min: float
  act_max: float

  def weight_scale(self) -> np.float32:
    """``max(|w_min|, |w_max|) / 127`` in float32 (NaN-ignoring like ``f32::max``)."""
    with np.errstate(invalid="ignore"):
      m = np.fmax(np.abs(np.float32(self.w_min)), np.abs(np.float32(self.w_max)))
    return np.float32(m / np.float32(127))

  def to_dict(self) -> dict[str, Any]:
    return {k: (v if k == "name" else float(v)) for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> LayerCalibration:
    return cls(str(d["name"]), *(float(d[k]) for k in ("w_min", "w_max", "act_min", "act_max")))


def act_scales(calibration: Mapping[str, LayerCalibration]) -> dict[str, float]:
  """Static symmetric int8 activation scales ``max(|act_min|, |act_max|) / 127``.

  The result plugs into ``sq.apply(..., mode="w8a8", act_scales=...)``.
  """
  return {k: max(abs(c.act_min), abs(c.act_max), 1e-12) / 127.0 for k, c in calibration.items()}


def save_calibration(
  path: str | os.PathLike,
  calibration: Mapping[str, LayerCalibration],
  *,
  overwrite: bool = False,
) -> None:
  """Writes calibration records as JSON, atomically (unique temporary, fsync, rename).

  Args:
    path: the JSON file.
    calibration: records from :func:`calibrate`.
    overwrite: allow replacing an existing calibration file (never another
      kind of file).

  Raises:
    DestinationError: ``path`` is a folder, another kind of file, or a
      calibration file while ``overwrite`` is False.
  """
  doc = [{"path": k, **c.to_dict()} for k, c in calibration.items()]
  text = json.dumps(doc, indent=1, allow_nan=False).encode()
  target = fileio.check_file_destination(
    os.fspath(path), overwrite=overwrite, is_ours=is_calibration_file, kind="calibration file"
  )
  fileio.write_file_atomic(target, lambda f: f.write(text))


def is_calibration_file(path: str | os.PathLike) -> bool:
  """Whether ``path`` looks like what :func:`save_calibration` writes."""
  path = os.fspath(path)
  if fileio.file_starts_with(path, b"[", (b'"act_max"',)):
    return True
  try:
    with open(path, "rb") as f:
      return f.read(64).strip() == b"[]"
  except OSError:
    return False


def load_calibration(path: str | os.PathLike) -> dict[str, LayerCalibration]:
  """Reads what :func:`save_calibration` wrote.

  Raises:
    ValueError: the file is not a list of calibration records.
  """
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
  except RecursionError:
    raise ValueError(f"{path}: JSON nested too deeply") from None
  except OSError as e:
    raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON: {e}") from None
  if not isinstance(doc, list):
    raise ValueError(f"{path}: expected a list of calibration records")
  out: dict[str, LayerCalibration] = {}
  for i, d in enumerate(doc):
    try:
      key = d["path"]
      if not isinstance(key, str) or key in out:
        raise ValueError(f"missing, non-string or repeated path {key!r}")
      out[key] = LayerCalibration.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{path}: bad calibration record {i}: {e}") from None
  return out
