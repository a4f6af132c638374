"""Typed string options (schemes, modes, impls, observers) and their validation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Literal, get_args

import numpy as np

Scheme = Literal[
  "symmetric_per_tensor_int8",
  "symmetric_per_channel_int8",
  "symmetric_per_block_int8",
  "asymmetric_per_channel_int8",
  "symmetric_per_group_int4",
  "asymmetric_per_group_int4",
  "fp8_e4m3_per_tensor",
  "fp8_e4m3_per_channel",
  "fp8_e4m3_block128",
]
SCHEMES: tuple[Scheme, ...] = get_args(Scheme)
"""Scheme names, the Rust module's first."""
PER_TENSOR: Final = "symmetric_per_tensor_int8"
PER_CHANNEL: Final = "symmetric_per_channel_int8"
PER_BLOCK: Final = "symmetric_per_block_int8"
ASYMMETRIC_PER_CHANNEL: Final = "asymmetric_per_channel_int8"
INT4: Final = "symmetric_per_group_int4"
ASYMMETRIC_INT4: Final = "asymmetric_per_group_int4"
INT4_SCHEMES: Final = (INT4, ASYMMETRIC_INT4)
FP8_PER_TENSOR: Final = "fp8_e4m3_per_tensor"
FP8_PER_CHANNEL: Final = "fp8_e4m3_per_channel"
FP8_BLOCK: Final = "fp8_e4m3_block128"
FP8_SCHEMES: Final = (FP8_PER_TENSOR, FP8_PER_CHANNEL, FP8_BLOCK)
"""Schemes storing ``float8_e4m3fn`` values (OCP E4M3: no infinities, max 448)."""
FP8_MAX: Final = 448.0
"""The largest finite ``float8_e4m3fn``: fp8 scales map ``max|w|`` onto it."""
BLOCK_SCHEMES: Final = ("symmetric_per_block_int8", INT4, ASYMMETRIC_INT4, FP8_BLOCK)
"""Schemes with one scale per block (group) of values along one axis (``fp8_e4m3_block128``:
one per block and column, equal over each tile of ``block`` columns, see ``schemes``)."""
ASYMMETRIC_SCHEMES: Final = (ASYMMETRIC_PER_CHANNEL, ASYMMETRIC_INT4)
"""Schemes that store a zero point."""


def bits_of(scheme: str) -> int:
  """Bits per stored value of ``scheme`` (4 or 8; the fp8 schemes are 8)."""
  return 4 if scheme in INT4_SCHEMES else 8


MIN_SCALE: Final = np.float32(1e-8)
"""The Rust module's scale floor, as an f32 literal."""

Mode = Literal["weight_only", "w8a8"]
MODES: tuple[Mode, ...] = get_args(Mode)
"""``weight_only``: float activations; ``w8a8``: int8 activations, int32 accumulation
(W4A8 on int4 kernels)."""

Impl = Literal["auto", "native", "xla", "pallas"]
IMPLS: tuple[Impl, ...] = get_args(Impl)
"""``auto``: the implementation timed fastest on this machine (``tuning``);
``native``: the C++ CPU kernels; ``xla``; ``pallas``: the Pallas kernels
(interpret mode off GPU)."""

Observer = Literal["minmax", "moving_average", "percentile", "mse"]
OBSERVERS: tuple[Observer, ...] = get_args(Observer)


def check(kind: str, value: object, allowed: Sequence[str]) -> None:
  """Raises ValueError unless ``value`` is one of ``allowed``.

  Example:
    >>> check("mode", "w8a8", MODES)
  """
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(f"unknown {kind} {value!r}; expected one of {', '.join(allowed)}")
