"""The manifest writer: exactly the bytes ``serde_json::to_string_pretty`` writes."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from sensorquant_jax._src.jsonfmt import format_f32, format_str, int8_lines
from sensorquant_jax._src.manifest_format import ManifestError

if TYPE_CHECKING:
  from sensorquant_jax._src.manifest import QuantizedModel


def pieces(model: QuantizedModel) -> Iterable[bytes]:
  """The manifest's bytes in pieces (a layer's int8 list in several)."""
  yield ('{\n  "config_json": ' + _str(model.config_json) + ',\n  "layers": ').encode()
  if not model.layers:
    yield b"[],\n"
  else:
    yield b"[\n"
    for i, layer in enumerate(model.layers):
      yield ('    {\n      "name": ' + _str(layer.name) + ',\n      "weights_i8": ').encode()
      yield from _array_pieces(layer.weights_i8, int8=True)
      yield b',\n      "shape": '
      yield from _array_pieces(layer.shape)
      yield (',\n      "scale": ' + format_f32(layer.scale) + ',\n      "bias": ').encode()
      if layer.bias is None:
        yield b"null"
      else:
        yield from _array_pieces(layer.bias, f32=True)
      yield b"\n    }" + (b",\n" if i + 1 < len(model.layers) else b"\n")
    yield b"  ],\n"
  yield (
    '  "scheme": '
    + _str(model.scheme)
    + ',\n  "total_quantized_bytes": '
    + str(int(model.total_quantized_bytes))
    + ',\n  "total_fp32_bytes": '
    + str(int(model.total_fp32_bytes))
    + "\n}"
  ).encode()


def write_pipelined(f, pieces: Iterable[bytes], depth: int = 3) -> None:
  """Writes ``pieces`` in order from a helper thread, overlapping the file I/O
  (which releases the GIL) with formatting the next pieces; at most ``depth``
  pieces wait, which bounds memory."""
  with ThreadPoolExecutor(max_workers=1) as pool:
    pending: collections.deque = collections.deque()
    for piece in pieces:
      pending.append(pool.submit(f.write, piece))
      while len(pending) > depth:
        pending.popleft().result()
    while pending:
      pending.popleft().result()


def _str(s: str) -> str:
  try:
    s.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ManifestError(f"string {s[:40]!r} is not valid UTF-8: {e}") from None
  return format_str(s)


def _array_pieces(values, *, int8: bool = False, f32: bool = False) -> Iterable[bytes]:
  """serde pretty array nested at layer-field depth (elements indented by 8)."""
  n = len(values)
  if n == 0:
    yield b"[]"
    return
  yield b"[\n"
  if int8:
    yield from int8_lines(values, 8)
  else:
    fmt = format_f32 if f32 else (lambda v: str(int(v)))
    yield ",\n".join("        " + fmt(v) for v in values).encode() + b"\n"
  yield b"      ]"
