"""The manifest parser: schema-driven recursive descent over bytes, strict."""

from __future__ import annotations

import json
import mmap
import re
from typing import Any

import numpy as np

from sensorquant_jax._src import intparse
from sensorquant_jax._src.fileio import first_line
from sensorquant_jax._src.manifest_format import (
  MAX_DEPTH,
  MAX_RANK,
  U64_MAX,
  ManifestError,
)

_WS_RE = re.compile(rb"[ \t\n\r]*")

_CTRL_RE = re.compile(rb"[\x00-\x1f]")

_NUM_RE = re.compile(rb"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


class Parser:
  def __init__(self, data: bytes | mmap.mmap):
    self.b = data
    self.i = 0
    self.context = "manifest"

  # -- low level -----------------------------------------------------------
  def fail(self, what: str) -> ManifestError:
    return ManifestError(f"{self.context}: {what} (at byte {self.i})")

  def ws(self) -> None:
    m = _WS_RE.match(self.b, self.i)
    self.i = m.end() if m else self.i

  def peek(self) -> int:
    self.ws()
    if self.i >= len(self.b):
      raise self.fail("unexpected end of file")
    return self.b[self.i]

  def expect(self, ch: bytes) -> None:
    if self.peek() != ch[0]:
      raise self.fail(f"expected {ch.decode()!r}, found {chr(self.b[self.i])!r}")
    self.i += 1

  def string(self) -> str:
    if self.peek() != 0x22:
      raise self.fail("expected a string")
    # Find the closing quote: the first '"' preceded by an even run of
    # backslashes. Linear in the string and allocation-free until decoding.
    b, start = self.b, self.i
    j = start + 1
    while True:
      j = b.find(b'"', j)
      if j < 0:
        raise self.fail("unterminated string")
      k = j
      while b[k - 1] == 0x5C:
        k -= 1
      if (j - k) % 2 == 0:
        break
      j += 1
    if _CTRL_RE.search(b, start, j):
      raise self.fail("invalid string (control character)")
    # Decoded from a memoryview: no copy of the (possibly huge) raw bytes.
    view = memoryview(b)
    try:
      if b.find(b"\\", start, j) < 0:
        s = str(view[start + 1 : j], "utf-8")
      else:
        s = json.loads(str(view[start : j + 1], "utf-8"))
        s.encode("utf-8")  # lone surrogates from \ud800-style escapes
    except (UnicodeError, ValueError) as e:
      raise self.fail(f"invalid string: {first_line(e)}") from None
    finally:
      view.release()
    self.i = j + 1
    return s

  def number_text(self) -> bytes:
    self.peek()
    m = _NUM_RE.match(self.b, self.i)
    if m is None:
      raise self.fail("expected a number")
    self.i = m.end()
    return m.group(0)

  def uint(self, field: str) -> int:
    c = self.peek()
    if c != 0x2D and not 0x30 <= c <= 0x39:
      raise self.fail(f"{field}: expected an unsigned integer")
    text = self.number_text()
    if b"." in text or b"e" in text or b"E" in text:
      raise self.fail(f"{field}: expected an unsigned integer, got {text.decode()}")
    if text.startswith(b"-"):
      raise self.fail(f"{field}: negative value {text.decode()}")
    if len(text) > 20 or int(text) > U64_MAX:
      raise self.fail(f"{field}: {text[:30].decode()} does not fit in u64")
    return int(text)

  def f32(self, field: str) -> np.float32:
    c = self.peek()
    if c == 0x6E and self.at(b"null"):
      raise self.fail(f"{field}: null is not a number")
    if c != 0x2D and not 0x30 <= c <= 0x39:
      raise self.fail(f"{field}: expected a number")
    text = self.number_text()
    # serde_json parses f32 via f64 and casts; 1e39 becomes inf (refused later).
    with np.errstate(over="ignore"):
      return np.float32(float(text))

  def at(self, word: bytes) -> bool:
    return self.b[self.i : self.i + len(word)] == word

  def literal(self, word: bytes):
    if not self.at(word):
      raise self.fail("invalid literal")
    self.i += len(word)
    return {b"null": None, b"true": True, b"false": False}[word]

  def value(self, depth: int = 0):
    """Any JSON value (for keys serde ignores); nesting is bounded."""
    if depth > MAX_DEPTH:
      raise self.fail("JSON nested too deeply")
    c = self.peek()
    if c == 0x7B:
      self.i += 1
      seen = set()
      if self.peek() == 0x7D:
        self.i += 1
        return {}
      while True:
        k = self.string()
        if k in seen:
          raise self.fail(f"duplicate key {k!r}")
        seen.add(k)
        self.expect(b":")
        self.value(depth + 1)
        if self.peek() == 0x2C:
          self.i += 1
          continue
        self.expect(b"}")
        return None
    if c == 0x5B:
      self.i += 1
      if self.peek() == 0x5D:
        self.i += 1
        return []
      while True:
        self.value(depth + 1)
        if self.peek() == 0x2C:
          self.i += 1
          continue
        self.expect(b"]")
        return None
    if c == 0x22:
      return self.string()
    if c in (0x74, 0x66, 0x6E):
      for w in (b"true", b"false", b"null"):
        if self.at(w):
          return self.literal(w)
      raise self.fail("invalid literal")
    if c == 0x2D or 0x30 <= c <= 0x39:
      return self.number_text()
    raise self.fail(f"unexpected character {chr(c)!r}")

  def obj(self, handlers: dict[str, Any]) -> set[str]:
    """Parses an object, dispatching known keys; unknown keys are skipped."""
    self.expect(b"{")
    seen: set[str] = set()
    if self.peek() == 0x7D:
      self.i += 1
      return seen
    while True:
      key = self.string()
      if key in seen:
        raise self.fail(f"duplicate field {key!r}")
      seen.add(key)
      self.expect(b":")
      if key in handlers:
        handlers[key]()
      else:
        self.value(1)
      if self.peek() == 0x2C:
        self.i += 1
        continue
      self.expect(b"}")
      return seen

  def array(self, item) -> list:
    self.expect(b"[")
    out: list = []
    if self.peek() == 0x5D:
      self.i += 1
      return out
    while True:
      out.append(item(len(out)))
      if self.peek() == 0x2C:
        self.i += 1
        continue
      self.expect(b"]")
      return out

  # -- schema --------------------------------------------------------------
  def int8_list(self) -> np.ndarray:
    self.expect(b"[")
    stop = self.b.find(b"]", self.i)
    if stop < 0:
      raise self.fail("weights_i8: unterminated array")
    try:
      values = intparse.parse_int8_list(self.b, self.i, stop)
    except intparse.IntArrayError as e:
      raise self.fail(f"weights_i8: {e}") from None
    self.i = stop + 1
    return values

  def layer(self, index: int) -> tuple:
    """``(name, weights_i8, shape, scale, bias)`` of one layer."""
    self.context = f"layer {index}"
    got: dict[str, Any] = {}

    def setter(key, fn):
      def run():
        got[key] = fn()

      return run

    def bias():
      if self.peek() == 0x6E:
        return self.literal(b"null")
      vals = self.array(lambda k: self.f32(f"bias[{k}]"))
      return np.array(vals, np.float32)

    self.obj(
      {
        "name": setter("name", self._named_string),
        "weights_i8": setter("weights_i8", self.int8_list),
        "shape": setter("shape", lambda: self.array(self._shape_entry)),
        "scale": setter("scale", lambda: self.f32("scale")),
        "bias": setter("bias", bias),
      }
    )
    for key in ("name", "weights_i8", "shape", "scale"):
      if key not in got:
        raise self.fail(f"missing field {key!r}")
    return (got["name"], got["weights_i8"], tuple(got["shape"]), got["scale"], got.get("bias"))

  def _shape_entry(self, k: int) -> int:
    if k >= MAX_RANK:
      raise self.fail(f"shape has more than {MAX_RANK} entries")
    return self.uint(f"shape[{k}]")

  def _named_string(self) -> str:
    s = self.string()
    self.context = f"{self.context} ({s!r})"
    return s

  def parse_model(self) -> dict[str, Any]:
    """The manifest's fields (``layers`` as :meth:`layer` tuples)."""
    got: dict[str, Any] = {}

    def top(key, fn):
      def run():
        self.context = f"field {key!r}"
        got[key] = fn()
        self.context = "manifest"

      return run

    if not self.b:
      raise self.fail("empty file")
    self.obj(
      {
        "config_json": top("config_json", self.string),
        "layers": top("layers", lambda: self.array(self.layer)),
        "scheme": top("scheme", self.string),
        "total_quantized_bytes": top(
          "total_quantized_bytes", lambda: self.uint("total_quantized_bytes")
        ),
        "total_fp32_bytes": top("total_fp32_bytes", lambda: self.uint("total_fp32_bytes")),
      }
    )
    self.ws()
    if self.i != len(self.b):
      raise self.fail("trailing characters after the manifest")
    for key in ("config_json", "layers", "scheme", "total_quantized_bytes", "total_fp32_bytes"):
      if key not in got:
        raise self.fail(f"missing field {key!r}")
    return got
