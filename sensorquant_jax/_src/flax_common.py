"""What the Linen and NNX integrations share: embedding lookups and ``attend``,
DenseGeneral's contraction axes, and the quantized-kernel calls."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sensorquant_jax._src import ops
from sensorquant_jax._src.options import Mode
from sensorquant_jax._src.packed import PackedQArray
from sensorquant_jax._src.qarray import QArray


def canonical(w: QArray | PackedQArray) -> QArray:
  """The canonical QArray of a packed or unpacked kernel."""
  return w.unpack() if isinstance(w, PackedQArray) else w


def transpose_2d(w: QArray) -> QArray:
  """The QArray of ``w.T`` for a 2-D QArray (an Embed table used as an output layer)."""
  swap = {-1: -2, -2: -1}
  return dataclasses.replace(
    w,
    values=w.values.T,
    scale=w.scale.T,
    zero_point=None if w.zero_point is None else w.zero_point.T,
    axes=tuple(sorted(swap[a] for a in w.axes)),
  )


def embed_lookup(table: QArray | PackedQArray, idx: jax.Array, dtype: Any = None) -> jax.Array:
  """``table[idx]`` dequantized, gathering int8 rows (and their scales) first.

  Raises:
    ValueError: ``idx`` is not an integer array (as ``nn.Embed`` raises).
  """
  if not jnp.issubdtype(idx.dtype, jnp.integer):
    raise ValueError("Input type must be an integer or unsigned integer.")
  table = canonical(table)
  if table.bits == 4 and table.ndim + table.axes[0] == 0:
    # Rows packed two a byte: gather from the dequantized table (correct, not lean).
    out = jnp.take(table.dequantize(), idx, axis=0)
    return out.astype(dtype or out.dtype)
  v = jnp.take(table.values, idx, axis=0)

  def rows(a):
    if a is None:
      return None
    if a.shape[0] == table.shape[0] and table.shape[0] != 1:
      return jnp.take(a, idx, axis=0)
    return a.reshape((1,) * idx.ndim + a.shape[1:])

  part = dataclasses.replace(
    table, values=v, scale=rows(table.scale), zero_point=rows(table.zero_point)
  )
  out = part.dequantize()
  return out.astype(dtype or out.dtype)


def embed_attend(
  table: QArray | PackedQArray,
  query: jax.Array,
  *,
  mode: Mode,
  dtype: Any,
  act_scale: Any = None,
) -> jax.Array:
  """``query @ table.T`` on the int8 op (``Embed.attend``)."""
  table = canonical(table)
  dt = dtype or jnp.result_type(query.dtype, table.dtype)
  return ops.dense(query.astype(dt), transpose_2d(table), mode=mode, act_scale=act_scale, dtype=dt)


def dense_general_axes(
  x: jax.Array,
  kernel: QArray | PackedQArray,
  bias: Any,
  axis: int | Sequence[int],
  *,
  mode: Mode,
  dtype: Any,
  act_scale: Any = None,
) -> jax.Array:
  """DenseGeneral contracting ``x``'s ``axis`` (moved last) with the kernel's leading axes."""
  axes = tuple(axis) if isinstance(axis, Sequence) else (axis,)
  axes = tuple(a % x.ndim for a in axes)
  rest = tuple(a for a in range(x.ndim) if a not in axes)
  if axes != tuple(range(x.ndim - len(axes), x.ndim)):
    x = jnp.transpose(x, rest + axes)
  dt = dtype or jnp.result_type(x.dtype, kernel.dtype)
  return ops.dense_general(
    x.astype(dt), kernel, bias, n_in=len(axes), mode=mode, act_scale=act_scale, dtype=dt
  )
