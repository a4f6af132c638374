"""Types of :mod:`sensorquant_jax.nnx` (lazy re-exports)."""

from sensorquant_jax._src.nnx import QuantizedEinsum as QuantizedEinsum
from sensorquant_jax._src.nnx import QuantizedEmbed as QuantizedEmbed
from sensorquant_jax._src.nnx import QuantizedLinear as QuantizedLinear
from sensorquant_jax._src.nnx import quantize as quantize

__all__: list[str]
