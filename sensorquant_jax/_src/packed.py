"""The packed inference layout (column tiles) and the ``[K, N]`` view of kernels."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sensorquant_jax._src import native, nibbles, schemes
from sensorquant_jax._src.native import INT4_PACKED_TARGET, WO_TARGET
from sensorquant_jax._src.options import bits_of
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


INT4_TILE = 64
"""Columns per tile of a packed int4 kernel."""
INT4_TILE_K = 8
"""Rows of K per 256-byte step of a packed int4 tile (K is padded to a multiple)."""


def int4_tiles(values: jax.Array, k: int) -> jax.Array:
  """Canonical int4 nibbles ``[ceil(K / 2), N]`` as packed int4 tiles ``[N / 64, Kp / 2, 64]``.

  ``Kp`` is ``K`` rounded up to 8 (codes past the canonical ones are 0). In a tile each
  8 rows of K take 256 bytes, 4 lines of 16 columns: byte ``4 i + j`` of line ``q`` holds
  column ``16 q + i`` at ``k = 8 k8 + j`` (low nibble) and ``k = 8 k8 + 4 + j`` (high
  nibble), so a line's low nibbles are each column's 4 consecutive ``k`` in one 32-bit
  lane, as integer dot products take them (``csrc/dense.cc``, ``PackedInt4``).
  """
  n = values.shape[1]
  stored = 2 * values.shape[0]  # the canonical padding nibble included, kept as it is
  kp = -(-k // INT4_TILE_K) * INT4_TILE_K
  codes = jnp.pad(nibbles.unpack(values, 0, stored), ((0, kp - stored), (0, 0)))
  c = codes.reshape(kp // 8, 2, 4, n // INT4_TILE, 4, 16)  # k8, half, j, tile, q, i
  byte = c[:, 0] | (c[:, 1] << jnp.uint8(4))  # k8, j, tile, q, i
  return jnp.transpose(byte, (2, 0, 3, 4, 1)).reshape(n // INT4_TILE, kp // 2, INT4_TILE)


def int4_untile(tiles: jax.Array, k: int) -> jax.Array:
  """Inverse of :func:`int4_tiles`: the canonical nibbles ``[ceil(K / 2), N]``."""
  nt, half, _ = tiles.shape
  b = jnp.transpose(tiles.reshape(nt, half // 4, 4, 16, 4), (1, 4, 0, 2, 3))  # k8, j, t, q, i
  codes = jnp.stack([b & jnp.uint8(0xF), b >> jnp.uint8(4)], axis=1).reshape(2 * half, -1)
  return nibbles.pack(codes[: 2 * nibbles.packed_len(k)], 0)


@struct.dataclass
class PackedQArray:
  """A 2-D kernel ``[K, N]`` stored as column tiles, the inference layout made by :func:`pack`.

  int8: tiles ``[N // tile, K, tile]``. Each tile is one contiguous block, so the
  weight-only op converts and multiplies one tile at a time instead of building
  a float copy of the whole kernel. int4 (``bits == 4``, per-group scales):
  tiles ``[N // 64, Kp / 2, 64]`` in the order integer dot products read (see
  :func:`int4_tiles`), for the native CPU kernels. ``unpack`` returns the
  canonical :class:`QArray`; every op accepts both.

  Attributes:
    tiles: int8 ``[N // tile, K, tile]``, or uint8 int4 tiles.
    scale: float32 ``[1, N]`` (per-tensor scales are broadcast); int4 ``[ceil(K / B), N]``.
    zero_point: optional int8, shaped like ``scale``.
    scheme, axes, dtype: the canonical QArray's static fields.
    block_size: int4: the group size (a multiple of 8), else ``None`` (static).
    k: int4: the kernel's ``K`` (the tiles hold it rounded up to 8), else ``None`` (static).
  """

  tiles: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None = None
  scheme: str = struct.field(pytree_node=False, default=schemes.PER_TENSOR)
  axes: tuple[int, ...] = struct.field(pytree_node=False, default=(-2, -1))
  dtype: Any = struct.field(pytree_node=False, default=np.dtype("float32"))
  block_size: int | None = struct.field(pytree_node=False, default=None)
  k: int | None = struct.field(pytree_node=False, default=None)

  @property
  def bits(self) -> int:
    """Bits per stored value: 8, or 4 for packed int4 tiles."""
    return bits_of(self.scheme)

  @property
  def shape(self) -> tuple[int, ...]:
    nt, k, t = self.tiles.shape
    if self.bits == 4:
      assert self.k is not None
      return (self.k, nt * t)
    return (k, nt * t)

  @property
  def nbytes(self) -> int:
    total = int(self.tiles.nbytes) + int(self.scale.nbytes)
    return total + (int(self.zero_point.nbytes) if self.zero_point is not None else 0)

  def unpack(self) -> QArray:
    """The canonical :class:`QArray` (``[K, N]`` values, keepdims scales)."""
    if self.bits == 4:
      assert self.k is not None
      values = int4_untile(self.tiles, self.k)
      return QArray(
        values,
        self.scale,
        self.zero_point,
        self.scheme,
        self.axes,
        self.block_size,
        self.dtype,
        self.k % 2,
      )
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
    if w.bits == 4:
      return Matrix(w.tiles, w.scale, w.zero_point, w.block_size, tiled=True, bits=4)
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


def canonical_matrix(m: Matrix, k: int) -> Matrix:
  """``m`` with canonical values (``[K, N]`` int8 or ``[ceil(K / 2), N]`` nibbles), untiled."""
  if not m.tiled:
    return m
  values = int4_untile(m.values, k) if m.bits == 4 else untile(m.values)
  return dataclasses.replace(m, values=values, tiled=False)


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


def int4_packable(x: QArray) -> bool:
  """Whether :func:`pack` tiles this int4 kernel: 2-D, groups along K of a multiple of 8,
  ``N`` a multiple of 64, no ``input_scale``, ``offset`` or ``perm``."""
  return (
    x.bits == 4
    and x.ndim == 2
    and x.axes == (-2,)
    and x.block_size is not None
    and x.block_size % INT4_TILE_K == 0
    and x.shape[1] % INT4_TILE == 0
    and x.input_scale is None
    and x.offset is None
    and x.perm is None
  )


def int4_pack_here() -> bool:
  """Whether int4 kernels are worth tiling here: the native packed int4 kernel runs
  (XLA and the GPU kernels would untile them on every call)."""
  return jax.default_backend() == "cpu" and INT4_PACKED_TARGET in native.ffi_targets()


def pack(qparams: Any, tile: int | None = None) -> Any:
  """Converts 2-D kernels to :class:`PackedQArray`, the layout the CPU kernels stream.

  int8 per-tensor/per-channel kernels become column tiles of ``tile`` columns.
  int4 per-group kernels (groups a multiple of 8 along K, ``N`` a multiple of
  64) become 64-column int4 tiles where the native packed int4 kernels run
  (a CPU backend with the native library; elsewhere they stay as they are).
  Other leaves (and kernels the tiled ops cannot use: other ranks, block or
  row-wise int8 scales, an ``input_scale``, an ``offset`` or ``perm``, ``N``
  not a multiple of the tile, fp8 values) are returned unchanged. Cheap (one
  transpose per kernel) and explicit; every op and
  :func:`sensorquant_jax.apply` accept packed and unpacked trees alike.

  Args:
    qparams: a tree with QArray leaves.
    tile: int8 columns per tile; default :func:`default_pack_tile` (64 for the
      native CPU kernels, 512 for the XLA path).

  Example:
    >>> packed = sq.pack(sq.quantize(params, "symmetric_per_group_int4"))
    >>> y = jax.jit(sq.apply, static_argnums=0)(model, packed, x)
  """
  if tile is None:
    tile = default_pack_tile()
  int4_here = int4_pack_here()

  def one(x):
    if is_qarray(x) and x.bits == 4:
      if not (int4_here and int4_packable(x)):
        return x
      assert x.block_size is not None
      tiles = int4_tiles(x.values, x.shape[0])
      return PackedQArray(
        tiles, x.scale, x.zero_point, x.scheme, x.axes, x.dtype, x.block_size, x.shape[0]
      )
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
