"""The bundled HAPT sensor encoder, its weights and held-out split."""

from sensorquant_jax._src import reexport as _reexport

_HOMES = {
  "sensorquant_jax._src.example_model": (
    "ACTIVITIES CHANNELS EncoderBlock EncoderConfig SensorEncoder WINDOW accuracy load_example"
  ),
}
__all__ = _reexport.public_names(_HOMES)
__getattr__, __dir__ = _reexport.lazy(__name__, _HOMES)
