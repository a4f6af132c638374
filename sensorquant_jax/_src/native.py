"""Native CPU kernels: built from ``csrc/`` on first use, cached, loaded with ctypes.

XLA:CPU cannot fuse an int8 -> float convert into its dot, so the fast CPU
paths (int8 dense layers, manifest formatting) are small C++ files compiled
with the machine's C++ compiler against the XLA FFI headers that ship with
jaxlib. The shared library is cached under ``$SENSORQUANT_CACHE`` (default
``~/.cache/sensorquant_jax``), keyed by the sources, compiler, flags, jaxlib
version and CPU, so it builds once per machine (a few seconds).

Without a compiler (or with ``SENSORQUANT_NATIVE=0``) everything still works on
the pure XLA / numpy paths, only slower; :func:`library` then returns ``None``
and a :class:`NativeBuildWarning` says why, once.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jaxlib

_SOURCES = ("dense.cc", "jsonfmt.cc")
# -Wno-psabi: GCC notes that 64-byte vector returns change the ABI on CPUs
# without AVX-512; those functions are internal (anonymous namespace).
_FLAGS = (
  "-O3",
  "-march=native",
  "-std=c++17",
  "-shared",
  "-fPIC",
  "-Wall",
  "-Wextra",
  "-Wno-psabi",
)
_LOCK = threading.RLock()  # library() is called with it held by ffi_targets()
_STATE: dict[str, object] = {}


WO_TARGET = "sq_weight_only_dense"
"""XLA FFI target of the weight-only dense kernel (symbol ``SqWeightOnlyDense``)."""
W8_TARGET = "sq_w8a8_dense"
"""XLA FFI target of the W8A8 kernel (symbol ``SqW8A8Dense``; AVX2 builds and up: VNNI's
``vpdpbusd`` where built, else ``vpmaddubsw``). Its ``isa`` attribute: ``ISA_BEST`` or
``ISA_MADD256`` (the AVX2 path)."""
INT4_TARGET = "sq_int4_dense"
"""XLA FFI target of the int4 weight-only kernel, symmetric (symbol ``SqInt4Dense``)."""
INT4_ZERO_TARGET = "sq_int4_zero_dense"
"""The same with per-group zero points (symbol ``SqInt4ZeroDense``)."""
W4A8_TARGET = "sq_w4a8_dense"
"""XLA FFI target of the W4A8 kernel: int8 activations x int4 weights on integer dot
products (symbol ``SqW4A8Dense``; AVX2 builds and up)."""
INT4_PACKED_TARGET = "sq_int4_packed_dense"
"""XLA FFI target of the int4 weight-only kernel on :func:`~sensorquant_jax.pack`'s int4
tiles (symbol ``SqInt4PackedDense``; AVX2 + FMA builds and up). The W4A8 target takes
those tiles too."""
_SYMBOLS = {
  WO_TARGET: "SqWeightOnlyDense",
  INT4_PACKED_TARGET: "SqInt4PackedDense",
  W8_TARGET: "SqW8A8Dense",
  W4A8_TARGET: "SqW4A8Dense",
  INT4_TARGET: "SqInt4Dense",
  INT4_ZERO_TARGET: "SqInt4ZeroDense",
}


class NativeBuildWarning(UserWarning):
  """The native kernels could not be built (or built with compiler warnings)."""


@contextlib.contextmanager
def file_lock(path: Path):
  """An exclusive lock across processes where the platform has one."""
  with open(path, "a+b") as f:
    if sys.platform == "win32":
      import msvcrt

      f.seek(0)
      msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
      try:
        yield
      finally:
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
    else:
      import fcntl

      fcntl.flock(f, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(f, fcntl.LOCK_UN)


def cpu_signature() -> str:
  """What -march=native depends on: the CPU model and feature flags."""
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
  except OSError:
    return platform.machine() + platform.processor()
  keep = [
    line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))
  ]
  return "\n".join(sorted(set(keep)))


def cache_dir() -> Path:
  """Where built kernels and tuning choices live: ``$SENSORQUANT_CACHE``, else
  ``$XDG_CACHE_HOME/sensorquant_jax`` (``~/.cache/sensorquant_jax``)."""
  root = os.environ.get("SENSORQUANT_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sensorquant_jax"
  )
  return Path(root)


def _compiler() -> str | None:
  return (
    os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
  )


def _build() -> ctypes.CDLL:
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set CXX)")
  src_dir = Path(__file__).parent.parent / "csrc"
  sources = [src_dir / name for name in _SOURCES]
  include = jax.ffi.include_dir()
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
  key = hashlib.sha256()
  for part in (version, " ".join(_FLAGS), jaxlib.__version__, cpu_signature(), sys.platform):
    key.update(part.encode() + b"\0")
  for src in sources:
    key.update(src.read_bytes())
  out_dir = cache_dir()
  out_dir.mkdir(parents=True, exist_ok=True)
  stem = f"libsensorquant-{key.hexdigest()[:16]}"
  target = out_dir / f"{stem}.so"
  failed = out_dir / f"{stem}.failed"
  # One build per machine even with several processes starting at once; a
  # failed build is remembered for its key, so later processes do not retry.
  with file_lock(out_dir / ".lock"):
    if failed.exists():
      raise RuntimeError(f"an earlier build failed ({failed}): {failed.read_text()[:500]}")
    if not target.exists():
      fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
      os.close(fd)
      try:
        # -isystem: warnings in jaxlib's headers are not ours to fix.
        cmd = [cxx, *_FLAGS, "-isystem", include, *map(str, sources), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
          failed.write_text(f"{' '.join(cmd)}\n{proc.stderr[-4000:]}")
          raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        if proc.stderr.strip():
          warnings.warn(
            f"native kernels built with compiler warnings: {proc.stderr.strip()[:500]}",
            NativeBuildWarning,
            stacklevel=4,
          )
        os.replace(tmp, target)
      finally:
        if os.path.exists(tmp):
          os.unlink(tmp)
  return ctypes.CDLL(str(target))


def library() -> ctypes.CDLL | None:
  """The native library, building it on first call; ``None`` if unavailable."""
  with _LOCK:
    if "lib" in _STATE:
      return _STATE["lib"]  # type: ignore[return-value]
    lib = None
    if os.environ.get("SENSORQUANT_NATIVE", "1") != "0":
      try:
        lib = _build()
      except Exception as e:  # any failure means: use the portable path
        _STATE["error"] = str(e)
        warnings.warn(
          f"sensorquant_jax native kernels unavailable, using slower portable paths: {e}",
          NativeBuildWarning,
          stacklevel=2,
        )
    _STATE["lib"] = lib
    return lib


def ffi_targets() -> frozenset[str]:
  """Registers the XLA:CPU FFI targets (once) and returns their names."""
  with _LOCK:
    if "targets" not in _STATE:
      lib = library()
      names = set()
      if lib is not None:
        for name, symbol in _SYMBOLS.items():
          fn = getattr(lib, symbol, None)  # W8A8 needs AVX-512 VNNI at build time
          if fn is not None:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(fn), platform="cpu")
            names.add(name)
      _STATE["targets"] = frozenset(names)
    return _STATE["targets"]  # type: ignore[return-value]


ISA_BEST, ISA_MADD512, ISA_MADD256, ISA_AMX = 0, 1, 2, 3
"""The native kernels' ``isa`` attribute (tests run each path the machine has). W4A8: the
best this build has (VNNI where built), ``vpmaddubsw`` on 512 bits, on 256 bits. W8A8:
``ISA_BEST`` (VNNI where built), ``ISA_MADD256`` (AVX2) or ``ISA_AMX`` (AMX tiles, where
:func:`w8a8_amx`). Packed int4 weight-only: ``ISA_BEST`` (AVX-512 where built) or
``ISA_MADD256`` (its 256-bit path)."""


def w8a8_amx() -> bool:
  """Whether the W8A8 kernel's AMX path runs here: built with AMX-INT8 and the tile
  state granted by the operating system."""
  lib = library()
  fn = getattr(lib, "SqW8A8Amx", None) if lib is not None else None
  if fn is None:
    return False
  fn.restype = ctypes.c_int64
  return bool(int(fn()))


def w4a8_isas() -> dict[int, int]:
  """The W4A8 instruction paths this build runs, each with its columns per chunk
  (N must be a multiple of it); empty without the kernel."""
  lib = library()
  fn = getattr(lib, "SqW4A8Isas", None) if lib is not None else None
  if fn is None:
    return {}
  fn.restype = ctypes.c_int64
  bits = int(fn())
  wide = 64 if bits & 2 else 32
  out = {ISA_BEST: wide, ISA_MADD256: 32}
  if bits & 2:
    out[ISA_MADD512] = 64
  return out


def w4a8_vnni() -> bool:
  """Whether the best W4A8 path of this build is AVX-512 VNNI's ``vpdpbusd``."""
  lib = library()
  fn = getattr(lib, "SqW4A8Isas", None) if lib is not None else None
  if fn is None:
    return False
  fn.restype = ctypes.c_int64
  return bool(int(fn()) & 8)


def build_error() -> str | None:
  """Why the native library is unavailable (``None`` if it loaded or was not tried)."""
  return _STATE.get("error")  # type: ignore[return-value]
