"""Vectorised, validating parser for JSON arrays of small integers (``weights_i8``)."""

from __future__ import annotations

import ctypes
import mmap
import os
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from sensorquant_jax._src import native

_CHUNK = 1 << 20  # bytes of text per numpy batch: bounds the temporaries
_WS = (32, 10, 13, 9)


class IntArrayError(ValueError):
  """Raised with a description of the first problem found (caller adds context)."""


def _parse_chunk(a: np.ndarray, final: bool, base: int) -> np.ndarray:
  """Parses ``a`` = text of ``v, v, ..., v,`` (the last chunk ends without comma).

  Tokens are maximal runs of ``[0-9-]``; they must alternate with commas,
  everything else must be JSON whitespace, and each token must be a JSON
  integer in [-127, 127] (no leading zeros, no '+', at most 3 digits).
  """
  isdig = (a - np.uint8(48)) < 10
  isneg = a == 45
  isnum = isdig | isneg
  iscomma = a == 44
  other = ~(isnum | iscomma)
  ws = a[other]
  if ws.size and np.count_nonzero((ws == 32) | (ws == 10)) != ws.size:
    bad = ws[~np.isin(ws, _WS)]
    if bad.size:
      pos = int(np.flatnonzero(other)[np.flatnonzero(~np.isin(ws, _WS))[0]])
      raise IntArrayError(f"unexpected character {chr(bad[0])!r} at byte {base + pos}")
  # Token starts and ends.
  prev = np.empty_like(isnum)
  prev[0] = False
  prev[1:] = isnum[:-1]
  starts = np.flatnonzero(isnum & ~prev)
  nxt = np.empty_like(isnum)
  nxt[-1] = False
  nxt[:-1] = isnum[1:]
  ends = np.flatnonzero(isnum & ~nxt)
  commas = np.flatnonzero(iscomma)
  n = starts.size
  expect_commas = n - 1 if final else n
  if commas.size != expect_commas or n == 0:
    where = base + int(commas[0]) if n == 0 and commas.size else base
    raise IntArrayError(
      f"malformed integer list near byte {where}: {n} numbers and {commas.size} commas"
    )
  # Every comma sits between the end of one token and the start of the next.
  if final:
    ok = np.all(ends[:-1] < commas) and np.all(commas < starts[1:])
  else:
    ok = np.all(ends < commas) and np.all(commas[:-1] < starts[1:])
  if not ok:
    raise IntArrayError(f"malformed integer list near byte {base}")
  neg = a[starts] == 45
  length = ends - starts + 1
  ndig = length - neg
  if np.count_nonzero(isneg) != np.count_nonzero(neg) or np.any(ndig < 1):
    raise IntArrayError(f"malformed number near byte {base + int(starts[0])}")
  if np.any(ndig > 3):
    k = int(np.flatnonzero(ndig > 3)[0])
    text = bytes(a[starts[k] : ends[k] + 1]).decode()
    if text.lstrip("-").startswith("0"):
      raise IntArrayError(f"invalid number {text!r} (leading zero)")
    raise IntArrayError(f"value {text} is outside [-127, 127]")
  lead = a[starts + neg]
  if np.any((lead == 48) & (ndig > 1)):
    k = int(np.flatnonzero((lead == 48) & (ndig > 1))[0])
    text = bytes(a[starts[k] : ends[k] + 1]).decode()
    raise IntArrayError(f"invalid number {text!r} (leading zero)")
  v = (a[ends] - np.uint8(48)).astype(np.int16)
  two = ndig >= 2
  v += np.where(two, a[np.maximum(ends - 1, 0)].astype(np.int16) - 48, 0) * 10
  three = ndig >= 3
  v += np.where(three, a[np.maximum(ends - 2, 0)].astype(np.int16) - 48, 0) * 100
  v = np.where(neg, -v, v)
  if np.any(v > 127) or np.any(v < -127):
    k = int(np.flatnonzero((v > 127) | (v < -127))[0])
    raise IntArrayError(f"value {int(v[k])} at index {k} (of this chunk) is outside [-127, 127]")
  return v.astype(np.int8)


def _parse_canonical_chunk(a: np.ndarray, indent: int, final: bool) -> np.ndarray | None:
  """Fast path for the layout serde and we write; ``None`` if ``a`` is not in it.

  Layout: each element is ``\\n``, ``indent`` spaces and the number; elements
  are separated by commas. A non-final chunk is ``(\\n<indent>num,)*``, the
  final one ``(\\n<indent>num,)*\\n<indent>num``. Every byte is accounted for:
  commas are found, the byte after each separator must be a newline, number
  fields are checked character by character, and what remains (the
  indentation) must be exactly the spaces counted in the chunk.
  """
  c = np.flatnonzero(a == 44)
  n = c.size + 1 if final else c.size
  if n == 0:
    return None
  starts = np.empty(n, np.int64)  # separator before each element (virtual -1 first)
  starts[0] = -1
  starts[1:] = c[: n - 1]
  ends = np.empty(n, np.int64)  # separator after each element (virtual len(a) last)
  if final:
    ends[:-1] = c
    ends[-1] = a.size
  else:
    ends[:] = c
  length = ends - starts - 2 - indent
  if np.any(length < 1) or np.any(length > 4):
    return None
  if np.any(a[starts + 1] != 10):
    return None
  if np.count_nonzero(a == 32) != n * indent:
    return None
  e = ends - 1
  d0 = a[e].astype(np.int16) - 48
  d1 = np.where(length >= 2, a[np.maximum(e - 1, 0)].astype(np.int16) - 48, 0)
  d2 = np.where(length >= 3, a[np.maximum(e - 2, 0)].astype(np.int16) - 48, 0)
  d3 = np.where(length >= 4, a[np.maximum(e - 3, 0)].astype(np.int16) - 48, 0)
  minus = 45 - 48
  neg = ((length == 2) & (d1 == minus)) | ((length == 3) & (d2 == minus)) | (d3 == minus)
  ndig = length - neg
  ok = (d0 >= 0) & (d0 <= 9) & (ndig <= 3)
  ok &= (ndig < 2) | ((d1 >= 0) & (d1 <= 9))
  ok &= (ndig < 3) | ((d2 >= 0) & (d2 <= 9))
  ok &= (length < 4) | neg
  lead = np.where(ndig == 3, d2, np.where(ndig == 2, d1, d0))
  ok &= (ndig == 1) | (lead != 0)
  if not np.all(ok):
    return None
  v = d0 + np.where(ndig >= 2, d1, 0) * 10 + np.where(ndig >= 3, d2, 0) * 100
  if np.any(v > 127):
    return None
  return np.where(neg, -v, v).astype(np.int8)


def _split(buf: bytes | mmap.mmap, start: int, stop: int) -> list[tuple[int, int, bool]]:
  """Cuts ``buf[start:stop]`` into chunks ending just after a comma."""
  out = []
  pos = start
  while pos < stop:
    cut = buf.find(b",", min(pos + _CHUNK, stop), stop) if pos + _CHUNK < stop else -1
    if cut < 0:
      out.append((pos, stop, True))
      break
    out.append((pos, cut + 1, False))
    pos = cut + 1
  return out


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
  global _POOL
  if _POOL is None:
    _POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
  return _POOL


def _map_all(fn, items: list) -> list:
  """``[fn(x) for x in items]`` on the pool; every task has finished before this
  returns or raises (no worker may still read ``buf`` after an error)."""
  if len(items) == 1:
    return [fn(items[0])]
  futures = [_pool().submit(fn, x) for x in items]
  wait(futures)
  return [f.result() for f in futures]


def _parse_canonical(buf: bytes | mmap.mmap, view: np.ndarray, start: int, stop: int, indent: int):
  """Whole-list fast path; ``None`` when any part is not in the canonical layout."""
  close = b"\n" + b" " * (indent - 2)
  if indent < 2 or buf[stop - len(close) : stop] != close:
    return None
  body_end = stop - len(close)
  chunks = _split(buf, start, body_end)

  lib = native.library()
  if lib is not None:
    fn = lib.SqParseInt8Canonical
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    fn.argtypes += [ctypes.c_void_p, ctypes.c_size_t]
    base = view.ctypes.data

    def work(c):
      cap = (c[1] - c[0]) // (indent + 2) + 1  # every element takes >= indent + 2 bytes
      out = np.empty(cap, np.int8)
      n = fn(base + c[0], c[1] - c[0], indent, int(c[2]), out.ctypes.data, cap)
      return None if n < 0 else out[:n]
  else:

    def work(c):
      return _parse_canonical_chunk(view[c[0] : c[1]], indent, c[2])

  parts = _map_all(work, chunks)
  if any(p is None for p in parts):
    return None
  return np.concatenate(parts) if len(parts) > 1 else parts[0]


def parse_int8_list(buf: bytes | mmap.mmap, start: int, stop: int, indent: int = 8) -> np.ndarray:
  """Parses the text between ``[`` and ``]`` (exclusive) as int8 values.

  Args:
    buf: the whole document (``bytes``).
    start: index just after ``[``.
    stop: index of the matching ``]``.
    indent: element indentation of the canonical layout (fast path).

  Returns:
    An int8 array.

  Raises:
    IntArrayError: malformed text or values outside [-127, 127].
  """
  view = np.frombuffer(buf, np.uint8)
  if stop - start > 2 * indent:
    fast = _parse_canonical(buf, view, start, stop, indent)
    if fast is not None:
      return fast
  # Trim surrounding whitespace so an empty list is recognised.
  s, e = start, stop
  while s < e and buf[s] in _WS:
    s += 1
  while e > s and buf[e - 1] in _WS:
    e -= 1
  if s == e:
    return np.zeros(0, np.int8)
  chunks = _split(buf, s, e)
  if len(chunks) == 1:
    a, b, final = chunks[0]
    return _parse_chunk(view[a:b], final, a)
  parts = _map_all(lambda c: _parse_chunk(view[c[0] : c[1]], c[2], c[0]), chunks)
  return np.concatenate(parts)
