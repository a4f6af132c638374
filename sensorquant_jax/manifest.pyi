"""Types of :mod:`sensorquant_jax.manifest` (lazy re-exports)."""

from sensorquant_jax._src.calibration import LayerCalibration as LayerCalibration
from sensorquant_jax._src.manifest import SCHEME as SCHEME
from sensorquant_jax._src.manifest import Calibrator as Calibrator
from sensorquant_jax._src.manifest import ManifestError as ManifestError
from sensorquant_jax._src.manifest import QuantizedModel as QuantizedModel
from sensorquant_jax._src.manifest import QuantizedWeights as QuantizedWeights
from sensorquant_jax._src.manifest import fp16_bits_to_fp32 as fp16_bits_to_fp32
from sensorquant_jax._src.manifest import fp32_to_fp16_bits as fp32_to_fp16_bits
from sensorquant_jax._src.manifest import is_manifest_file as is_manifest_file
from sensorquant_jax._src.manifest import quantize_model_weights as quantize_model_weights

__all__: list[str]
