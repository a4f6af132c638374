"""Quantized checkpoints (Orbax) and float checkpoint readers."""

from sensorquant_jax._src import reexport as _reexport

_HOMES = {
  "sensorquant_jax._src.checkpoint": (
    "CheckpointError CheckpointWriter FORMAT SPEC_FILE is_checkpoint iter_float_leaves "
    "load_float read_spec restore save"
  ),
  "sensorquant_jax._src.fileio": "DestinationError",
}
__all__ = _reexport.public_names(_HOMES)
__getattr__, __dir__ = _reexport.lazy(__name__, _HOMES)
