"""Types of :mod:`sensorquant_jax.stream` (lazy re-exports)."""

from sensorquant_jax._src.stream import quantize_file as quantize_file

__all__: list[str]
