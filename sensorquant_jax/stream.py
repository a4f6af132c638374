"""Streaming quantization: float checkpoint on disk -> quantized checkpoint on disk."""

from sensorquant_jax._src import reexport as _reexport

_HOMES = {
  "sensorquant_jax._src.stream": "quantize_file",
}
__all__ = _reexport.public_names(_HOMES)
__getattr__, __dir__ = _reexport.lazy(__name__, _HOMES)
