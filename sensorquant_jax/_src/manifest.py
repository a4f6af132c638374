"""The Rust ``sensorlm`` INT8 manifest: a numpy port of ``int8.rs``, byte-exact I/O.

Same names and semantics as the Rust module (``LayerCalibration``,
``QuantizedWeights``, ``QuantizedModel``, ``Calibrator``,
``quantize_model_weights``, ``fp32_to_fp16_bits``, ``fp16_bits_to_fp32``),
backed by numpy arrays. ``QuantizedModel.save`` writes exactly the bytes
``serde_json::to_string_pretty`` writes; ``QuantizedModel.load`` validates
everything and raises :class:`ManifestError` (never another exception type)
naming the layer and field.

Differences from the Rust module, all on the side of refusing bad data:
``weights_i8`` must lie in [-127, 127] (Rust accepts any i32), scales must be
finite and > 0, ``len(weights_i8)`` must equal the product of ``shape``, totals
must agree with the layers, a 2-D layer's bias must have ``shape[0]`` entries
(``check_bias=False`` turns that one off), and ``save`` refuses the NaN/Inf
values that Rust would write as an unloadable ``null``.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import mmap
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from sensorquant_jax._src import fileio, manifest_parser, manifest_writer
from sensorquant_jax._src.calibration import LayerCalibration
from sensorquant_jax._src.manifest_format import MAX_RANK, U64_MAX, ManifestError
from sensorquant_jax._src.options import MIN_SCALE, PER_TENSOR

SCHEME = PER_TENSOR
_MMAP_MIN = 1 << 24


# ---------------------------------------------------------------------------
# Arithmetic, as int8.rs does it (numpy: IEEE float32, no reciprocal rewrite).
# ---------------------------------------------------------------------------


def _round_half_away(y: np.ndarray) -> np.ndarray:
  """f32::round: half away from zero (``y - trunc(y)`` is exact in float32)."""
  t = np.trunc(y)
  frac = y - t
  return t + np.where(np.abs(frac) >= np.float32(0.5), np.sign(y), np.float32(0))


@dataclasses.dataclass(eq=False)
class QuantizedWeights:
  """INT8 weights of one layer: row-major ``[out_features, in_features]``.

  Attributes:
    name: layer name.
    weights_i8: int8 values, row-major, ``prod(shape)`` of them.
    shape: ``[out_features, in_features]`` (any rank is stored as given).
    scale: per-tensor float32 scale.
    bias: optional float32 bias.
  """

  name: str
  weights_i8: np.ndarray
  shape: tuple[int, ...]
  scale: np.float32
  bias: np.ndarray | None = None

  def __post_init__(self):
    self.weights_i8 = np.asarray(self.weights_i8)
    self.shape = tuple(int(d) for d in self.shape)
    self.scale = np.float32(self.scale)
    if self.bias is not None:
      self.bias = np.asarray(self.bias, np.float32).reshape(-1)

  @classmethod
  def from_f32(
    cls,
    name: str,
    w: Any,
    shape: Sequence[int],
    bias: Any = None,
    scale: float | None = None,
  ) -> QuantizedWeights:
    """Quantizes float32 weights exactly as ``QuantizedWeights::from_f32``.

    Rust semantics are kept: NaN weights are ignored by the max and become 0,
    an Inf weight gives an infinite scale (which :meth:`QuantizedModel.save`
    then refuses). Use :func:`sensorquant_jax.quantize` for checked input.

    Raises:
      ManifestError: ``len(w)`` differs from ``prod(shape)``.
    """
    w = np.asarray(w, np.float32).reshape(-1)
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape) or math.prod(shape) != w.size:
      raise ManifestError(f"layer {name!r}: {w.size} weights do not fit shape {list(shape)}")
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
      max_abs = np.fmax.reduce(np.abs(w), initial=np.float32(0)) if w.size else np.float32(0)
      s = np.float32(max_abs / np.float32(127)) if scale is None else np.float32(scale)
      s = np.fmax(s, MIN_SCALE)
      y = w / s
      q = np.clip(_round_half_away(y), -127, 127)
      q = np.where(np.isnan(q), 0, q).astype(np.int8)
    return cls(name, q, shape, np.float32(s), None if bias is None else np.asarray(bias))

  def dequantize(self) -> np.ndarray:
    """``q as f32 * scale``, float32, row-major (flat, like the Rust Vec)."""
    with np.errstate(over="ignore"):
      return self.weights_i8.astype(np.float32) * self.scale

  def size_bytes(self) -> int:
    return int(self.weights_i8.size)

  def original_size_bytes(self) -> int:
    return int(self.weights_i8.size) * 4

  def compression_ratio(self) -> np.float32:
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.float32(np.float32(self.original_size_bytes()) / np.float32(self.size_bytes()))

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, QuantizedWeights):
      return NotImplemented
    same_bias = (self.bias is None and other.bias is None) or (
      self.bias is not None
      and other.bias is not None
      and np.array_equal(self.bias.view(np.uint32), other.bias.view(np.uint32))
    )
    return (
      self.name == other.name
      and self.shape == other.shape
      and np.float32(self.scale).view(np.uint32) == np.float32(other.scale).view(np.uint32)
      and np.array_equal(self.weights_i8, other.weights_i8)
      and same_bias
    )


@dataclasses.dataclass(eq=False)
class QuantizedModel:
  """All quantized layers of a model: the manifest ``save``/``load`` read and write."""

  config_json: str
  layers: list[QuantizedWeights]
  scheme: str = SCHEME
  total_quantized_bytes: int = 0
  total_fp32_bytes: int = 0

  def compression_ratio(self) -> np.float32:
    """``total_fp32_bytes as f32 / max(total_quantized_bytes, 1) as f32``."""
    return np.float32(
      np.float32(self.total_fp32_bytes) / np.float32(max(self.total_quantized_bytes, 1))
    )

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, QuantizedModel):
      return NotImplemented
    return (
      self.config_json == other.config_json
      and self.scheme == other.scheme
      and self.total_quantized_bytes == other.total_quantized_bytes
      and self.total_fp32_bytes == other.total_fp32_bytes
      and len(self.layers) == len(other.layers)
      and all(a == b for a, b in zip(self.layers, other.layers, strict=True))
    )

  def validate(self, *, check_bias: bool = True) -> None:
    """Raises :class:`ManifestError` for anything ``load`` would refuse."""
    if not isinstance(self.config_json, str) or not isinstance(self.scheme, str):
      raise ManifestError("config_json and scheme must be strings")
    total = 0
    for i, layer in enumerate(self.layers):
      _check_layer(i, layer, check_bias)
      total += layer.size_bytes()
    for field, want in (("total_quantized_bytes", total), ("total_fp32_bytes", 4 * total)):
      got = getattr(self, field)
      if not isinstance(got, (int, np.integer)) or got != want:
        raise ManifestError(f"{field} is {got}, but the layers hold {want}")

  def save(
    self,
    path: str | os.PathLike,
    *,
    check_bias: bool = True,
    fsync: bool = True,
    overwrite: bool = False,
  ) -> None:
    """Writes the manifest exactly as ``QuantizedModel::save`` does, atomically.

    The bytes go to a unique temporary file in the same folder, which is
    flushed, fsynced (unless ``fsync=False``) and renamed over ``path``: a
    crash leaves the old file intact, and concurrent savers never tear it.

    Args:
      path: the JSON file to write.
      check_bias: require ``len(bias) == shape[0]`` for 2-D layers.
      fsync: make the write durable before returning.
      overwrite: allow replacing an existing manifest (Rust's ``save``
        always overwrites; we refuse unless asked, and never replace a file
        that is not a manifest).

    Raises:
      ManifestError: the model is invalid or holds values Rust writes as ``null``.
      DestinationError: ``path`` is a folder, another kind of file, or a
        manifest while ``overwrite`` is False.
    """
    self.validate(check_bias=check_bias)
    user_path = os.fspath(path)
    target = fileio.check_file_destination(
      user_path, overwrite=overwrite, is_ours=is_manifest_file, kind="manifest"
    )
    try:
      fileio.write_file_atomic(
        target, lambda f: manifest_writer.write_pipelined(f, self._pieces()), fsync=fsync
      )
    except OSError as e:
      raise ManifestError(f"cannot write {user_path}: {e.strerror or e}") from None

  def dumps(self, *, check_bias: bool = True) -> bytes:
    """The manifest's bytes (what :meth:`save` writes)."""
    self.validate(check_bias=check_bias)
    return b"".join(self._pieces())

  def _pieces(self) -> Iterable[bytes]:
    return manifest_writer.pieces(self)

  @classmethod
  def load(
    cls, path: str | os.PathLike, *, check_bias: bool = True, max_bytes: int | None = None
  ) -> QuantizedModel:
    """Reads and validates a manifest written by the Rust module or by :meth:`save`.

    Memory stays bounded by the file: the file is read once, weights are
    parsed in vectorised batches straight into int8 arrays, and no array is
    allocated from a size the file merely claims.

    Args:
      path: the JSON file.
      check_bias: require ``len(bias) == shape[0]`` for 2-D layers.
      max_bytes: refuse larger files (default: no limit beyond the file).

    Raises:
      ManifestError: for any problem, naming the layer and field.
    """
    try:
      with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
          raise ManifestError(f"{path}: {size} bytes exceeds max_bytes={max_bytes}")
        if size < _MMAP_MIN:
          data: bytes | mmap.mmap = f.read()
        else:
          # Large files are mapped, not copied (2x faster). Every parser
          # worker has finished before loads() returns or raises, so nothing
          # touches the mapping after an error; it is closed before we return.
          data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except IsADirectoryError:
      raise ManifestError(f"cannot read {path}: it is a folder") from None
    except OSError as e:
      raise ManifestError(f"cannot read {path}: {e.strerror or e}") from None
    message = None
    try:
      return cls.loads(data, check_bias=check_bias)
    except ManifestError as e:
      message = str(e)  # re-raised below, once no frame holds a view of the map
    finally:
      if isinstance(data, mmap.mmap):
        _close_map(data)
    raise ManifestError(f"{path}: {message}")

  @classmethod
  def loads(cls, data: bytes | str | mmap.mmap, *, check_bias: bool = True) -> QuantizedModel:
    """Parses manifest text (see :meth:`load`)."""
    if isinstance(data, str):
      try:
        data = data.encode("utf-8")
      except UnicodeEncodeError as e:
        raise ManifestError(f"invalid text: {e}") from None
    try:
      parsed = manifest_parser.Parser(data).parse_model()
      layers = [QuantizedWeights(*layer) for layer in parsed["layers"]]
      model = cls(
        parsed["config_json"],
        layers,
        parsed["scheme"],
        parsed["total_quantized_bytes"],
        parsed["total_fp32_bytes"],
      )
    except ManifestError:
      raise
    except RecursionError:
      raise ManifestError("JSON nested too deeply") from None
    except (ValueError, TypeError, OverflowError, IndexError, KeyError) as e:
      raise ManifestError(f"invalid manifest: {e}") from None
    model.validate(check_bias=check_bias)
    return model


def _close_map(data: mmap.mmap) -> None:
  """Closes a map; views still held by an exception's frames are collected first."""
  try:
    data.close()
  except BufferError:
    gc.collect()
    try:
      data.close()
    except BufferError:
      pass  # unreachable views only; no parser thread reads the map any more


def is_manifest_file(path: str | os.PathLike) -> bool:
  """Whether ``path`` looks like a manifest (a JSON object with manifest keys
  near its start): what ``save(..., overwrite=True)`` may replace."""
  return fileio.file_starts_with(
    os.fspath(path), b"{", (b'"config_json"', b'"layers"', b'"total_quantized_bytes"')
  )


def _check_layer(i: int, layer: QuantizedWeights, check_bias: bool) -> None:
  where = f"layer {i} ({layer.name!r})" if isinstance(layer.name, str) else f"layer {i}"
  if not isinstance(layer.name, str):
    raise ManifestError(f"{where}: name must be a string")
  w = layer.weights_i8
  if w.ndim != 1 and w.size:
    w = w.reshape(-1)
  if not np.issubdtype(w.dtype, np.integer):
    raise ManifestError(f"{where}: weights_i8 must be integers, got {w.dtype}")
  if w.size and (int(w.min()) < -127 or int(w.max()) > 127):
    raise ManifestError(f"{where}: weights_i8 holds values outside [-127, 127]")
  if len(layer.shape) > MAX_RANK:
    raise ManifestError(f"{where}: shape has {len(layer.shape)} entries (at most {MAX_RANK})")
  if any(d < 0 for d in layer.shape):
    raise ManifestError(f"{where}: shape {list(layer.shape)} has a negative entry")
  if any(d > U64_MAX for d in layer.shape):
    raise ManifestError(f"{where}: shape entry exceeds u64")
  if math.prod(layer.shape) != w.size:
    raise ManifestError(
      f"{where}: weights_i8 has {w.size} values but shape {list(layer.shape)} "
      f"needs {math.prod(layer.shape)}"
    )
  s = np.float32(layer.scale)
  if not np.isfinite(s) or s <= 0:
    raise ManifestError(f"{where}: scale must be finite and > 0, got {s}")
  if layer.bias is not None:
    if not np.all(np.isfinite(layer.bias)):
      raise ManifestError(f"{where}: bias holds NaN or Inf (Rust would write null)")
    if check_bias and len(layer.shape) == 2 and layer.bias.size != layer.shape[0]:
      raise ManifestError(
        f"{where}: bias has {layer.bias.size} values but out_features is {layer.shape[0]}"
      )


# ---------------------------------------------------------------------------
# The rest of int8.rs's public surface.
# ---------------------------------------------------------------------------


class Calibrator:
  """Records per-layer weight min/max (``int8.rs``'s weight-only calibrator).

  Activation ranges are the Rust module's placeholders (-1, 1); use
  :func:`sensorquant_jax.calibrate` for measured ones.
  """

  def __init__(self):
    self._calibrations: list[LayerCalibration] = []

  def record_layer(self, name: str, weights: Any) -> None:
    w = np.asarray(weights, np.float32).reshape(-1)
    with np.errstate(invalid="ignore"):
      w_min = np.fmin.reduce(w, initial=np.float32(np.inf))
      w_max = np.fmax.reduce(w, initial=np.float32(-np.inf))
    self._calibrations.append(LayerCalibration(name, float(w_min), float(w_max), -1.0, 1.0))

  def finish(self) -> list[LayerCalibration]:
    out, self._calibrations = self._calibrations, []
    return out


def quantize_model_weights(
  config_json: str, layers: Iterable[tuple[str, Any, Sequence[int], Any]]
) -> QuantizedModel:
  """Quantizes ``(name, weights, shape, bias)`` tuples into a :class:`QuantizedModel`."""
  out, total = [], 0
  for name, weights, shape, bias in layers:
    qw = QuantizedWeights.from_f32(name, weights, shape, bias, None)
    total += qw.size_bytes()
    out.append(qw)
  return QuantizedModel(config_json, out, SCHEME, total, 4 * total)


def fp32_to_fp16_bits(weights: Any) -> np.ndarray:
  """float32 -> IEEE half bits (uint16), round to nearest even, as ``half::f16::from_f32``."""
  w = np.asarray(weights, np.float32).reshape(-1)
  with np.errstate(over="ignore", invalid="ignore"):
    bits = w.astype(np.float16).view(np.uint16).copy()
  nan = np.isnan(w)
  if np.any(nan):
    u = w.view(np.uint32)[nan]
    bits[nan] = ((u >> 16) & 0x8000) | 0x7C00 | 0x0200 | ((u & 0x7FFFFF) >> 13)
  return bits


def fp16_bits_to_fp32(bits: Any) -> np.ndarray:
  """IEEE half bits -> float32 (exact), as ``half::f16::to_f32``."""
  b = np.asarray(bits, np.uint16).reshape(-1)
  out = b.view(np.float16).astype(np.float32)
  nan = (b & 0x7C00 == 0x7C00) & (b & 0x03FF != 0)
  if np.any(nan):
    u = b[nan].astype(np.uint32)
    out[nan] = (((u & 0x8000) << 16) | 0x7FC00000 | ((u & 0x03FF) << 13)).view(np.float32)
  return out
