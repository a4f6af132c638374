"""Float kernels that read a per-input-channel scaled input (SmoothQuant's output)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class InputScaled:
  """A float kernel that computes ``(x * input_scale) @ kernel``.

  :func:`sensorquant_jax.smoothquant` returns these: the outliers of ``x``
  moved into ``kernel``. :func:`sensorquant_jax.quantize` turns one into a
  :class:`~sensorquant_jax.QArray` carrying the same ``input_scale``;
  :func:`sensorquant_jax.dequantize` and :func:`sensorquant_jax.apply` fold
  it back (``kernel * input_scale``). Plain ``model.apply`` refuses it, so a
  smoothed tree is never run without its scales.

  Attributes:
    kernel: the smoothed float kernel ``[*in, *out]``.
    input_scale: float32, shaped ``[*in, 1, ...]`` (broadcasts on ``kernel``).
  """

  kernel: jax.Array
  input_scale: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.kernel.shape)

  @property
  def dtype(self) -> Any:
    return self.kernel.dtype

  def fold(self, dtype: Any = None) -> jax.Array:
    """The equivalent plain kernel ``kernel * input_scale``."""
    out = self.kernel.astype(jnp.float32) * self.input_scale.astype(jnp.float32)
    return out.astype(dtype or self.kernel.dtype)


def is_input_scaled(x: Any) -> bool:
  return isinstance(x, InputScaled)
