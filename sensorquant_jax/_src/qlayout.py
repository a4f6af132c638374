"""Layout-only ops on a QArray: the same op applied to its values, scales and zero points.

The op-level transform (:mod:`sensorquant_jax._src.transform`) follows a
quantized leaf through the transposes, reshapes, squeezes, slices and gathers
that model code applies before a matmul, so the matmul still sees int8 (or
int4) codes. Each op here either returns the exact QArray of the transformed
array or raises :class:`Unsupported` with the reason (the caller then
dequantizes).

Every array of a QArray has the logical rank, and along each axis either the
logical size ("full"), size 1 ("one", a scale shared along it), or the block
layout of the block (group) axis; int4 values are also packed along it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from sensorquant_jax._src.packed import PackedQArray
from sensorquant_jax._src.qarray import QArray


class Unsupported(Exception):
  """The op does not map onto the quantized layout; the message says why."""


def canonical(w: QArray | PackedQArray) -> QArray:
  """The canonical QArray of a packed or unpacked kernel."""
  return w.unpack() if isinstance(w, PackedQArray) else w


def block_axis(q: QArray) -> int | None:
  """The block (int4: group and packing) axis as a non-negative index, or ``None``."""
  return None if q.block_size is None else q.axes[0] % q.ndim


def _arrays(q: QArray) -> dict[str, jax.Array]:
  out = {"values": q.values, "scale": q.scale}
  if q.zero_point is not None:
    out["zero_point"] = q.zero_point
  if q.input_scale is not None:
    out["input_scale"] = q.input_scale
  if q.offset is not None:
    out["offset"] = q.offset
  return out


def _replace(q: QArray, arrays: dict[str, jax.Array], axes: Iterable[int], ndim: int) -> QArray:
  if q.perm is not None and q.perm.ndim > 1:  # its leading axes would fall out of step
    raise Unsupported("a stacked kernel with permuted inputs")
  neg = tuple(sorted(a - ndim if a >= 0 else a for a in axes))
  return dataclasses.replace(
    q,
    values=arrays["values"],
    scale=arrays["scale"],
    zero_point=arrays.get("zero_point"),
    input_scale=arrays.get("input_scale"),
    offset=arrays.get("offset"),
    axes=neg,
  )


def _reduced(q: QArray) -> set[int]:
  return {a % q.ndim for a in q.axes}


def transpose(q: QArray, perm: Sequence[int]) -> QArray:
  """``jnp.transpose`` of the logical array."""
  perm = tuple(int(p) for p in perm)
  if perm == tuple(range(q.ndim)):
    return q
  arrays = {k: jnp.transpose(v, perm) for k, v in _arrays(q).items()}
  return _replace(q, arrays, [perm.index(a) for a in _reduced(q)], q.ndim)


def squeeze(q: QArray, dims: Sequence[int]) -> QArray:
  """Removes size-1 axes ``dims``."""
  dims = sorted({d % q.ndim for d in dims})
  if not dims:
    return q
  if block_axis(q) in dims:
    raise Unsupported("squeezes the block axis")
  arrays = {k: jnp.squeeze(v, dims) for k, v in _arrays(q).items()}
  keep = [a for a in range(q.ndim) if a not in dims]
  return _replace(q, arrays, [keep.index(a) for a in _reduced(q) if a in keep], len(keep))


def expand(q: QArray, positions: Sequence[int], ndim: int) -> QArray:
  """Inserts size-1 axes so that they sit at ``positions`` of a rank-``ndim`` result."""
  positions = sorted(positions)
  if not positions:
    return q
  old = [a for a in range(ndim) if a not in positions]
  arrays = {k: jnp.expand_dims(v, positions) for k, v in _arrays(q).items()}
  axes = [old[a] for a in _reduced(q)]
  if q.block_size is None:
    axes += positions  # a new size-1 axis shares its scale
  return _replace(q, arrays, axes, ndim)


def groups(old: Sequence[int], new: Sequence[int]) -> list[tuple[list[int], list[int]]]:
  """Pairs runs of axes of equal total size (no size-1 axes on either side)."""
  out, i, j = [], 0, 0
  while i < len(old) and j < len(new):
    gi, gj, po, pn = [i], [j], old[i], new[j]
    while po != pn:
      if po < pn:
        i += 1
        gi.append(i)
        po *= old[i]
      else:
        j += 1
        gj.append(j)
        pn *= new[j]
    out.append((gi, gj))
    i += 1
    j += 1
  return out


def reshape(q: QArray, shape: Sequence[int]) -> QArray:
  """``reshape`` of the logical array, where scales reshape along with it.

  Axes may be merged or split when each run of merged axes is either all
  per-channel (scales reshape the same way) or all shared (size-1 scales);
  the block axis must map to one axis of the same size.
  """
  shape = tuple(int(d) for d in shape)
  if shape == q.shape:
    return q
  if math.prod(shape) != q.size:
    raise Unsupported(f"reshape {q.shape} -> {shape} changes the size")
  q = squeeze(q, [a for a, d in enumerate(q.shape) if d == 1])
  core = [d for d in shape if d != 1]
  blk = block_axis(q)
  red = _reduced(q)
  arrays = _arrays(q)
  new_axes: list[int] = []
  shapes: dict[str, list[int]] = {k: [] for k in arrays}
  for gi, gj in groups(q.shape, core):
    if len(gi) == 1 and len(gj) == 1:
      for k, v in arrays.items():
        shapes[k].append(v.shape[gi[0]])
      if gi[0] in red:
        new_axes.append(gj[0])
      continue
    if blk in gi:
      raise Unsupported("reshape splits or merges the block axis")
    for k, v in arrays.items():
      sizes = [v.shape[a] for a in gi]
      if all(s == 1 for s in sizes):
        shapes[k].extend([1] * len(gj))
      elif all(s == q.shape[a] for s, a in zip(sizes, gi, strict=True)):
        shapes[k].extend(core[b] for b in gj)
      else:
        raise Unsupported(f"reshape merges axes with and without their own {k}")
    if all(a in red for a in gi):
      new_axes.extend(gj)
    elif any(a in red for a in gi):
      raise Unsupported("reshape merges shared and per-channel axes")
  arrays = {k: v.reshape(shapes[k]) for k, v in arrays.items()}
  out = _replace(q, arrays, new_axes, len(core))
  return expand(out, [a for a, d in enumerate(shape) if d == 1], len(shape))


def slice_axes(
  q: QArray,
  starts: Sequence[Any],
  sizes: Sequence[int],
  strides: Sequence[int] | None = None,
  *,
  dynamic: bool = False,
) -> QArray:
  """``lax.slice`` (or ``lax.dynamic_slice`` with traced ``starts``) of the logical array."""
  shape = q.shape
  blk = block_axis(q)
  strides = tuple(strides) if strides else (1,) * q.ndim
  whole = (
    [
      not dynamic and int(st) == 0 and sz == d and s == 1
      for st, sz, d, s in zip(starts, sizes, shape, strides, strict=True)
    ]
    if not dynamic
    else [sz == d for sz, d in zip(sizes, shape, strict=True)]
  )
  if blk is not None and not whole[blk]:
    raise Unsupported("slices the block axis")
  arrays = {}
  for k, v in _arrays(q).items():
    st = [0 if v.shape[a] != shape[a] else starts[a] for a in range(q.ndim)]
    sz = [v.shape[a] if v.shape[a] != shape[a] else sizes[a] for a in range(q.ndim)]
    if dynamic:
      arrays[k] = lax.dynamic_slice(v, [jnp.asarray(s) for s in st], sz)
    else:
      step = [1 if v.shape[a] != shape[a] else strides[a] for a in range(q.ndim)]
      lim = [int(s) + (z - 1) * t + 1 for s, z, t in zip(st, sz, step, strict=True)]
      arrays[k] = lax.slice(v, [int(s) for s in st], lim, step)
  return _replace(q, arrays, _reduced(q), q.ndim)


def take(q: QArray, indices: Any, axis: int) -> QArray:
  """``jnp.take(array, indices, axis)`` of the logical array along an axis that is not
  the block axis (its scales, zero points and offsets taken alike; shared ones kept)."""
  axis %= q.ndim
  if axis == block_axis(q):
    raise Unsupported("takes along the block axis")
  n = q.shape[axis]
  arrays = {
    k: v if v.shape[axis] != n else jnp.take(v, indices, axis=axis) for k, v in _arrays(q).items()
  }
  return _replace(q, arrays, _reduced(q), q.ndim)


def gather(q: QArray, indices: jax.Array, dnums: Any, slice_sizes: Sequence[int]) -> QArray:
  """``lax.gather`` of the logical array: gathers int8 rows and their scales.

  Every axis that is not indexed must be taken whole; indices that are out of
  range are clamped (the float model's fill value is not reproduced).
  """
  if dnums.operand_batching_dims:
    raise Unsupported("batched gather")
  shape = q.shape
  blk = block_axis(q)
  indexed = set(dnums.start_index_map)
  if blk in indexed:
    raise Unsupported("gathers along the block axis")
  for a in range(q.ndim):
    if a not in indexed and slice_sizes[a] != shape[a]:
      raise Unsupported("gather takes part of an axis that is not indexed")
  arrays = {}
  for k, v in _arrays(q).items():
    sizes = []
    for a in range(q.ndim):
      if a in indexed and v.shape[a] != shape[a]:
        if slice_sizes[a] != 1:
          raise Unsupported("gathers windows along a shared scale")
        sizes.append(1)
      elif a in indexed:
        sizes.append(slice_sizes[a])
      else:
        sizes.append(v.shape[a])
    arrays[k] = lax.gather(v, indices, dnums, tuple(sizes), mode=lax.GatherScatterMode.CLIP)
  kept = [a for a in range(q.ndim) if a not in dnums.collapsed_slice_dims]
  out_ndim = arrays["values"].ndim
  axes = [dnums.offset_dims[kept.index(a)] for a in _reduced(q) if a in kept]
  return _replace(q, arrays, axes, out_ndim)


def merge_leading(q: QArray, n: int) -> QArray:
  """Merges the first ``n`` axes into one (the contraction of a multi-axis matmul).

  Scales along merged per-channel axes become per-block scales of a block
  scheme when the block axis is the last merged one and its size is a
  multiple of the block; other layouts raise :class:`Unsupported`.
  """
  if n <= 1:
    return q
  if q.perm is not None:
    raise Unsupported("merges the axes of a kernel whose inputs are stored permuted")
  blk = block_axis(q)
  if blk is None:
    return reshape(q, (math.prod(q.shape[:n]),) + tuple(q.shape[n:]))
  size = q.shape[blk]
  block = int(q.block_size or 1)
  if q.scale.shape[blk] == 1 and size < block:  # one partial block: as wide as the axis
    q = dataclasses.replace(q, block_size=size)
    block = size
  if blk != n - 1 or size % block or q.pad:
    raise Unsupported(
      f"the block axis {blk} with {q.shape[blk]} values is not the innermost contracted "
      f"axis in whole blocks of {block}"
    )
  arrays = {}
  for k, v in _arrays(q).items():
    arrays[k] = v.reshape((math.prod(v.shape[:n]),) + tuple(v.shape[n:]))
  return _replace(q, arrays, [0], q.ndim - n + 1)
