"""Saving and restoring quantized trees (Orbax), and reading float checkpoints.

A quantized checkpoint is a folder: ``sensorquant.json`` (format version, user
metadata, and for every leaf its path and kind; QArray leaves also keep their
scheme, axes, block size and original dtype) and ``arrays/``, an Orbax
checkpoint holding the arrays. Restoring needs no target; with one (``like``),
the result has its tree structure and, where given, its shardings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeGuard

import jax
import numpy as np

from sensorquant_jax._src import distributed, fileio, options, packed, schemes, tree_paths
from sensorquant_jax._src.qarray import QArray, is_qarray
from sensorquant_jax._src.tree_paths import path_str

FORMAT = "sensorquant_jax/1"
SPEC_FILE = "sensorquant.json"
_MAX_SPEC_BYTES = 64 << 20
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_LEAF_RE = re.compile(r"leaf_\d{6}")


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
  is built aside and appears at ``path`` only when :meth:`close` succeeds, in
  one atomic swap where the OS allows it (``path`` is never missing, even if
  the process is killed); :meth:`abort` (or an exception inside ``with``)
  removes the partial copy and leaves ``path`` as it was.

  The destination is checked first: it may be missing, an empty folder, or,
  with ``overwrite=True``, an existing sensorquant checkpoint. Anything else
  (a file, a folder of other files, the current folder or one of its parents,
  home, a filesystem root) raises :class:`DestinationError` before anything
  is written.
  """

  def __init__(
    self,
    path: str | os.PathLike,
    metadata: dict | None = None,
    part_bytes: int = 256 << 20,
    *,
    overwrite: bool = False,
  ):
    self.user_path = os.fspath(path)
    self.metadata = metadata or {}
    if not isinstance(self.metadata, dict):
      raise CheckpointError(f"{self.user_path}: metadata must be a dict")
    try:
      json.dumps(self.metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise CheckpointError(f"{self.user_path}: metadata is not JSON-able: {e}") from None
    self.part_bytes = part_bytes
    # Across processes, process 0 checks the destination and makes the folder
    # that every process's Orbax writes its shards into.
    self.path, self._tmp, interrupted = distributed.agree(lambda: self._begin(overwrite))
    if interrupted:
      warnings.warn(
        f"{self.user_path}: an earlier save here was interrupted; its partial copy was "
        "removed (the checkpoint before it is unchanged)",
        stacklevel=3,
      )
    self._spec: list[dict] = []
    self._part: dict[str, dict] = {}
    self._part_size = 0
    self._parts = 0
    self._paths: set[str] = set()

  def _begin(self, overwrite: bool) -> tuple[str, str, int]:
    path = fileio.check_dir_destination(self.user_path, overwrite=overwrite, is_ours=is_checkpoint)
    parent = os.path.dirname(path)
    try:
      os.makedirs(parent, exist_ok=True)
      fileio.recover_dir(path)
      interrupted = fileio.remove_leftovers(parent, os.path.basename(path))
      return path, fileio.make_temp_dir(path), interrupted
    except OSError as e:
      raise CheckpointError(f"{self.user_path}: cannot write: {e.strerror or e}") from None

  def add(self, name: str, x: Any) -> None:
    """Adds one leaf (array, QArray or JSON-able value) at '/'-path ``name``."""
    if name in self._paths:
      raise CheckpointError(f"{self.user_path}: leaf {name!r} added twice")
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
      if x.bits == 4:  # the logical shape (packed values hide an odd length)
        entry["shape"] = [int(d) for d in x.shape]
      group = {"values": x.values, "scale": x.scale}
      if x.zero_point is not None:
        group["zero_point"] = x.zero_point
      if x.input_scale is not None:  # recorded only when present: older files stay valid
        entry["input_scale"] = True
        group["input_scale"] = x.input_scale
      if x.offset is not None:
        entry["offset"] = True
        group["offset"] = x.offset
      if x.perm is not None:
        entry["perm"] = True
        group["perm"] = x.perm
    elif hasattr(x, "shape") and hasattr(x, "dtype"):
      entry = {"path": name, "kind": "array"}
      group = {"value": x}
    else:
      try:
        json.dumps(x, allow_nan=False)
      except (TypeError, ValueError):
        raise CheckpointError(f"{name}: cannot save a leaf of type {type(x).__name__}") from None
      self._spec.append({"path": name, "kind": "json", "value": x})
      self._paths.add(name)
      return
    entry["part"] = self._parts
    self._spec.append(entry)
    self._paths.add(name)
    self._part[_leaf_key(i)] = group
    self._part_size += sum(int(getattr(a, "nbytes", 0)) for a in group.values())
    if self._part_size >= self.part_bytes:
      self._flush()

  def _flush(self) -> None:
    if not self._part:
      return
    import orbax.checkpoint as ocp  # heavy import, only when saving

    ckptr = ocp.StandardCheckpointer()
    try:
      ckptr.save(os.path.join(self._tmp, "arrays", _part_dir(self._parts)), self._part)
      ckptr.wait_until_finished()
    except Exception as e:  # Orbax raises many types (disk full, permissions, ...)
      raise CheckpointError(f"{self.user_path}: cannot write arrays: {self._clean(e)}") from None
    self._part, self._part_size = {}, 0
    self._parts += 1

  def _clean(self, e: BaseException) -> str:
    """An error's first line, naming the user's path rather than our temporary."""
    return fileio.first_line(e).replace(self._tmp, self.user_path)

  def close(self) -> None:
    """Writes the last part and the spec, then swaps the folder into place."""
    try:
      self._flush()
      document = {
        "format": FORMAT,
        "metadata": self.metadata,
        "parts": self._parts,
        "leaves": self._spec,
        "leaves_sha256": _leaves_digest(self._spec),
      }
      distributed.agree(lambda: self._commit(document))
    except BaseException:
      self.abort()
      raise

  def _commit(self, document: dict) -> None:
    """Writes the spec and swaps the folder into place (process 0, after every shard)."""
    try:
      with open(os.path.join(self._tmp, SPEC_FILE), "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
      fileio.fsync_dir(self._tmp)
      old = fileio.swap_dir_into_place(self._tmp, self.path)
    except OSError as e:
      raise CheckpointError(f"{self.user_path}: cannot write: {e.strerror or e}") from None
    fileio.fsync_dir(os.path.dirname(self.path))
    fileio.remove_tree(old)

  def abort(self) -> None:
    """Removes the partial copy (``path`` is left as it was, or as swapped in).

    Across processes the copy is left where it is: the others may still be
    writing into it, or be gone; the next save to ``path`` removes it and
    says that a save was interrupted.
    """
    if not distributed.is_multiprocess():
      fileio.remove_tree(self._tmp)

  def __enter__(self):
    return self

  def __exit__(self, kind, value, tb):
    if kind is None:
      self.close()
    else:
      self.abort()


def file_magic(path: str | os.PathLike, n: int = 4) -> bytes:
  """The first ``n`` bytes of a file (fewer when it is shorter; none when unreadable)."""
  try:
    with open(path, "rb") as f:
      return f.read(n)
  except OSError:
    return b""


def is_checkpoint(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a folder holding a sensorquant checkpoint spec."""
  return os.path.isfile(os.path.join(os.fspath(path), SPEC_FILE))


def save(
  path: str | os.PathLike, qparams: Any, metadata: dict | None = None, *, overwrite: bool = False
) -> None:
  """Saves a (quantized) pytree to the folder ``path``, atomically.

  Args:
    path: destination folder: missing or empty, or with ``overwrite=True`` an
      existing sensorquant checkpoint, which is replaced in one atomic swap.
    qparams: a tree of arrays, :class:`QArray` leaves and JSON-able scalars;
      :class:`PackedQArray` leaves are saved in their canonical form (restore
      gives QArrays: :func:`pack` them again).
    metadata: JSON-able dict stored alongside (e.g. the model config).
    overwrite: allow replacing an existing checkpoint.

  Raises:
    DestinationError: ``path`` holds something else, or a checkpoint and
      ``overwrite`` is False.
    CheckpointError: a leaf that is neither an array, a QArray nor JSON-able,
      or the write failed.
  """
  qparams = packed.unpack(qparams)  # the canonical layout is the one on disk
  leaves = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_qarray)[0]
  writer = CheckpointWriter(path, metadata, part_bytes=1 << 62, overwrite=overwrite)
  with writer:
    for p, x in leaves:
      writer.add(path_str(p), x)


def _is_int(x: Any) -> TypeGuard[int]:
  return isinstance(x, int) and not isinstance(x, bool)


def _validate_entry(i: int, e: Any, parts: int, where: str) -> None:
  if not isinstance(e, dict):
    raise CheckpointError(f"{where}: leaf {i} is not an object")
  name = e.get("path")
  if not isinstance(name, str):
    raise CheckpointError(f"{where}: leaf {i} has no string 'path'")
  at = f"{where}: leaf {name!r}"
  kind = e.get("kind")
  if kind not in ("qarray", "array", "json"):
    raise CheckpointError(f"{at}: unknown kind {kind!r}")
  if kind == "json":
    if "value" not in e:
      raise CheckpointError(f"{at}: missing 'value'")
    return
  part = e.get("part")
  if not _is_int(part) or not 0 <= part < parts:
    raise CheckpointError(f"{at}: 'part' must be an integer in [0, {parts}), got {part!r}")
  if kind == "array":
    return
  for key in ("scheme", "axes", "block_size", "dtype", "zero_point"):
    if key not in e:
      raise CheckpointError(f"{at}: missing {key!r}")
  scheme = e["scheme"]
  if scheme not in schemes.SCHEMES:
    raise CheckpointError(f"{at}: unknown scheme {scheme!r}")
  axes = e["axes"]
  if not isinstance(axes, list) or not all(_is_int(a) and a < 0 for a in axes):
    raise CheckpointError(f"{at}: 'axes' must be a list of negative integers, got {axes!r}")
  if len(set(axes)) != len(axes):
    raise CheckpointError(f"{at}: repeated axes {axes!r}")
  block = e["block_size"]
  if scheme in options.BLOCK_SCHEMES:
    if not _is_int(block) or block < 1:
      raise CheckpointError(f"{at}: 'block_size' must be a positive integer, got {block!r}")
    if len(axes) != 1:
      raise CheckpointError(f"{at}: a {scheme} leaf has one block axis, got {axes!r}")
  elif block is not None:
    raise CheckpointError(f"{at}: 'block_size' must be null for {scheme}, got {block!r}")
  if e["dtype"] not in _FLOAT_DTYPES:
    raise CheckpointError(f"{at}: 'dtype' must be one of {', '.join(_FLOAT_DTYPES)}")
  if e["zero_point"] is not (scheme in options.ASYMMETRIC_SCHEMES):
    raise CheckpointError(f"{at}: 'zero_point' does not match scheme {scheme}")
  if scheme in options.INT4_SCHEMES:
    if block % 2:
      raise CheckpointError(f"{at}: an int4 group size must be even, got {block!r}")
    shape = e.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
      raise CheckpointError(f"{at}: 'shape' must be a list of sizes for {scheme}")
  elif "shape" in e:
    raise CheckpointError(f"{at}: 'shape' is only for the int4 schemes")
  for key in ("input_scale", "offset", "perm"):
    if e.get(key, False) is not True and key in e:
      raise CheckpointError(f"{at}: {key!r} must be true when present")


def read_spec(path: str | os.PathLike) -> dict:
  """The ``sensorquant.json`` of a quantized checkpoint, validated.

  Raises:
    CheckpointError: missing, not a checkpoint, too large, not JSON, or any
      field of the wrong type, range or consistency (named with the leaf).
  """
  path = os.fspath(path)
  distributed.agree(lambda: fileio.recover_dir(os.path.abspath(path)))
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file or folder")
  if not os.path.isdir(path):
    raise CheckpointError(f"{path} is not a sensorquant checkpoint (not a folder)")
  spec_path = os.path.join(path, SPEC_FILE)
  try:
    if os.path.getsize(spec_path) > _MAX_SPEC_BYTES:
      raise CheckpointError(f"{spec_path} is too large")
    with open(spec_path, "rb") as f:
      doc = json.loads(f.read(), parse_constant=_reject_constant)
  except FileNotFoundError:
    raise CheckpointError(f"{path} is not a sensorquant checkpoint (no {SPEC_FILE})") from None
  except RecursionError:
    raise CheckpointError(f"{spec_path}: JSON nested too deeply") from None
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{spec_path}: {fileio.first_line(e)}") from None
  if not isinstance(doc, dict) or doc.get("format") != FORMAT:
    got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
    raise CheckpointError(f"{spec_path}: unknown format {str(got)[:80]!r}")
  if not isinstance(doc.get("metadata", {}), dict):
    raise CheckpointError(f"{spec_path}: 'metadata' must be an object")
  parts = doc.get("parts")
  if not _is_int(parts) or parts < 0:
    raise CheckpointError(f"{spec_path}: 'parts' must be a non-negative integer")
  leaves = doc.get("leaves")
  if not isinstance(leaves, list):
    raise CheckpointError(f"{spec_path}: malformed leaf list")
  digest = doc.get("leaves_sha256")
  try:
    actual = _leaves_digest(leaves) if digest is not None else None
  except (ValueError, RecursionError):
    raise CheckpointError(f"{spec_path}: malformed leaf list") from None
  if digest != actual:
    # Checkpoints written since the digest was added carry it; a mismatch
    # means the leaf records were edited or damaged, and values would be wrong.
    raise CheckpointError(f"{spec_path}: the leaf records do not match their checksum")
  for i, entry in enumerate(leaves):
    _validate_entry(i, entry, parts, spec_path)
  try:
    tree_paths.check_paths([entry["path"] for entry in leaves])
  except ValueError as err:
    raise CheckpointError(f"{spec_path}: {err}") from None
  return doc


def _leaves_digest(leaves: list) -> str:
  text = json.dumps(leaves, sort_keys=True, separators=(",", ":"), allow_nan=False)
  return hashlib.sha256(text.encode()).hexdigest()


def _reject_constant(name: str):
  raise ValueError(f"{name} is not valid JSON")


def _check_qarray(e: dict, group: dict, where: str) -> None:
  """The arrays read for a QArray leaf agree with its record."""
  values, scale, zp = group.get("values"), group.get("scale"), group.get("zero_point")
  if values is None or scale is None or (e["zero_point"] and zp is None):
    raise CheckpointError(f"{where}: arrays are missing")
  int4 = e["scheme"] in options.INT4_SCHEMES
  kind = "uint8" if int4 else "float8_e4m3fn" if e["scheme"] in options.FP8_SCHEMES else "int8"
  if np.dtype(values.dtype) != np.dtype(kind) or np.dtype(scale.dtype) != np.float32:
    raise CheckpointError(
      f"{where}: expected {kind} values and float32 scales, got {values.dtype} and {scale.dtype}"
    )
  n = values.ndim
  axes = e["axes"]
  if any(a < -n for a in axes):
    raise CheckpointError(f"{where}: axes {axes} do not fit values of rank {n}")
  per_tensor = (schemes.PER_TENSOR, options.FP8_PER_TENSOR)
  if e["scheme"] in per_tensor and sorted(axes) != list(range(-n, 0)):
    raise CheckpointError(f"{where}: a per-tensor leaf reduces every axis, got {axes}")
  logical = list(values.shape)
  if int4:
    logical = list(e["shape"])
    stored = list(logical)
    if len(logical) == n:
      stored[axes[0]] = (logical[axes[0]] + 1) // 2
    if len(logical) != n or stored != list(values.shape):
      raise CheckpointError(
        f"{where}: int4 values {tuple(values.shape)} do not fit shape {tuple(logical)}"
      )
  want = list(values.shape)
  for a in axes:
    if e["scheme"] in options.BLOCK_SCHEMES:
      want[a] = -(-logical[a] // e["block_size"]) if logical[a] else 1
    else:
      want[a] = 1
  if list(scale.shape) != want:
    raise CheckpointError(
      f"{where}: scale shape {tuple(scale.shape)} does not fit values {tuple(values.shape)} "
      f"with axes {axes}" + (f" and block size {e['block_size']}" if e["block_size"] else "")
    )
  if e.get("input_scale"):
    s = group.get("input_scale")
    if s is None:
      raise CheckpointError(f"{where}: arrays are missing")
    if (
      np.dtype(s.dtype) != np.float32
      or s.ndim != len(logical)
      or any(d not in (1, n) for d, n in zip(s.shape, logical, strict=True))
    ):
      raise CheckpointError(
        f"{where}: input scale {s.dtype}{tuple(s.shape)} does not fit shape {tuple(logical)}"
      )
  if zp is not None and (list(zp.shape) != want or np.dtype(zp.dtype) != np.int8):
    raise CheckpointError(f"{where}: zero point shape or dtype does not match the scale")
  if e.get("offset"):
    o = group.get("offset")
    if o is None or list(o.shape) != want or np.dtype(o.dtype) != np.float32:
      raise CheckpointError(f"{where}: offset missing, or its shape or dtype not the scale's")
  if e.get("perm"):
    p = group.get("perm")
    n_block = logical[axes[0]] if e["block_size"] else -1
    if p is None or tuple(p.shape) != (n_block,) or np.dtype(p.dtype) != np.int32:
      raise CheckpointError(f"{where}: perm missing, or not int32 [{n_block}]")
    if not np.array_equal(np.sort(np.asarray(p)), np.arange(n_block)):
      raise CheckpointError(f"{where}: perm is not a permutation of the block axis")


def restore(path: str | os.PathLike, like: Any = None) -> Any:
  """Restores a tree saved by :func:`save`.

  Everything read is checked against the spec (array dtypes, scale shapes for
  the recorded scheme, axes and block size), so an edited or damaged
  checkpoint raises instead of returning wrong values.

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
  import orbax.checkpoint as ocp

  user_path = os.fspath(path)
  path = os.path.abspath(user_path)
  doc = read_spec(path)
  spec = doc["leaves"]
  names = {_leaf_key(i): e["path"] for i, e in enumerate(spec)}
  targets: dict[int, dict] | None = None
  if like is not None:
    like_leaves, like_def = jax.tree_util.tree_flatten_with_path(like, is_leaf=is_qarray)
    if [path_str(p) for p, _ in like_leaves] != [e["path"] for e in spec]:
      raise CheckpointError(f"{user_path}: `like` does not have the saved tree's leaves")
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
        if x.input_scale is not None:
          group["input_scale"] = _abstract(x.input_scale)
        if x.offset is not None:
          group["offset"] = _abstract(x.offset)
        if x.perm is not None:
          group["perm"] = _abstract(x.perm)
      else:
        group = {"value": _abstract(x)}
      targets.setdefault(e["part"], {})[_leaf_key(i)] = group
  arrays: dict[str, Any] = {}
  for k in sorted({e["part"] for e in spec if e["kind"] != "json"}):
    folder = os.path.join(path, "arrays", _part_dir(k))
    try:
      try:
        part = ocp.StandardCheckpointer().restore(folder, None if targets is None else targets[k])
      except ValueError as e:
        if targets is not None or "topology" not in str(e).lower():
          raise
        # Saved on other devices (another process count or mesh) and no `like`: one
        # whole copy per process.
        part = ocp.StandardCheckpointer().restore(folder, _here(ocp, folder))
    except Exception as e:  # Orbax raises many types for a damaged folder
      message = _LEAF_RE.sub(
        lambda m: repr(names.get(m.group(0), m.group(0))), fileio.first_line(e)
      )
      raise CheckpointError(f"{user_path}: cannot read arrays: {message}") from None
    if not isinstance(part, dict):
      raise CheckpointError(f"{user_path}: part {k} is not a mapping")
    arrays.update(part)
  out = []
  for i, rec in enumerate(spec):
    if rec["kind"] == "json":
      out.append(rec["value"])
      continue
    where = f"{user_path}: leaf {rec['path']!r}"
    found = arrays.get(_leaf_key(i))
    if not isinstance(found, dict):
      raise CheckpointError(f"{where}: arrays are missing")
    group = found
    if rec["kind"] == "array":
      if "value" not in group:
        raise CheckpointError(f"{where}: arrays are missing")
      out.append(group["value"])
      continue
    _check_qarray(rec, group, where)
    out.append(
      QArray(
        group["values"],
        group["scale"],
        group.get("zero_point"),
        rec["scheme"],
        tuple(rec["axes"]),
        rec["block_size"],
        np.dtype(rec["dtype"]),
        rec["shape"][rec["axes"][0]] % 2 if "shape" in rec else 0,
        group.get("input_scale") if rec.get("input_scale") else None,
        group.get("offset") if rec.get("offset") else None,
        group.get("perm") if rec.get("perm") else None,
      )
    )
  if like is not None:
    return jax.tree_util.tree_unflatten(like_def, out)
  return tree_paths.nest([e["path"] for e in spec], out)


def _here(ocp: Any, folder: str) -> Any:
  """Restore targets for an Orbax part saved elsewhere: its shapes and dtypes, each array
  whole on the first device of every process."""
  devices = [min(jax.local_devices(p), key=lambda d: d.id) for p in range(jax.process_count())]
  where = jax.sharding.NamedSharding(
    jax.sharding.Mesh(np.array(devices), ("processes",)), jax.sharding.PartitionSpec()
  )
  tree = ocp.StandardCheckpointer().metadata(folder).item_metadata.tree

  def one(m):
    return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=where)

  return jax.tree.map(one, tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def _abstract(x):
  sharding = getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


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
      import orbax.checkpoint as ocp

      tree = ocp.StandardCheckpointer().restore(os.path.abspath(path))
      for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield path_str(p), np.asarray(x)
      return
    lower = path.lower()
    if lower.endswith(".npz"):
      with np.load(path, allow_pickle=False) as data:
        _check_keys(path, data.files)
        for key in data.files:
          yield key, _read_member(path, key, lambda k=key: data[k])
      return
    if lower.endswith(".safetensors"):
      try:
        from safetensors import safe_open
      except ImportError:
        raise CheckpointError("reading .safetensors needs the safetensors package") from None
      with safe_open(path, framework="numpy") as f:
        keys = list(f.keys())
        _check_keys(path, [k.replace(".", "/") for k in keys])
        for key in keys:
          yield key.replace(".", "/"), _read_member(path, key, lambda k=key: f.get_tensor(k))
      return
    if lower.endswith((".msgpack", ".flax")):
      from flax import serialization

      with open(path, "rb") as f:
        tree = serialization.msgpack_restore(f.read())
      for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield path_str(p), np.asarray(x)
      return
  except CheckpointError:
    raise
  except Exception as e:  # corrupt zip, msgpack, Orbax metadata, ...
    raise CheckpointError(f"{path}: cannot read checkpoint: {fileio.first_line(e)}") from None
  raise CheckpointError(
    f"{path}: unknown checkpoint format (expected an Orbax folder, .msgpack, .npz or .safetensors)"
  )


_SAFETENSORS_DTYPES = {
  "F64": "float64",
  "F32": "float32",
  "F16": "float16",
  "BF16": "bfloat16",
  "I64": "int64",
  "I32": "int32",
  "I16": "int16",
  "I8": "int8",
  "U8": "uint8",
  "BOOL": "bool",
  "F8_E4M3": "float8_e4m3fn",
}

Region = Callable[[tuple[slice, ...]], np.ndarray]


def iter_float_regions(
  path: str | os.PathLike,
) -> Iterator[tuple[str, tuple[int, ...], np.dtype, Region]]:
  """Yields ``(path, shape, dtype, read)`` per leaf of a float checkpoint, ``read(index)``
  returning the region ``index`` (a tuple of slices) of the leaf.

  From a ``.safetensors`` file only the rows of the region are read (plain
  reads, no memory map, so what a process holds is what it asked for: this is
  what lets processes each read their share of a checkpoint); other formats
  read the leaf whole, as :func:`iter_float_leaves` does, and slice it.

  Raises:
    CheckpointError: unknown format, or a corrupt or unreadable file.
  """
  path = os.fspath(path)
  if not (path.lower().endswith(".safetensors") and os.path.isfile(path)):
    for name, x in iter_float_leaves(path):
      yield name, tuple(x.shape), x.dtype, _slicer(x)
    return
  for key, shape, dtype, offset in safetensors_file_index(path):

    def read(region, key=key, shape=shape, dtype=dtype, offset=offset):
      # Opened per read: a reader stays valid after the iteration moves on.
      return read_safetensors_region(path, key, shape, dtype, offset, region)

    yield key.replace(".", "/"), shape, dtype, read


_MAX_SAFETENSORS_HEADER = 100 << 20


def safetensors_file_index(path: str) -> list[tuple[str, tuple[int, ...], np.dtype, int]]:
  """:func:`safetensors_index` of the file at ``path`` (opened and closed here)."""
  try:
    with open(path, "rb") as f:
      return safetensors_index(path, f.fileno())
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None


def read_safetensors_region(
  path: str,
  key: str,
  shape: tuple[int, ...],
  dtype: np.dtype,
  offset: int,
  region: tuple[slice, ...] = (),
) -> np.ndarray:
  """The region of a tensor indexed by :func:`safetensors_file_index` (its rows read)."""
  try:
    with open(path, "rb") as f:
      return read_rows(path, f.fileno(), key, shape, dtype, offset, region)
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None


def safetensors_index(path: str, fd: int) -> list[tuple[str, tuple[int, ...], np.dtype, int]]:
  """``(name, shape, dtype, file offset)`` of every tensor, the header checked strictly."""
  bad = f"{path}: not a valid .safetensors file"
  size = os.fstat(fd).st_size
  head = os.pread(fd, 8, 0)
  if len(head) < 8:
    raise CheckpointError(f"{bad} (shorter than its header)")
  (n,) = struct.unpack("<Q", head)
  if n > min(_MAX_SAFETENSORS_HEADER, size - 8):
    raise CheckpointError(f"{bad} (header of {n} bytes)")
  try:
    header = json.loads(os.pread(fd, n, 8), parse_constant=_reject_constant)
  except (ValueError, RecursionError) as e:
    raise CheckpointError(f"{bad} ({fileio.first_line(e)})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{bad} (the header is not an object)")
  data = size - 8 - n
  out = []
  for key, entry in header.items():
    if key == "__metadata__":
      continue
    where = f"{path}: tensor {key!r}"
    if not isinstance(entry, dict):
      raise CheckpointError(f"{where}: not an object")
    kind = _SAFETENSORS_DTYPES.get(str(entry.get("dtype")))
    shape, span = entry.get("shape"), entry.get("data_offsets")
    if kind is None:
      raise CheckpointError(f"{where}: unsupported dtype {str(entry.get('dtype'))[:40]!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
      raise CheckpointError(f"{where}: 'shape' must be a list of sizes")
    if (
      not isinstance(span, list)
      or len(span) != 2
      or not all(_is_int(o) for o in span)
      or not 0 <= span[0] <= span[1] <= data
    ):
      raise CheckpointError(f"{where}: 'data_offsets' outside the file's {data} data bytes")
    dtype = np.dtype(jax.numpy.dtype(kind))
    if span[1] - span[0] != int(np.prod(shape, dtype=object)) * dtype.itemsize:
      raise CheckpointError(f"{where}: {span[1] - span[0]} bytes do not hold {kind}{shape}")
    out.append((key, tuple(shape), dtype, 8 + n + span[0]))
  _check_keys(path, [k.replace(".", "/") for k, *_ in out])
  return out


def read_rows(
  path: str,
  fd: int,
  key: str,
  shape: tuple[int, ...],
  dtype: np.dtype,
  offset: int,
  index: tuple[slice, ...],
) -> np.ndarray:
  """The region ``index`` of a tensor stored at ``offset``: its rows read, then sliced."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  if not shape:
    buf = os.pread(fd, dtype.itemsize, offset)
    if len(buf) != dtype.itemsize:
      raise CheckpointError(f"{path}: tensor {key!r} is cut short")
    return np.frombuffer(buf, dtype).reshape(()).copy()
  lo, hi, step = index[0].indices(shape[0])
  if step == 1:  # a run of rows (what splitting between processes asks for)
    hi, rest = max(lo, hi), (slice(None),) + index[1:]
  else:
    lo, hi, rest = 0, shape[0], index
  row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
  count = (hi - lo) * row
  buf = os.pread(fd, count, offset + lo * row) if count else b""
  if len(buf) != count:
    raise CheckpointError(f"{path}: tensor {key!r} is cut short")
  return np.frombuffer(buf, dtype).reshape((hi - lo, *shape[1:]))[rest]


def _slicer(x: np.ndarray) -> Region:
  def read(index: tuple[slice, ...]) -> np.ndarray:
    return x[index]

  return read


def _check_keys(path: str, keys: list[str]) -> None:
  try:
    tree_paths.check_paths(keys)
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from None


def _read_member(path: str, key: str, read) -> np.ndarray:
  try:
    return read()
  except Exception as e:  # zip, format and decompression errors of every kind
    raise CheckpointError(f"{path}: cannot read {key!r}: {fileio.first_line(e)}") from None


def load_float(path: str | os.PathLike) -> dict:
  """A float checkpoint as a nested dict of numpy arrays (see :func:`iter_float_leaves`)."""
  items = list(iter_float_leaves(path))
  try:
    return tree_paths.nest([k for k, _ in items], [v for _, v in items])
  except ValueError as e:
    raise CheckpointError(f"{os.fspath(path)}: {e}") from None
