"""Switching the manifest's int8 text codec between the native library and numpy."""

import contextlib

import pytest

from sensorquant_jax._src import native as _native

CODECS = ["native", "portable"]


@contextlib.contextmanager
def use_codec(name: str):
  """Runs the body with the native codec (skipping without a compiler) or numpy's."""
  had, saved = "lib" in _native._STATE, _native._STATE.get("lib")
  if name == "native":
    if _native._compiler() is None:
      pytest.skip("no C++ compiler")
    assert _native.library() is not None, _native.build_error()
  else:
    _native._STATE["lib"] = None
  try:
    yield name
  finally:
    if had:
      _native._STATE["lib"] = saved
    else:
      _native._STATE.pop("lib", None)
