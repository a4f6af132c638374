"""The Rust ``sensorlm`` INT8 manifest: data model, byte-exact writer, strict reader."""

from sensorquant_jax._src import reexport as _reexport

_HOMES = {
  "sensorquant_jax._src.calibration": "LayerCalibration",
  "sensorquant_jax._src.manifest": (
    "Calibrator ManifestError QuantizedModel QuantizedWeights SCHEME fp16_bits_to_fp32 "
    "fp32_to_fp16_bits is_manifest_file quantize_model_weights"
  ),
}
__all__ = _reexport.public_names(_HOMES)
__getattr__, __dir__ = _reexport.lazy(__name__, _HOMES)
