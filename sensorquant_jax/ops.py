"""Int8 inference ops: dense layers that read int8 weights without a float copy."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sensorquant_jax import _native, schemes
from sensorquant_jax.qarray import QArray, is_qarray

MODES = ("weight_only", "w8a8")
DEFAULT_TILE = 512  # measured best on a 2-core x86 CPU (benchmarks/bench_dense.py)


def _auto_tile(tile):
  """Column tiling helps XLA:CPU, which would otherwise build a float copy of the
  weight; XLA:GPU/TPU fuse the int8 convert into the GEMM, so they get one dot."""
  if tile == "auto":
    return DEFAULT_TILE if jax.default_backend() == "cpu" else None
  return tile


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
    nt, k, t = self.tiles.shape
    values = jnp.transpose(self.tiles, (1, 0, 2)).reshape(k, nt * t)
    scale = self.scale[:, :1] if self.scheme == schemes.PER_TENSOR else self.scale
    return QArray(values, scale, self.zero_point, self.scheme, self.axes, None, self.dtype)

  def dequantize(self, dtype: Any = None) -> jax.Array:
    return self.unpack().dequantize(dtype)


def is_quantized(x: Any) -> bool:
  return isinstance(x, (QArray, PackedQArray))


# ---------------------------------------------------------------------------
# Kernel views.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Matrix:
  """A quantized kernel seen as ``[K, N]`` with scales along N (or per K-block)."""

  values: jax.Array  # [K, N] int8, or tiles [N/T, K, T]
  scale: jax.Array  # [1, N] or [nb, N]
  zero_point: jax.Array | None  # [1, N]
  block: int | None
  tiled: bool = False


def _as_matrix(w: QArray | PackedQArray, n_in: int) -> _Matrix | None:
  """Views a kernel whose first ``n_in`` axes are contracted as ``[K, N]``.

  Returns ``None`` when the scales vary along the contraction in a way that
  does not factor out of the matmul (the caller then dequantizes).
  """
  if isinstance(w, PackedQArray):
    if n_in != 1:
      return None
    return _Matrix(w.tiles, w.scale, w.zero_point, None, tiled=True)
  shape = w.shape
  k = math.prod(shape[:n_in])
  n = math.prod(shape[n_in:])
  values = w.values.reshape(k, n)
  ndim = w.ndim
  reduced = {ndim + a for a in w.axes}
  if w.block_size is None:
    if not set(range(n_in)) <= reduced:
      return None  # per-channel along a contracted axis
    scale = jnp.broadcast_to(w.scale, (1,) * n_in + tuple(shape[n_in:])).reshape(1, n)
    zp = None
    if w.zero_point is not None:
      zp = jnp.broadcast_to(w.zero_point, (1,) * n_in + tuple(shape[n_in:])).reshape(1, n)
    return _Matrix(values, scale, zp, None)
  (axis,) = reduced
  if n_in != 1 or axis != 0:
    return None
  return _Matrix(values, w.scale.reshape(w.scale.shape[0], n), None, w.block_size)


# ---------------------------------------------------------------------------
# Native XLA:CPU kernels (csrc/dense.cc).
# ---------------------------------------------------------------------------

IMPLS = ("auto", "native", "xla")
_WO_TARGET = "sq_weight_only_dense"
_W8_TARGET = "sq_w8a8_dense"
_W8_MAX_K = 65536  # int32 accumulation of (x + 128) * w stays exact up to here


def _native_available(target: str, impl: str) -> bool:
  """Whether ``target`` serves this call: CPU backend, built, not switched off."""
  if impl not in IMPLS:
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
  if impl == "xla":
    return False
  # A CPU default backend means no accelerator is attached: every computation
  # runs on XLA:CPU. Elsewhere XLA fuses the convert into its GEMM itself.
  ok = jax.default_backend() == "cpu" and target in _native.ffi_targets()
  if impl == "native" and not ok:
    why = _native.build_error() or (
      "not on a CPU backend" if jax.default_backend() != "cpu" else "CPU lacks the instructions"
    )
    raise RuntimeError(f"native kernel {target} is unavailable: {why}")
  return ok


def _kernel_shape_ok(values: jax.Array) -> bool:
  if values.ndim not in (2, 3):
    return False
  n = values.shape[-1] if values.ndim == 2 else values.shape[0] * values.shape[2]
  return n % 16 == 0 and values.shape[-1] % 16 == 0


def _spec_axis(sharding, dim: int):
  spec = getattr(sharding, "spec", ())
  return spec[dim] if dim < len(spec) else None


def _names(axis) -> tuple:
  return () if axis is None else axis if isinstance(axis, tuple) else (axis,)


def _mesh_size(mesh, axis) -> int:
  return math.prod(mesh.shape[a] for a in _names(axis))


def _sharded(call, n_rows: int, tiled: bool):
  """``call`` partitioned like a matmul under ``jit`` with sharded operands.

  Rows (activations) and output columns (weights, scales) keep their
  shardings and each device runs the kernel on its own block; the contraction
  axis is gathered. Without this, XLA would gather every operand to run the
  opaque custom call whole.
  """
  op = custom_partitioning(call)

  def shardings(mesh, arg_shapes):
    x, values = arg_shapes[0], arg_shapes[n_rows]
    row = _spec_axis(x.sharding, 0)
    if row is not None and x.shape[0] % _mesh_size(mesh, row):
      row = None
    col = _spec_axis(values.sharding, 0 if tiled else 1)
    size = _mesh_size(mesh, col)
    n = values.shape[0] * values.shape[2] if tiled else values.shape[1]
    if col is not None and ((values.shape[0] if tiled else n) % size or (n // size) % 16):
      col = None  # the kernel needs whole tiles and multiples of 16 columns per device
    if col is not None and row is not None and set(_names(row)) & set(_names(col)):
      col = None  # one mesh axis cannot shard both output dimensions
    rows = [NamedSharding(mesh, P(row, None)) for _ in range(n_rows)]
    vspec = P(col, None, None) if tiled else P(None, col)
    args = (*rows, NamedSharding(mesh, vspec), NamedSharding(mesh, P(None, col)))
    return args, NamedSharding(mesh, P(row, col))

  def infer(mesh, arg_shapes, result_shape):
    return shardings(mesh, arg_shapes)[1]

  def partition(mesh, arg_shapes, result_shape):
    args, out = shardings(mesh, arg_shapes)
    return mesh, call, out, args

  rows = ", ".join(["m k", "m o"][:n_rows])
  rule = f"{rows}, t k u, b (t u) -> m (t u)" if tiled else f"{rows}, k n, b n -> m n"
  op.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule)
  return op


@functools.cache
def _ffi_kernel(target: str, n_rows: int, block: int, tiled: bool):
  """The FFI call as a ``custom_vmap`` function of ``(*row_args, values, scale)``.

  Batching rows (the usual ``vmap`` over examples) folds the batch into the
  kernel's M dimension; batched weights fall back to a loop over the batch.
  """

  def call(*args):
    values = args[n_rows]
    n = values.shape[1] if values.ndim == 2 else values.shape[0] * values.shape[2]
    out = jax.ShapeDtypeStruct((args[0].shape[0], n), jnp.float32)
    attrs = {"block": np.int64(block)} if target == _WO_TARGET else {}
    return jax.ffi.ffi_call(target, out)(*args, **attrs)

  kernel = jax.custom_batching.custom_vmap(_sharded(call, n_rows, tiled))

  @kernel.def_vmap
  def _rule(axis_size, in_batched, *args):
    if not any(in_batched[n_rows:]):
      rows = []
      for a, batched in zip(args[:n_rows], in_batched[:n_rows], strict=True):
        a = a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
        rows.append(a.reshape(-1, *a.shape[2:]))
      y = kernel(*rows, *args[n_rows:])
      return y.reshape(axis_size, -1, y.shape[-1]), True
    full = [
      a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
      for a, b in zip(args, in_batched, strict=True)
    ]
    return lax.map(lambda xs: kernel(*xs), tuple(full)), True

  return kernel


def _native_op(target: str, n_rows: int, block: int, tiled: bool, reference):
  """The kernel, differentiable through ``reference`` (the XLA formula it computes)."""
  kernel = _ffi_kernel(target, n_rows, block, tiled)

  @jax.custom_vjp
  def op(*args):
    return kernel(*args)

  def fwd(*args):
    return kernel(*args), args

  def bwd(args, g):
    return jax.vjp(reference, *args)[1](g)

  op.defvjp(fwd, bwd)
  return op


# ---------------------------------------------------------------------------
# Matmuls.
# ---------------------------------------------------------------------------


def _tiled_dot(x2: jax.Array, tiles: jax.Array) -> jax.Array:
  """``x2 @ W`` for int8 ``W`` given as tiles ``[N/T, K, T]``, one tile at a time."""
  out = lax.map(lambda t: jnp.dot(x2, t.astype(x2.dtype), preferred_element_type=x2.dtype), tiles)
  nt, b, t = out.shape
  return jnp.transpose(out, (1, 0, 2)).reshape(b, nt * t)


def _sliced_dot(x2: jax.Array, values: jax.Array, tile: int) -> jax.Array:
  """``x2 @ W`` for int8 ``W [K, N]``, converting ``tile`` columns at a time in place."""
  k, n = values.shape

  def one(i):
    cols = lax.dynamic_slice_in_dim(values, i * tile, tile, axis=1)
    return jnp.dot(x2, cols.astype(x2.dtype), preferred_element_type=x2.dtype)

  out = lax.map(one, jnp.arange(n // tile))
  return jnp.transpose(out, (1, 0, 2)).reshape(x2.shape[0], n)


def _tiles_of(values: jax.Array, tile: int) -> jax.Array | None:
  k, n = values.shape
  if n % tile or n == tile:
    return None
  return jnp.transpose(values.reshape(k, n // tile, tile), (1, 0, 2))


TILED_MAX_ROWS = 32
TILED_MIN_SIZE = 1 << 22
"""Kernels of fewer elements (whose float copy fits in cache) are tiled only up
to ``TILED_MAX_ROWS`` rows; above that one dot on the converted kernel is
faster. Larger kernels are always tiled (measured: benchmarks/bench_*.py)."""


def _use_tiles(k: int, n: int, rows: int) -> bool:
  return rows <= TILED_MAX_ROWS or k * n >= TILED_MIN_SIZE


def _pick_tile(tile: int | None, k: int, n: int, rows: int) -> int | None:
  if not tile or not _use_tiles(k, n, rows):
    return None
  for t in (tile, tile // 2, tile // 4):
    if t >= 64 and n % t == 0 and n > t:
      return t
  return None


def _weight_only(x2: jax.Array, m: _Matrix, tile: int | None, impl: str = "auto") -> jax.Array:
  cdt = x2.dtype if jnp.issubdtype(x2.dtype, jnp.floating) else jnp.float32
  x2 = x2.astype(cdt)
  if _kernel_shape_ok(m.values) and _native_available(_WO_TARGET, impl):
    return _native_weight_only(x2, m).astype(cdt)
  if impl == "native":
    raise RuntimeError(f"native kernel: unsupported kernel layout {m.values.shape}")
  return _xla_weight_only(x2, m, tile)


def _native_weight_only(x2: jax.Array, m: _Matrix) -> jax.Array:
  """Weight-only on the native kernel: float32 activations and accumulation."""
  block = m.block or 0
  xf = x2.astype(jnp.float32)
  scale = m.scale.astype(jnp.float32)

  def reference(x, values, scale):
    return _xla_weight_only(
      x, dataclasses.replace(m, values=values, scale=scale, zero_point=None), None
    )

  y = _native_op(_WO_TARGET, 1, block, m.tiled, reference)(xf, m.values, scale)
  if m.zero_point is not None:  # x @ ((q - z) * s) = x @ (q * s) - rowsum(x) * (z * s)
    y = y - jnp.sum(xf, axis=-1, keepdims=True) * (m.zero_point.astype(jnp.float32) * scale)
  return y


def _xla_weight_only(x2: jax.Array, m: _Matrix, tile: int | None) -> jax.Array:
  cdt = x2.dtype
  if not m.tiled:
    tile = _pick_tile(tile, *m.values.shape, x2.shape[0])
  if m.block is not None:
    k, n = m.values.shape
    nb = m.scale.shape[0]
    pad = nb * m.block - k
    xb = jnp.pad(x2, ((0, 0), (0, pad))).reshape(x2.shape[0], nb, m.block)
    qb = jnp.pad(m.values, ((0, pad), (0, 0))).reshape(nb, m.block, n)
    part = jnp.einsum("bnk,nko->bno", xb, qb.astype(cdt), preferred_element_type=cdt)
    return jnp.sum(part * m.scale.astype(cdt)[None], axis=1)
  if m.tiled and (
    not tile
    or not _use_tiles(m.values.shape[1], m.values.shape[0] * m.values.shape[2], x2.shape[0])
  ):
    nt, k, t = m.values.shape
    flat = jnp.transpose(m.values, (1, 0, 2)).reshape(k, nt * t)
    acc = jnp.dot(x2, flat.astype(cdt), preferred_element_type=cdt)
  elif m.tiled:
    acc = _tiled_dot(x2, m.values)
  elif tile:
    acc = _sliced_dot(x2, m.values, tile)
  else:
    acc = jnp.dot(x2, m.values.astype(cdt), preferred_element_type=cdt)
  if m.zero_point is not None:
    acc = acc - jnp.sum(x2, axis=-1, keepdims=True) * m.zero_point.astype(cdt)
  return acc * m.scale.astype(cdt)


def quantize_activations(
  x2: jax.Array, act_scale: jax.Array | float | None = None
) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 activations: per-token dynamic scales, or a static scale.

  Args:
    x2: ``[tokens, K]`` floats.
    act_scale: a calibrated static scale (scalar); ``None`` for per-token
      ``max|x| / 127``.

  Returns:
    ``(int8 values, float32 scales [tokens, 1])``.
  """
  xf = x2.astype(jnp.float32)
  if act_scale is None:
    s = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / 127.0
    s = jnp.maximum(s, 1e-12)
  else:
    s = jnp.broadcast_to(jnp.asarray(act_scale, jnp.float32).reshape(1, 1), (xf.shape[0], 1))
  q = jnp.clip(lax.round(xf / s, lax.RoundingMethod.AWAY_FROM_ZERO), -127, 127)
  return q.astype(jnp.int8), s


def _w8a8(x2: jax.Array, m: _Matrix, act_scale, impl: str = "auto") -> jax.Array:
  xq, xs = quantize_activations(x2, act_scale)
  k = m.values.shape[-2] if m.values.ndim == 3 else m.values.shape[0]
  if (
    m.block is None
    and k <= _W8_MAX_K
    and _kernel_shape_ok(m.values)
    and _native_available(_W8_TARGET, impl)
  ):
    return _native_w8a8(xq, xs, m)
  if impl == "native":
    raise RuntimeError(f"native W8A8 kernel: unsupported kernel {m.values.shape}, block {m.block}")
  return _xla_w8a8(xq, xs, m)


def _native_w8a8(xq: jax.Array, xs: jax.Array, m: _Matrix) -> jax.Array:
  """Int8 x int8 -> int32 on the native (AVX-512 VNNI) kernel, rescaled to float32."""
  scale = m.scale.astype(jnp.float32)

  def reference(xq, xs, values, scale):
    return _xla_w8a8(xq, xs, dataclasses.replace(m, values=values, scale=scale, zero_point=None))

  y = _native_op(_W8_TARGET, 2, 0, m.tiled, reference)(xq, xs, m.values, scale)
  if m.zero_point is not None:
    rows = jnp.sum(xq.astype(jnp.int32), axis=-1, keepdims=True).astype(jnp.float32) * xs
    y = y - rows * (m.zero_point.astype(jnp.float32) * scale)
  return y


# Integer dots are exact at any precision; pinning DEFAULT keeps a global
# jax_default_matmul_precision="highest" (meant for float matmuls) off them.
_INT_PRECISION = lax.Precision.DEFAULT


def _xla_w8a8(xq: jax.Array, xs: jax.Array, m: _Matrix) -> jax.Array:
  values = m.values
  if m.tiled:
    nt, k, t = values.shape
    values = jnp.transpose(values, (1, 0, 2)).reshape(k, nt * t)
  if m.block is not None:
    k, n = values.shape
    nb = m.scale.shape[0]
    pad = nb * m.block - k
    xb = jnp.pad(xq, ((0, 0), (0, pad))).reshape(xq.shape[0], nb, m.block)
    qb = jnp.pad(values, ((0, pad), (0, 0))).reshape(nb, m.block, n)
    acc = jnp.einsum(
      "bnk,nko->bno", xb, qb, preferred_element_type=jnp.int32, precision=_INT_PRECISION
    )
    y = jnp.sum(acc.astype(jnp.float32) * m.scale[None], axis=1)
    return y * xs
  acc = lax.dot_general(
    xq,
    values,
    (((1,), (0,)), ((), ())),
    preferred_element_type=jnp.int32,
    precision=_INT_PRECISION,
  )
  if m.zero_point is not None:
    acc = acc - jnp.sum(xq.astype(jnp.int32), axis=-1, keepdims=True) * m.zero_point.astype(
      jnp.int32
    )
  return acc.astype(jnp.float32) * xs * m.scale


def dense_general(
  x: jax.Array,
  kernel: QArray | PackedQArray,
  bias: jax.Array | None = None,
  *,
  n_in: int = 1,
  mode: str = "weight_only",
  act_scale: jax.Array | float | None = None,
  tile: int | str | None = "auto",
  dtype: Any = None,
  impl: str = "auto",
) -> jax.Array:
  """``x`` contracted with a quantized kernel over its first ``n_in`` axes.

  The kernel's first ``n_in`` axes match ``x``'s last ``n_in`` axes (Flax
  DenseGeneral layout: ``[*in, *out]``); the output is ``[*batch, *out]``.

  Args:
    x: float activations.
    kernel: :class:`QArray` (any int8 scheme) or :class:`PackedQArray`.
    bias: optional float bias of shape ``kernel.shape[n_in:]``.
    n_in: number of contracted kernel axes.
    mode: ``"weight_only"`` (int8 weights, float activations and
      accumulation) or ``"w8a8"`` (int8 activations with per-token dynamic
      scales, or ``act_scale`` when given; int32 accumulation).
    act_scale: static activation scale for ``w8a8`` (from calibration).
    tile: columns converted per step by the XLA weight-only path; ``"auto"``:
      512 on CPU, one fused dot elsewhere; ``None``: one dot.
    dtype: output dtype (default: ``x``'s floating dtype).
    impl: ``"auto"`` (the native CPU kernels when they are built and the
      backend is CPU, else XLA), ``"native"`` (raise if unavailable) or ``"xla"``.

  Returns:
    The layer output, close to ``x @ dequantize(kernel) + bias``.
  """
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
  if impl not in IMPLS:
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
  shape = kernel.shape
  in_shape, out_shape = tuple(shape[:n_in]), tuple(shape[n_in:])
  if tuple(x.shape[x.ndim - n_in :]) != in_shape:
    raise ValueError(
      f"input feature shape {x.shape[x.ndim - n_in :]} does not match kernel {shape}"
    )
  out_dtype = dtype or (x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32)
  batch = x.shape[: x.ndim - n_in]
  x2 = x.reshape(math.prod(batch), math.prod(in_shape))
  tile = _auto_tile(tile)
  m = _as_matrix(kernel, n_in)
  if m is None:  # scales do not factor out: dequantize (correct, not fast)
    w = kernel.dequantize(jnp.float32).reshape(x2.shape[1], -1)
    y = jnp.dot(x2.astype(jnp.float32), w)
  elif mode == "weight_only":
    y = _weight_only(x2, m, tile, impl)
  else:
    y = _w8a8(x2, m, act_scale, impl)
  y = y.reshape(batch + out_shape)
  if bias is not None:
    y = y + jnp.asarray(bias).astype(y.dtype)
  return y.astype(out_dtype)


def dense(
  x: jax.Array,
  qkernel: QArray | PackedQArray,
  bias: jax.Array | None = None,
  *,
  mode: str = "weight_only",
  act_scale: jax.Array | float | None = None,
  tile: int | str | None = "auto",
  dtype: Any = None,
  impl: str = "auto",
) -> jax.Array:
  """``x @ kernel + bias`` for a quantized Dense kernel ``[in, out]``.

  On CPU the native kernels (``csrc/dense.cc``) convert int8 weights in
  registers or L2-sized blocks, so no float copy of the weight is ever built;
  a :func:`pack`-ed kernel streams fastest. Without them (or with
  ``impl="xla"``) the XLA path converts ``tile`` columns at a time. See
  :func:`dense_general`.

  Example:
    >>> qk = sq.quantize_array(kernel, "symmetric_per_channel_int8")
    >>> y = jax.jit(sq.dense)(x, qk, bias)
  """
  return dense_general(
    x, qkernel, bias, n_in=1, mode=mode, act_scale=act_scale, tile=tile, dtype=dtype, impl=impl
  )


NATIVE_TILE = 64
"""Tile width :func:`pack` picks for the native kernels: each 64-column tile is
one contiguous stream of whole cache lines (measured: benchmarks/bench_dense.py)."""


def default_pack_tile() -> int:
  """:data:`NATIVE_TILE` where the native CPU kernel runs, else :data:`DEFAULT_TILE`."""
  if jax.default_backend() == "cpu" and _WO_TARGET in _native.ffi_targets():
    return NATIVE_TILE
  return DEFAULT_TILE


def pack(qparams: Any, tile: int | None = None) -> Any:
  """Converts 2-D per-tensor/per-channel QArray kernels to :class:`PackedQArray`.

  Other leaves (and kernels the tiled op cannot use: other ranks, block or
  row-wise scales, ``N`` not a multiple of ``tile``) are returned unchanged.
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
    if not is_qarray(x) or x.ndim != 2 or x.block_size is not None:
      return x
    m = _as_matrix(x, 1)
    if m is None or x.shape[1] % tile or x.shape[1] == tile:
      return x
    tiles = _tiles_of(m.values, tile)
    return PackedQArray(tiles, m.scale, m.zero_point, x.scheme, x.axes, x.dtype)

  return jax.tree_util.tree_map(one, qparams, is_leaf=is_qarray)


def unpack(qparams: Any) -> Any:
  """Inverse of :func:`pack`."""
  return jax.tree_util.tree_map(
    lambda x: x.unpack() if isinstance(x, PackedQArray) else x,
    qparams,
    is_leaf=lambda x: isinstance(x, PackedQArray),
  )
