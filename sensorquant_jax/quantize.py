"""Deprecated alias: ``quantize``, ``Rule`` and friends, now in ``sensorquant_jax``."""

from sensorquant_jax._src import reexport as _reexport

__getattr__, __dir__ = _reexport.deprecated_module(__name__)
