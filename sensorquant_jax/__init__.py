"""sensorquant_jax: exact, fast INT8 quantization for Flax checkpoints."""

from sensorquant_jax import manifest, nnx
from sensorquant_jax._fileio import DestinationError
from sensorquant_jax._native import NativeBuildWarning
from sensorquant_jax.calibrate import (
  ObserverConfig,
  act_scales,
  calibrate,
  load_calibration,
  save_calibration,
)
from sensorquant_jax.checkpoint import CheckpointError, load_float, restore, save
from sensorquant_jax.convert import (
  RequantizationWarning,
  default_layer_name,
  from_manifest,
  to_manifest,
)
from sensorquant_jax.linen import QuantizedDense, QuantizedDenseGeneral, apply
from sensorquant_jax.manifest import ManifestError
from sensorquant_jax.ops import PackedQArray, dense, dense_general, pack, unpack
from sensorquant_jax.qarray import QArray, is_qarray
from sensorquant_jax.quantize import (
  MIN_SIZE,
  NonFiniteError,
  Rule,
  dequantize,
  nbytes,
  quantize,
  quantize_array,
)
from sensorquant_jax.report import Budget, Policy, auto_policy, report
from sensorquant_jax.schemes import SCHEMES
from sensorquant_jax.tree_paths import path_str

__version__ = "0.1.0"

__all__ = [
  "Budget",
  "ObserverConfig",
  "Policy",
  "act_scales",
  "auto_policy",
  "calibrate",
  "load_calibration",
  "report",
  "save_calibration",
  "CheckpointError",
  "DestinationError",
  "load_float",
  "restore",
  "save",
  "NativeBuildWarning",
  "PackedQArray",
  "QuantizedDense",
  "QuantizedDenseGeneral",
  "apply",
  "dense",
  "dense_general",
  "nnx",
  "pack",
  "unpack",
  "ManifestError",
  "RequantizationWarning",
  "default_layer_name",
  "from_manifest",
  "manifest",
  "to_manifest",
  "MIN_SIZE",
  "NonFiniteError",
  "QArray",
  "Rule",
  "SCHEMES",
  "dequantize",
  "is_qarray",
  "nbytes",
  "path_str",
  "quantize",
  "quantize_array",
]
