"""Types of :mod:`sensorquant_jax.checkpoint` (lazy re-exports)."""

from sensorquant_jax._src.checkpoint import FORMAT as FORMAT
from sensorquant_jax._src.checkpoint import SPEC_FILE as SPEC_FILE
from sensorquant_jax._src.checkpoint import CheckpointError as CheckpointError
from sensorquant_jax._src.checkpoint import CheckpointWriter as CheckpointWriter
from sensorquant_jax._src.checkpoint import is_checkpoint as is_checkpoint
from sensorquant_jax._src.checkpoint import iter_float_leaves as iter_float_leaves
from sensorquant_jax._src.checkpoint import load_float as load_float
from sensorquant_jax._src.checkpoint import read_spec as read_spec
from sensorquant_jax._src.checkpoint import restore as restore
from sensorquant_jax._src.checkpoint import save as save
from sensorquant_jax._src.fileio import DestinationError as DestinationError

__all__: list[str]
