"""Types of :mod:`sensorquant_jax.example_model` (lazy re-exports)."""

from sensorquant_jax._src.example_model import ACTIVITIES as ACTIVITIES
from sensorquant_jax._src.example_model import CHANNELS as CHANNELS
from sensorquant_jax._src.example_model import WINDOW as WINDOW
from sensorquant_jax._src.example_model import EncoderBlock as EncoderBlock
from sensorquant_jax._src.example_model import EncoderConfig as EncoderConfig
from sensorquant_jax._src.example_model import SensorEncoder as SensorEncoder
from sensorquant_jax._src.example_model import accuracy as accuracy
from sensorquant_jax._src.example_model import load_example as load_example

__all__: list[str]
