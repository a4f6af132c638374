"""Deprecated alias: ``quantize``, ``Rule`` and friends now live in ``sensorquant_jax``.

``sensorquant_jax.quantize`` is the function. Importing this module by its
dotted name makes Python set the package attribute ``quantize`` to the
module, so the module is callable and forwards to the function: existing
``import sensorquant_jax.quantize`` code and ``sq.quantize(...)`` both keep
working.
"""

import sys
import types
from typing import Any

from sensorquant_jax._src import reexport as _reexport

__getattr__, __dir__ = _reexport.deprecated_module(__name__)


class _CallableModule(types.ModuleType):
  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    from sensorquant_jax._src.quantize import quantize

    return quantize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
