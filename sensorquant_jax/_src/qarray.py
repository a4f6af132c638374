"""The quantized array pytree."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sensorquant_jax._src import nibbles
from sensorquant_jax._src.options import bits_of

SYMMETRIC_INT4_ZERO = 8
"""The stored code of 0 in the symmetric int4 scheme (codes ``q + 8``, ``q`` in ``[-7, 7]``)."""


@struct.dataclass
class QArray:
  """A quantized array: integer ``values`` plus float32 ``scale``.

  For the int8 schemes ``values`` is int8 with the logical shape of the
  original array (``float8_e4m3fn`` for the fp8 schemes). For the int4
  schemes (``bits == 4``) it is uint8 holding two 4-bit codes a byte along the group axis (see
  :mod:`sensorquant_jax._src.nibbles`: low nibble first), so that axis has
  ``ceil(n / 2)`` entries and ``pad`` (0 or 1) says whether the last high
  nibble is padding; :attr:`shape` is always the logical shape. ``scale`` (and
  ``zero_point`` when present) has the same rank, with size 1 along every
  reduced axis, except for block schemes, where the block axis holds one entry
  per block. This keepdims layout broadcasts against ``values``, keeps working
  when QArrays are stacked along a new leading axis (``axes`` count from the
  end), and lets sharding propagate from values to scales.

  Attributes:
    values: int8 (fp8 schemes: ``float8_e4m3fn``) array with the original shape,
      or packed uint8 nibbles.
    scale: float32 array, see above.
    zero_point: optional int8 array shaped like ``scale`` (asymmetric schemes).
    scheme: scheme name, e.g. ``"symmetric_per_tensor_int8"`` (static).
    axes: reduced axes as negative indices: all axes for per-tensor, the
      non-channel axes for per-channel, the block (group) axis for per-block
      and per-group schemes (static).
    block_size: values per block or group for those schemes, else ``None``
      (static).
    dtype: the original floating dtype, restored by ``dequantize`` (static).
    pad: int4 only: padding nibbles at the end of the packed axis (static).
    input_scale: optional float32 multiplier of the layer input, shaped to
      broadcast against the logical array (size 1 along the output axes), as
      AWQ and SmoothQuant leave it: the layer computes ``(x * input_scale) @
      W`` and :meth:`dequantize` folds it in (``W * input_scale``).
    offset: optional float32 array shaped like ``scale``, added after scaling:
      ``(values - zero_point) * scale + offset``, in that order (GGUF's Q4_1 and
      Q4_K store ``fl(d q) + m`` per group; imported with zero points 0).
    perm: optional int32 ``[n]`` for block schemes: the stored order of the block
      axis, whose stored position ``i`` holds logical index ``perm[i]`` (GPTQ's
      act-order groups rows that are not adjacent). Ops gather the input
      columns in this order; :meth:`dequantize` returns the logical order.
  """

  values: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None = None
  scheme: str = struct.field(pytree_node=False, default="symmetric_per_tensor_int8")
  axes: tuple[int, ...] = struct.field(pytree_node=False, default=())
  block_size: int | None = struct.field(pytree_node=False, default=None)
  dtype: Any = struct.field(pytree_node=False, default=np.dtype("float32"))
  pad: int = struct.field(pytree_node=False, default=0)
  input_scale: jax.Array | None = None
  offset: jax.Array | None = None
  perm: jax.Array | None = None

  @property
  def bits(self) -> int:
    """Bits per stored value: 8, or 4 for the packed int4 schemes."""
    return bits_of(self.scheme)

  @property
  def shape(self) -> tuple[int, ...]:
    """The logical shape (of the array this was quantized from)."""
    shape = tuple(self.values.shape)
    if self.bits == 4 and shape:
      a = self.axes[0] % len(shape)
      shape = shape[:a] + (2 * shape[a] - self.pad,) + shape[a + 1 :]
    return shape

  @property
  def ndim(self) -> int:
    return len(self.values.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def nbytes(self) -> int:
    """Bytes held by values, scales and zero points together."""
    total = _nbytes(self.values) + _nbytes(self.scale)
    for extra in (self.zero_point, self.input_scale, self.offset, self.perm):
      if extra is not None:
        total += _nbytes(extra)
    return total

  @property
  def original_nbytes(self) -> int:
    """Bytes the float array this was quantized from occupied."""
    return self.size * np.dtype(self.dtype).itemsize

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """Returns the float array ``(values - zero_point) * scale``.

    Args:
      dtype: output dtype; defaults to the original dtype.

    Returns:
      An array with the shape of ``values``. For ``symmetric_per_tensor_int8``
      it equals the Rust module's ``dequantize`` bit for bit.
    """
    return _dequantize(self, dtype)

  def _dequantize(self, dtype: Any) -> jax.Array:
    v = self.codes().astype(jnp.float32)
    zp = None if self.zero_point is None else self.zero_point.astype(jnp.float32)
    if self.block_size is None:
      out = (v if zp is None else v - zp) * self.scale
      if self.offset is not None:
        out = out + self.offset.astype(jnp.float32)
    else:
      out = _apply_blocks(v, self.scale, self.axes[0], self.block_size, zp, self.offset)
      if self.perm is not None:
        out = _unpermute(out, self.perm, self.axes[0] % out.ndim)
    if self.input_scale is not None:
      out = out * self.input_scale.astype(jnp.float32)
    dtype = self.dtype if dtype is None else dtype
    # Weights within an ulp of the dtype's max can land a rounding step past
    # it (127 * fl(max / 127) > max); clamp so dequantize is finite for every
    # finite input (NaN stays NaN). Elsewhere this changes nothing.
    top = _finite_max(dtype)
    if top is not None:
      out = jnp.clip(out, -top, top)
    return out.astype(dtype)

  def codes(self) -> jax.Array:
    """The integer values with the logical shape, centred for symmetric int4.

    int8 and fp8 schemes: ``values`` itself. int4: the unpacked nibbles as int8,
    minus 8 for the symmetric scheme (so ``[-7, 7]``), as stored (``[0, 15]``)
    for the asymmetric one, whose ``zero_point`` is subtracted later. In the
    stored order of the block axis (see ``perm``).
    """
    if self.bits == 8:
      return self.values
    a = self.axes[0]
    n = self.shape[a]
    q = nibbles.unpack(self.values, a, n).astype(jnp.int8)
    return q if self.zero_point is not None else q - jnp.int8(SYMMETRIC_INT4_ZERO)

  def __repr__(self) -> str:
    # Leaves may be anything after a tree_map (tuples, None, tracers): never fail.
    return (
      f"QArray(scheme={self.scheme!r}, shape={self._shape_text()}, "
      f"values={_dtype_name(self.values)}, scale={_shape_text(self.scale)}, "
      f"dtype={_dtype_name(self.dtype, is_dtype=True)})"
    )

  def _shape_text(self) -> str:
    try:
      return str(self.shape)
    except Exception:  # a leaf replaced by anything: say what it is
      return _shape_text(self.values)


def _shape_text(x: Any) -> str:
  shape = getattr(x, "shape", None)
  if isinstance(shape, tuple):
    return str(tuple(shape))
  return type(x).__name__


def _dtype_name(x: Any, is_dtype: bool = False) -> str:
  try:
    return np.dtype(x if is_dtype else x.dtype).name
  except (AttributeError, TypeError):
    return type(x).__name__


def _finite_max(dtype: Any) -> float | None:
  """The largest finite value of a floating ``dtype`` (at most float32's)."""
  try:
    info = jnp.finfo(dtype)
  except ValueError:
    return None
  return float(min(float(info.max), float(np.finfo(np.float32).max)))


def _nbytes(x: Any) -> int:
  if hasattr(x, "nbytes"):
    return int(x.nbytes)
  return int(np.prod(np.shape(x), dtype=np.int64)) * np.dtype(x.dtype).itemsize


def split_blocks(x: jax.Array, axis: int, block: int) -> jax.Array:
  """``x`` with ``axis`` zero-padded to whole blocks and split into ``(n_blocks, block)``.

  The layout of every per-block computation: scales along the new block axis
  broadcast against ``(n_blocks, 1)``; zeros never raise a block's max.
  """
  axis %= x.ndim
  n = x.shape[axis]
  nb = max(1, -(-n // block))
  if nb * block != n:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, nb * block - n)
    x = jnp.pad(x, widths)
  return x.reshape(x.shape[:axis] + (nb, block) + x.shape[axis + 1 :])


def merge_blocks(x: jax.Array, axis: int, n: int) -> jax.Array:
  """Inverse of :func:`split_blocks`: ``(n_blocks, block)`` at ``axis`` back to ``n``."""
  shape = x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :]
  return jax.lax.slice_in_dim(x.reshape(shape), 0, n, axis=axis)


def broadcast_blocks(a: jax.Array, shape: tuple[int, ...], axis: int, block: int) -> jax.Array:
  """Per-block ``a`` (one entry per ``block`` values along ``axis``) repeated to ``shape``."""
  axis %= len(shape)
  a = jnp.repeat(a, block, axis=axis)
  return jnp.broadcast_to(jax.lax.slice_in_dim(a, 0, shape[axis], axis=axis), shape)


# One compilation per layout and dtype, not one per eager op (int4: unpacking, zero points);
# inside a trace it is a nested call like any other.
@functools.partial(jax.jit, static_argnames="dtype")
def _dequantize(q: QArray, dtype: Any) -> jax.Array:
  return q._dequantize(dtype)


def grid(qa: QArray) -> tuple[jax.Array, jax.Array]:
  """``qa``'s scale and zero point repeated to its logical shape (float32)."""
  shape = qa.shape

  def full(a):
    if a is None:
      return jnp.zeros(shape, jnp.float32)
    a = a.astype(jnp.float32)
    if qa.block_size is not None:
      return broadcast_blocks(a, shape, qa.axes[0], qa.block_size)
    return jnp.broadcast_to(a, shape)

  return full(qa.scale), full(qa.zero_point)


def _apply_blocks(
  v: jax.Array,
  scale: jax.Array,
  axis: int,
  block: int,
  zp: jax.Array | None = None,
  offset: jax.Array | None = None,
) -> jax.Array:
  """``(v - zp) * scale + offset`` with per-block ``scale``, ``zp`` and ``offset`` along
  ``axis`` (negative)."""
  axis %= v.ndim
  blocked = split_blocks(v, axis, block)
  if zp is not None:
    blocked = blocked - jnp.expand_dims(zp, axis + 1)
  blocked = blocked * jnp.expand_dims(scale, axis + 1)
  if offset is not None:
    blocked = blocked + jnp.expand_dims(offset.astype(jnp.float32), axis + 1)
  return merge_blocks(blocked, axis, v.shape[axis])


def _unpermute(out: jax.Array, perm: jax.Array, axis: int) -> jax.Array:
  """The stored order of ``axis`` back to the logical one; ``perm`` is ``[*lead, n]``, its
  leading axes those of stacked QArrays (the first axes of ``out``)."""
  inv = jnp.argsort(perm, axis=-1)
  moved = jnp.moveaxis(out, axis, -1)
  idx = inv.reshape(inv.shape[:-1] + (1,) * (moved.ndim - inv.ndim) + inv.shape[-1:])
  taken = jnp.take_along_axis(moved, jnp.broadcast_to(idx, moved.shape), axis=-1)
  return jnp.moveaxis(taken, -1, axis)


def is_qarray(x: Any) -> bool:
  """Returns True for QArray leaves (handy as ``is_leaf`` in tree maps)."""
  return isinstance(x, QArray)
