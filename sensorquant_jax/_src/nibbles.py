"""The int4 storage layout: two 4-bit codes a byte along one axis.

Codes are unsigned, 0 to 15. Along the packed axis, element ``2 i`` is the low
nibble of byte ``i`` and element ``2 i + 1`` its high nibble
(``byte = code[2 i] | code[2 i + 1] << 4``), the order GGUF and most int4
kernels use, so a byte row holds two consecutive rows of the contraction and
kernels unpack it with one mask and one shift. An odd length gets one
padding nibble at the end (``fill``); :class:`~sensorquant_jax.QArray`
records it in ``pad`` and never shows it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def packed_len(n: int) -> int:
  """Bytes along the packed axis for ``n`` codes."""
  return (n + 1) // 2


def pack(codes: jax.Array, axis: int, fill: int = 0) -> jax.Array:
  """Packs uint8 codes (0-15) two a byte along ``axis``.

  Args:
    codes: integer array of codes in ``[0, 15]`` (higher bits are dropped).
    axis: the axis to pack.
    fill: the code of the padding nibble when that axis has odd length.

  Returns:
    uint8 array with ``ceil(n / 2)`` entries along ``axis``.
  """
  axis %= codes.ndim
  codes = codes.astype(jnp.uint8) & jnp.uint8(0xF)
  n = codes.shape[axis]
  if n % 2:
    widths = [(0, 0)] * codes.ndim
    widths[axis] = (0, 1)
    codes = jnp.pad(codes, widths, constant_values=np.uint8(fill))
    n += 1
  lo = lax.slice_in_dim(codes, 0, n, stride=2, axis=axis)
  hi = lax.slice_in_dim(codes, 1, n, stride=2, axis=axis)
  return lo | (hi << jnp.uint8(4))


def unpack(packed: jax.Array, axis: int, n: int) -> jax.Array:
  """Inverse of :func:`pack`: the ``n`` uint8 codes along ``axis``."""
  axis %= packed.ndim
  lo = packed & jnp.uint8(0xF)
  hi = packed >> jnp.uint8(4)
  both = jnp.stack([lo, hi], axis=axis + 1)
  shape = packed.shape[:axis] + (2 * packed.shape[axis],) + packed.shape[axis + 1 :]
  return lax.slice_in_dim(both.reshape(shape), 0, n, axis=axis)
