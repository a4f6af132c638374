"""serde_json-compatible formatting: ryu float32 layout, string escapes, int lines."""

from __future__ import annotations

import ctypes
import json

import numpy as np

from sensorquant_jax._src import native


def format_f32(x) -> str:
  """Formats a finite float32 the way ryu 1.0 ``format32`` (serde_json) does.

  Shortest round-trip digits; ``0.0``, ``123456790.0``, ``1e13``, ``0.003937008``,
  ``1e-7``, ``1.5e-7``, ``3.4028235e38``.
  """
  x = np.float32(x)
  if not np.isfinite(x):
    raise ValueError(f"{x} has no JSON representation")
  if x == 0:
    return "-0.0" if np.signbit(x) else "0.0"
  sci = np.format_float_scientific(np.abs(x), unique=True, trim="-")
  mant, exp = sci.split("e")
  digits = mant.replace(".", "").rstrip("0") or "0"
  length = len(digits)
  kk = int(exp) + 1  # 10^(kk-1) <= |x| < 10^kk
  k = kk - length
  sign = "-" if np.signbit(x) else ""
  if 0 <= k and kk <= 13:
    body = digits + "0" * k + ".0"
  elif 0 < kk <= 13:
    body = digits[:kk] + "." + digits[kk:]
  elif -6 < kk <= 0:
    body = "0." + "0" * (-kk) + digits
  elif length == 1:
    body = f"{digits}e{kk - 1}"
  else:
    body = f"{digits[0]}.{digits[1:]}e{kk - 1}"
  return sign + body


def format_str(s: str) -> str:
  """A JSON string literal escaped as serde_json escapes it (UTF-8 kept raw)."""
  return json.dumps(s, ensure_ascii=False)


def _record_table(indent: int) -> np.ndarray:
  """Per int8 value (indexed by its uint8 bit pattern): text, ',\\n', indent; NUL-padded."""
  table = np.zeros(256, "V16")
  for v in range(-128, 128):
    rec = f"{v},\n".encode() + b" " * indent
    table[v & 0xFF] = rec.ljust(16, b"\x00")
  return table


_TABLES: dict[int, np.ndarray] = {}
_CHUNK = 1 << 20


def int8_lines(q: np.ndarray, indent: int):
  """Yields the bytes of ``q`` as serde pretty-printed array elements.

  Every element is ``indent`` spaces, the number and ``,\\n``; the last one has
  no comma. No Python object per element: the native formatter (see
  :mod:`sensorquant_jax._src.native`) copies fixed 16-byte records from a table
  with the GIL released; without it, each value indexes a numpy table of
  NUL-padded records and one ``bytes.translate`` drops the padding.
  """
  if not 0 <= indent <= 10:
    raise ValueError("indent must be in [0, 10]")
  q = np.ascontiguousarray(q, np.int8).reshape(-1)
  n = q.size
  if n == 0:
    return
  lib = native.library()
  if lib is not None:
    yield from _native_lines(lib, q, indent)
    return
  if indent not in _TABLES:
    _TABLES[indent] = _record_table(indent)
  table = _TABLES[indent]
  yield b" " * indent
  for start in range(0, n, _CHUNK):
    out = table[q[start : start + _CHUNK].view(np.uint8)].tobytes().translate(None, b"\x00")
    if start + _CHUNK >= n:
      out = out[: len(out) - 2 - indent] + b"\n"
    yield out


def _native_lines(lib, q: np.ndarray, indent: int):
  fn = lib.SqInt8Lines
  fn.restype = ctypes.c_size_t
  fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
  n = q.size
  for start in range(0, n, _CHUNK):
    chunk = q[start : start + _CHUNK]
    # A fresh buffer per chunk: the previous one may still be queued for writing.
    out = np.empty(chunk.size * (indent + 6) + 16, np.uint8)
    size = fn(chunk.ctypes.data, chunk.size, indent, int(start + _CHUNK >= n), out.ctypes.data)
    yield out.data[:size]
