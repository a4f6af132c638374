"""Saving and restoring quantized trees (Orbax), and reading float checkpoints.

A quantized checkpoint is a folder: ``sensorquant.json`` (format version, user
metadata, and for every leaf its path and kind; QArray leaves also keep their
scheme, axes, block size and original dtype) and ``arrays/``, an Orbax
checkpoint holding the arrays. Restoring needs no target; with one (``like``),
the result has its tree structure and, where given, its shardings.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from sensorquant_jax.qarray import QArray, is_qarray
from sensorquant_jax.quantize import path_str

FORMAT = "sensorquant_jax/1"
SPEC_FILE = "sensorquant.json"
_MAX_SPEC_BYTES = 64 << 20


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt or not of a supported format."""


def _leaf_key(i: int) -> str:
  return f"leaf_{i:06d}"


def _part_dir(k: int) -> str:
  return f"part_{k:04d}"


class CheckpointWriter:
  """Writes a checkpoint leaf by leaf, in Orbax parts of about ``part_bytes``.

  Leaves are held only until their part is written, so a streaming writer's
  memory is bounded by ``part_bytes`` rather than the whole tree. The folder
  appears at ``path`` only when :meth:`close` succeeds (written aside, then
  renamed); :meth:`abort` (or an exception inside ``with``) removes it.
  """

  def __init__(
    self, path: str | os.PathLike, metadata: dict | None = None, part_bytes: int = 256 << 20
  ):
    self.path = os.path.abspath(os.fspath(path))
    self.metadata = metadata or {}
    json.dumps(self.metadata)
    self.part_bytes = part_bytes
    parent = os.path.dirname(self.path)
    os.makedirs(parent, exist_ok=True)
    self._tmp = tempfile.mkdtemp(prefix=".tmp-sq-", dir=parent)
    self._spec: list[dict] = []
    self._part: dict[str, dict] = {}
    self._part_size = 0
    self._parts = 0

  def add(self, name: str, x: Any) -> None:
    """Adds one leaf (array, QArray or JSON-able value) at '/'-path ``name``."""
    i = len(self._spec)
    if is_qarray(x):
      entry = {
        "path": name,
        "kind": "qarray",
        "scheme": x.scheme,
        "axes": list(x.axes),
        "block_size": x.block_size,
        "dtype": np.dtype(x.dtype).name,
        "zero_point": x.zero_point is not None,
      }
      group = {"values": x.values, "scale": x.scale}
      if x.zero_point is not None:
        group["zero_point"] = x.zero_point
    elif hasattr(x, "shape") and hasattr(x, "dtype"):
      entry = {"path": name, "kind": "array"}
      group = {"value": x}
    else:
      try:
        json.dumps(x)
      except TypeError:
        raise CheckpointError(f"{name}: cannot save a leaf of type {type(x).__name__}") from None
      self._spec.append({"path": name, "kind": "json", "value": x})
      return
    entry["part"] = self._parts
    self._spec.append(entry)
    self._part[_leaf_key(i)] = group
    self._part_size += sum(int(getattr(a, "nbytes", 0)) for a in group.values())
    if self._part_size >= self.part_bytes:
      self._flush()

  def _flush(self) -> None:
    if not self._part:
      return
    import orbax.checkpoint as ocp  # noqa: PLC0415  (heavy import, only when saving)

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(self._tmp, "arrays", _part_dir(self._parts)), self._part)
    ckptr.wait_until_finished()
    self._part, self._part_size = {}, 0
    self._parts += 1

  def close(self) -> None:
    """Writes the last part and the spec, then moves the folder into place."""
    try:
      self._flush()
      document = {
        "format": FORMAT,
        "metadata": self.metadata,
        "parts": self._parts,
        "leaves": self._spec,
      }
      with open(os.path.join(self._tmp, SPEC_FILE), "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
      if os.path.exists(self.path):
        old = self.path + ".old-" + os.path.basename(self._tmp)
        os.replace(self.path, old)
        os.replace(self._tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)
      else:
        os.replace(self._tmp, self.path)
    except BaseException:
      self.abort()
      raise

  def abort(self) -> None:
    shutil.rmtree(self._tmp, ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, kind, value, tb):
    if kind is None:
      self.close()
    else:
      self.abort()


def save(path: str | os.PathLike, qparams: Any, metadata: dict | None = None) -> None:
  """Saves a (quantized) pytree to the folder ``path``, atomically.

  Args:
    path: destination folder; replaced if it exists.
    qparams: a tree of arrays, :class:`QArray` leaves and JSON-able scalars.
    metadata: JSON-able dict stored alongside (e.g. the model config).

  Raises:
    CheckpointError: a leaf that is neither an array, a QArray nor JSON-able.
  """
  leaves = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_qarray)[0]
  writer = CheckpointWriter(path, metadata, part_bytes=1 << 62)
  with writer:
    for p, x in leaves:
      writer.add(path_str(p), x)


def read_spec(path: str | os.PathLike) -> dict:
  """The ``sensorquant.json`` of a quantized checkpoint, validated."""
  spec_path = os.path.join(os.fspath(path), SPEC_FILE)
  try:
    if os.path.getsize(spec_path) > _MAX_SPEC_BYTES:
      raise CheckpointError(f"{spec_path} is too large")
    with open(spec_path, encoding="utf-8") as f:
      doc = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path} is not a sensorquant checkpoint (no {SPEC_FILE})") from None
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{spec_path}: {e}") from None
  if not isinstance(doc, dict) or doc.get("format") != FORMAT:
    raise CheckpointError(
      f"{spec_path}: unknown format {doc.get('format') if isinstance(doc, dict) else doc!r}"
    )
  leaves = doc.get("leaves")
  if not isinstance(leaves, list) or not all(
    isinstance(e, dict)
    and isinstance(e.get("path"), str)
    and e.get("kind") in ("qarray", "array", "json")
    for e in leaves
  ):
    raise CheckpointError(f"{spec_path}: malformed leaf list")
  return doc


def restore(path: str | os.PathLike, like: Any = None) -> Any:
  """Restores a tree saved by :func:`save`.

  Args:
    path: the checkpoint folder.
    like: optional target: a tree with the same structure (arrays, QArrays or
      ``jax.ShapeDtypeStruct`` with shardings); without it, the tree is
      rebuilt as nested dicts from the saved paths.

  Returns:
    The tree, QArrays with their scheme and metadata.

  Raises:
    CheckpointError: missing or corrupt files, or ``like`` does not match.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415

  path = os.path.abspath(os.fspath(path))
  doc = read_spec(path)
  spec = doc["leaves"]
  targets: dict[int, dict] | None = None
  if like is not None:
    like_leaves, like_def = jax.tree_util.tree_flatten_with_path(like, is_leaf=is_qarray)
    if [path_str(p) for p, _ in like_leaves] != [e["path"] for e in spec]:
      raise CheckpointError(f"{path}: `like` does not have the saved tree's leaves")
    targets = {}
    for i, ((_, x), e) in enumerate(zip(like_leaves, spec, strict=True)):
      if e["kind"] == "json":
        continue
      if e["kind"] == "qarray":
        if not is_qarray(x):
          raise CheckpointError(f"{e['path']}: saved as a QArray, `like` has {type(x).__name__}")
        group = {"values": _abstract(x.values), "scale": _abstract(x.scale)}
        if x.zero_point is not None:
          group["zero_point"] = _abstract(x.zero_point)
      else:
        group = {"value": _abstract(x)}
      targets.setdefault(e["part"], {})[_leaf_key(i)] = group
  arrays: dict[str, Any] = {}
  for k in sorted({e["part"] for e in spec if e["kind"] != "json"}):
    try:
      part = ocp.StandardCheckpointer().restore(
        os.path.join(path, "arrays", _part_dir(int(k))), None if targets is None else targets[k]
      )
    except Exception as e:  # Orbax raises many types for a damaged folder
      raise CheckpointError(f"{path}: cannot read arrays: {_first_line(e)}") from None
    if not isinstance(part, dict):
      raise CheckpointError(f"{path}: part {k} is not a mapping")
    arrays.update(part)
  out = []
  for i, e in enumerate(spec):
    if e["kind"] == "json":
      out.append(e["value"])
      continue
    group = arrays.get(_leaf_key(i))
    if group is None:
      raise CheckpointError(f"{path}: arrays for {e['path']} are missing")
    if e["kind"] == "array":
      out.append(group["value"])
      continue
    try:
      out.append(
        QArray(
          group["values"],
          group["scale"],
          group.get("zero_point"),
          e["scheme"],
          tuple(int(a) for a in e["axes"]),
          None if e["block_size"] is None else int(e["block_size"]),
          np.dtype(e["dtype"]),
        )
      )
    except (KeyError, TypeError, ValueError) as err:
      raise CheckpointError(f"{path}: bad QArray record for {e['path']}: {err}") from None
  if like is not None:
    return jax.tree_util.tree_unflatten(like_def, out)
  return _nest([e["path"] for e in spec], out)


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0][:200] if lines else type(e).__name__


def _abstract(x):
  sharding = getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _nest(paths: list[str], values: list[Any]) -> Any:
  if paths == [""]:
    return values[0]
  root: dict = {}
  for p, v in zip(paths, values, strict=True):
    parts = p.split("/")
    d = root
    for k in parts[:-1]:
      d = d.setdefault(k, {})
    d[parts[-1]] = v
  return root


# ---------------------------------------------------------------------------
# Float checkpoints.
# ---------------------------------------------------------------------------


def iter_float_leaves(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
  """Yields ``(path, array)`` one leaf at a time from a float checkpoint.

  ``.npz`` and ``.safetensors`` files are read lazily, leaf by leaf (what
  streaming quantization relies on); Flax msgpack files and Orbax folders
  are read whole. Keys use '/' (``.`` in safetensors names becomes '/').

  Raises:
    CheckpointError: unknown format, or a corrupt or unreadable file.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file or folder")
  try:
    if os.path.isdir(path):
      if os.path.exists(os.path.join(path, SPEC_FILE)):
        raise CheckpointError(f"{path} is already a quantized checkpoint")
      import orbax.checkpoint as ocp  # noqa: PLC0415

      tree = ocp.StandardCheckpointer().restore(os.path.abspath(path))
      for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield path_str(p), np.asarray(x)
      return
    lower = path.lower()
    if lower.endswith(".npz"):
      with np.load(path, allow_pickle=False) as data:
        for key in data.files:
          yield key, data[key]
      return
    if lower.endswith(".safetensors"):
      try:
        from safetensors import safe_open  # noqa: PLC0415
      except ImportError:
        raise CheckpointError("reading .safetensors needs the safetensors package") from None
      with safe_open(path, framework="numpy") as f:
        for key in f.keys():  # noqa: SIM118
          yield key.replace(".", "/"), f.get_tensor(key)
      return
    if lower.endswith((".msgpack", ".flax")):
      from flax import serialization  # noqa: PLC0415

      with open(path, "rb") as f:
        tree = serialization.msgpack_restore(f.read())
      for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield path_str(p), np.asarray(x)
      return
  except CheckpointError:
    raise
  except Exception as e:  # corrupt zip, msgpack, Orbax metadata, ...
    raise CheckpointError(f"{path}: cannot read checkpoint: {_first_line(e)}") from None
  raise CheckpointError(
    f"{path}: unknown checkpoint format (expected an Orbax folder, .msgpack, .npz or .safetensors)"
  )


def load_float(path: str | os.PathLike) -> dict:
  """A float checkpoint as a nested dict of numpy arrays (see :func:`iter_float_leaves`)."""
  items = list(iter_float_leaves(path))
  return _nest([k for k, _ in items], [v for _, v in items])
