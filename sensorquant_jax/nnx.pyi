"""Types of :mod:`sensorquant_jax.nnx` (lazy re-exports)."""

from sensorquant_jax._src.nnx import QuantizedModel as QuantizedModel
from sensorquant_jax._src.nnx import quantize as quantize

__all__: list[str]
