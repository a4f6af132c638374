"""sensorquant_jax: exact, fast INT8 (and packed int4) quantization for Flax checkpoints.

Everything public is importable from here (``import sensorquant_jax as sq``);
the submodules ``manifest``, ``nnx``, ``checkpoint``, ``stream`` and
``example_model`` are public too. Names resolve on first use, so importing the
package is cheap (no JAX import) and builds nothing."""

__version__ = "0.1.0"

from sensorquant_jax._src import reexport as _reexport

_HOMES = {
  "sensorquant_jax._src.awq": "awq",
  "sensorquant_jax._src.calibrate": "ObserverConfig calibrate",
  "sensorquant_jax._src.calibration": (
    "LayerCalibration act_scales load_calibration save_calibration"
  ),
  "sensorquant_jax._src.checkpoint": "CheckpointError load_float restore save",
  "sensorquant_jax._src.convert": (
    "RequantizationWarning default_layer_name from_manifest to_manifest"
  ),
  "sensorquant_jax._src.fileio": "DestinationError",
  "sensorquant_jax._src.gguf_io": "export_gguf gguf_llama_names gguf_llama_unpermute",
  "sensorquant_jax._src.hf_quantized": "export_gptq hf_flax_names",
  "sensorquant_jax._src.gptq": "gptq",
  "sensorquant_jax._src.imported": "Imported load_quantized",
  "sensorquant_jax._src.linen": "QuantizedDense QuantizedDenseGeneral apply quantized_module",
  "sensorquant_jax._src.manifest": "ManifestError",
  "sensorquant_jax._src.native": "NativeBuildWarning",
  "sensorquant_jax._src.ops": "dense dense_general",
  "sensorquant_jax._src.options": (
    "ASYMMETRIC_INT4 ASYMMETRIC_PER_CHANNEL FP8_BLOCK FP8_PER_CHANNEL FP8_PER_TENSOR FP8_SCHEMES "
    "IMPLS INT4 INT4_SCHEMES Impl MODES Mode OBSERVERS Observer PER_BLOCK PER_CHANNEL "
    "PER_TENSOR SCHEMES Scheme bits_of"
  ),
  "sensorquant_jax._src.packed": "PackedQArray pack unpack",
  "sensorquant_jax._src.policy": "Budget Policy auto_policy",
  "sensorquant_jax._src.qarray": "QArray is_qarray",
  "sensorquant_jax._src.qat": (
    "QATWeight distill fake_quant fake_quantized is_qat_weight qat qat_act_scales qat_export"
  ),
  "sensorquant_jax._src.quantize": (
    "MIN_SIZE NonFiniteError Rule RulesLike dequantize nbytes quantize quantize_array"
  ),
  "sensorquant_jax._src.report": "report",
  "sensorquant_jax._src.scaled": "InputScaled",
  "sensorquant_jax._src.smoothquant": "smoothquant",
  "sensorquant_jax._src.schemes": "DEFAULT_BLOCK_SIZE DEFAULT_GROUP_SIZE",
  "sensorquant_jax._src.transform": "DequantizedWarning Explanation Use explain quantized",
  "sensorquant_jax._src.tree_paths": "path_str",
  "sensorquant_jax._src.tuning": "TuningCacheWarning",
  "sensorquant_jax._src.autotune": "tune",
}
_SUBMODULES = ("checkpoint", "example_model", "manifest", "nnx", "stream")
__all__ = _reexport.public_names(_HOMES, _SUBMODULES)
__getattr__, __dir__ = _reexport.lazy(__name__, _HOMES, submodules=_SUBMODULES)
