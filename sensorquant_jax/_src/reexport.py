"""Lazy re-exports for the public namespaces.

The public modules hold no code: they map each public name to the private
module that defines it, and import that module on first access (PEP 562), so
``import sensorquant_jax`` does not import JAX, Flax or Orbax until they are
used, and builds nothing.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy(
  module_name: str,
  homes: Mapping[str, str],
  *,
  submodules: Iterable[str] = (),
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
  """``(__getattr__, __dir__)`` for a module re-exporting names from private modules.

  Args:
    module_name: the public module's ``__name__`` (for error messages).
    homes: private module -> the names it provides, separated by spaces.
    submodules: public submodules of ``module_name`` to expose as attributes.

  Returns:
    Functions to assign to the module's ``__getattr__`` and ``__dir__``.
  """
  where = {name: (module, False) for module, names in homes.items() for name in names.split()}
  where.update((sub, (f"{module_name}.{sub}", True)) for sub in submodules)

  def __getattr__(name: str) -> Any:
    if name not in where:
      raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
    path, whole = where[name]
    module = importlib.import_module(path)
    value = module if whole else getattr(module, name)
    setattr(sys.modules[module_name], name, value)  # later lookups skip __getattr__
    return value

  def __dir__() -> list[str]:
    return sorted(where)

  return __getattr__, __dir__


def public_names(homes: Mapping[str, str], submodules: Iterable[str] = ()) -> list[str]:
  """The names a public module exports (its ``__all__``), sorted."""
  return sorted({n for names in homes.values() for n in names.split()} | set(submodules))
