"""Quantizing Flax NNX models: ``quantize`` and the ``QuantizedModel`` it returns."""

from sensorquant_jax._src import reexport as _reexport

_HOMES = {
  "sensorquant_jax._src.nnx": "QuantizedModel quantize",
}
__all__ = _reexport.public_names(_HOMES)
__getattr__, __dir__ = _reexport.lazy(__name__, _HOMES)
