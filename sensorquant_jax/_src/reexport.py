"""Lazy re-exports for the public namespaces, and deprecated module aliases.

The public modules hold no code: they map each public name to the private
module that defines it, and import that module on first access (PEP 562), so
``import sensorquant_jax`` does not import JAX, Flax or Orbax until they are
used, and builds nothing.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy(
  module_name: str,
  homes: Mapping[str, str],
  *,
  submodules: Iterable[str] = (),
  deprecated: str | None = None,
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
  """``(__getattr__, __dir__)`` for a module re-exporting names from private modules.

  Args:
    module_name: the public module's ``__name__`` (for error messages).
    homes: private module -> the names it provides, separated by spaces.
    submodules: public submodules of ``module_name`` to expose as attributes.
    deprecated: if given, every access warns with this advice.

  Returns:
    Functions to assign to the module's ``__getattr__`` and ``__dir__``.
  """
  where = {name: (module, False) for module, names in homes.items() for name in names.split()}
  where.update((sub, (f"{module_name}.{sub}", True)) for sub in submodules)

  def __getattr__(name: str) -> Any:
    if name not in where:
      raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
    if deprecated:
      warnings.warn(
        f"{module_name}.{name} is deprecated: {deprecated}", DeprecationWarning, stacklevel=2
      )
    path, whole = where[name]
    module = importlib.import_module(path)
    value = module if whole else getattr(module, name)
    if not deprecated:
      setattr(sys.modules[module_name], name, value)  # later lookups skip __getattr__
    return value

  def __dir__() -> list[str]:
    return sorted(where)

  return __getattr__, __dir__


def public_names(homes: Mapping[str, str], submodules: Iterable[str] = ()) -> list[str]:
  """The names a public module exports (its ``__all__``), sorted."""
  return sorted({n for names in homes.values() for n in names.split()} | set(submodules))


_PRIVATE = "sensorquant_jax._src."

# The modules that were public before the private package existed, with the
# names they offered; each still resolves them, with a DeprecationWarning.
_OLD_MODULES: dict[str, dict[str, str]] = {
  "schemes": {
    "options": "PER_TENSOR PER_CHANNEL PER_BLOCK ASYMMETRIC_PER_CHANNEL SCHEMES",
    "schemes": "DEFAULT_BLOCK_SIZE Spec default_axes resolve quantize_leaf",
  },
  "ops": {
    "ops": "TILED_MAX_ROWS TILED_MIN_SIZE quantize_activations dense_general dense",
    "options": "MODES IMPLS",
    "packed": "DEFAULT_TILE PackedQArray pack unpack NATIVE_TILE default_pack_tile is_quantized",
  },
  "linen": {"linen": "apply QuantizedDense QuantizedDenseGeneral", "flax_common": "transpose_2d"},
  "qarray": {"qarray": "QArray is_qarray"},
  "calibrate": {
    "calibrate": "ObserverConfig calibrate",
    "calibration": "act_scales save_calibration load_calibration is_calibration_file",
    "options": "OBSERVERS",
  },
  "report": {"report": "report", "policy": "CANDIDATES Budget Policy auto_policy"},
  "convert": {
    "convert": "NameFn RequantizationWarning default_layer_name to_manifest from_manifest"
  },
  "quantize": {
    "quantize": "MIN_SIZE NonFiniteError Rule RulesLike quantize_array quantize dequantize nbytes"
  },
}


def deprecated_module(module_name: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
  """``(__getattr__, __dir__)`` for an old public module that is private now.

  ``quantize``, ``calibrate`` and ``report`` are also functions of the package.
  Importing the old module by its dotted name makes Python set the package
  attribute of that name to the module, so such a module is made callable,
  forwarding to the function: ``sq.report(...)`` keeps working either way.
  """
  short = module_name.rsplit(".", 1)[-1]
  homes = {_PRIVATE + k: v for k, v in _OLD_MODULES[short].items()}
  if short in _OLD_MODULES[short].get(short, "").split():
    function_home = _PRIVATE + short

    class _CallableModule(types.ModuleType):
      def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(function_home), short)(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
  advice = "import it from sensorquant_jax instead (its module is private now)"
  return lazy(module_name, homes, deprecated=advice)
