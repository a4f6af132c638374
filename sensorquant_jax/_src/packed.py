"""The packed inference layout (column tiles) and the ``[K, N]`` view of kernels."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sensorquant_jax._src import native, schemes
from sensorquant_jax._src.native import WO_TARGET
from sensorquant_jax._src.qarray import QArray, is_qarray

DEFAULT_TILE = 512  # measured best on a 2-core x86 CPU (benchmarks/bench_dense.py)


def auto_tile(tile: int | str | None) -> int | None:
  """Column tiling helps XLA:CPU, which would otherwise build a float copy of the
  weight; XLA:GPU/TPU fuse the int8 convert into the GEMM, so they get one dot."""
  if tile == "auto":
    return DEFAULT_TILE if jax.default_backend() == "cpu" else None
  if tile is not None and not isinstance(tile, int):
    raise ValueError(f"tile must be an integer, None or 'auto', got {tile!r}")
  return tile


def untile(tiles: jax.Array) -> jax.Array:
  """Column tiles ``[N / T, K, T]`` back to one ``[K, N]`` matrix."""
  nt, k, t = tiles.shape
  return jnp.transpose(tiles, (1, 0, 2)).reshape(k, nt * t)


@struct.dataclass
class PackedQArray:
  """A 2-D int8 kernel ``[K, N]`` stored as column tiles ``[N // tile, K, tile]``.

  The inference layout made by :func:`pack`: each tile is one contiguous
  block, so the weight-only op converts and multiplies one tile at a time
  instead of building a float copy of the whole kernel. ``unpack`` returns the
  canonical :class:`QArray`; every op accepts both.

  Attributes:
    tiles: int8 ``[N // tile, K, tile]``.
    scale: float32 ``[1, N]`` (per-tensor scales are broadcast).
    zero_point: optional int8 ``[1, N]``.
    scheme, axes, dtype: the canonical QArray's static fields.
  """

  tiles: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None = None
  scheme: str = struct.field(pytree_node=False, default=schemes.PER_TENSOR)
  axes: tuple[int, ...] = struct.field(pytree_node=False, default=(-2, -1))
  dtype: Any = struct.field(pytree_node=False, default=np.dtype("float32"))

  @property
  def shape(self) -> tuple[int, ...]:
    nt, k, t = self.tiles.shape
    return (k, nt * t)

  @property
  def nbytes(self) -> int:
    total = int(self.tiles.nbytes) + int(self.scale.nbytes)
    return total + (int(self.zero_point.nbytes) if self.zero_point is not None else 0)

  def unpack(self) -> QArray:
    """The canonical :class:`QArray` (``[K, N]`` values, keepdims scales)."""
    values = untile(self.tiles)
    scale = self.scale[:, :1] if self.scheme == schemes.PER_TENSOR else self.scale
    return QArray(values, scale, self.zero_point, self.scheme, self.axes, None, self.dtype)

  def dequantize(self, dtype: Any = None) -> jax.Array:
    return self.unpack().dequantize(dtype)


def is_quantized(x: Any) -> bool:
  return isinstance(x, (QArray, PackedQArray))


@dataclasses.dataclass
class Matrix:
  """A quantized kernel seen as ``[K, N]`` with scales along N (or per K-block)."""

  values: jax.Array  # [K, N] int8, tiles [N/T, K, T], or int4 nibbles [ceil(K/2), N] uint8
  scale: jax.Array  # [1, N] or [nb, N]
  zero_point: jax.Array | None  # [1, N] or [nb, N] (int4)
  block: int | None
  tiled: bool = False
  bits: int = 8
  offset: jax.Array | None = None  # [1, N] or [nb, N] float32, added after scaling

  @property
  def fp8(self) -> bool:
    """Whether the values are ``float8_e4m3fn`` (the fp8 schemes)."""
    return self.values.dtype == jnp.float8_e4m3fn


def as_matrix(w: QArray | PackedQArray, n_in: int) -> Matrix | None:
  """Views a kernel whose first ``n_in`` axes are contracted as ``[K, N]``.

  Returns ``None`` when the scales vary along the contraction in a way that
  does not factor out of the matmul (the caller then dequantizes).
  """
  if isinstance(w, PackedQArray):
    if n_in != 1:
      return None
    return Matrix(w.tiles, w.scale, w.zero_point, None, tiled=True)
  shape = w.shape
  k = math.prod(shape[:n_in])
  n = math.prod(shape[n_in:])
  ndim = w.ndim
  reduced = {ndim + a for a in w.axes}
  if w.block_size is None:
    if not set(range(n_in)) <= reduced:
      return None  # per-channel along a contracted axis
    scale = jnp.broadcast_to(w.scale, (1,) * n_in + tuple(shape[n_in:])).reshape(1, n)
    zp = off = None
    if w.zero_point is not None:
      zp = jnp.broadcast_to(w.zero_point, (1,) * n_in + tuple(shape[n_in:])).reshape(1, n)
    if w.offset is not None:
      off = jnp.broadcast_to(w.offset, (1,) * n_in + tuple(shape[n_in:])).reshape(1, n)
    return Matrix(w.values.reshape(k, n), scale, zp, None, offset=off)
  (axis,) = reduced
  if n_in != 1 or axis != 0:
    return None
  values = w.values.reshape(-1, n)  # int4: [ceil(K / 2), N]
  nb = w.scale.shape[0]
  zp = None if w.zero_point is None else w.zero_point.reshape(nb, n)
  off = None if w.offset is None else w.offset.reshape(nb, n)
  return Matrix(values, w.scale.reshape(nb, n), zp, w.block_size, bits=w.bits, offset=off)


def tiles_of(values: jax.Array, tile: int) -> jax.Array | None:
  k, n = values.shape
  if n % tile or n == tile:
    return None
  return jnp.transpose(values.reshape(k, n // tile, tile), (1, 0, 2))


NATIVE_TILE = 64


"""Tile width :func:`pack` picks for the native kernels: each 64-column tile is
one contiguous stream of whole cache lines (measured: benchmarks/bench_dense.py)."""


def default_pack_tile() -> int:
  """:data:`NATIVE_TILE` where the native CPU kernel runs, else :data:`DEFAULT_TILE`."""
  if jax.default_backend() == "cpu" and WO_TARGET in native.ffi_targets():
    return NATIVE_TILE
  return DEFAULT_TILE


def pack(qparams: Any, tile: int | None = None) -> Any:
  """Converts 2-D per-tensor/per-channel int8 QArray kernels to :class:`PackedQArray`.

  Other leaves (and kernels the tiled op cannot use: other ranks, block or
  row-wise scales, an ``input_scale``, ``N`` not a multiple of ``tile``, fp8
  values, which the tiled integer kernels do not read) are returned unchanged.
  Cheap (one int8 transpose per kernel) and explicit; every op and
  :func:`sensorquant_jax.apply` accept packed and unpacked trees alike.

  Args:
    qparams: a tree with QArray leaves.
    tile: columns per tile; default :func:`default_pack_tile` (64 for the
      native CPU kernels, 512 for the XLA path).
  """
  if tile is None:
    tile = default_pack_tile()

  def one(x):
    if not is_qarray(x) or x.ndim != 2 or x.block_size is not None or x.input_scale is not None:
      return x
    if x.offset is not None:
      return x
    if x.scheme in schemes.FP8_SCHEMES:
      return x
    m = as_matrix(x, 1)
    if m is None or x.shape[1] % tile or x.shape[1] == tile:
      return x
    tiles = tiles_of(m.values, tile)
    return PackedQArray(tiles, m.scale, m.zero_point, x.scheme, x.axes, x.dtype)

  return jax.tree_util.tree_map(one, qparams, is_leaf=is_qarray)


def unpack(qparams: Any) -> Any:
  """Inverse of :func:`pack`."""
  return jax.tree_util.tree_map(
    lambda x: x.unpack() if isinstance(x, PackedQArray) else x,
    qparams,
    is_leaf=lambda x: isinstance(x, PackedQArray),
  )
