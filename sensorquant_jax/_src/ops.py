"""Quantized inference ops: dense layers that read int8/int4 weights without a float copy."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from sensorquant_jax._src import native, nibbles, options, tuning
from sensorquant_jax._src.ffi import (
  W8_MAX_K,
  kernel_shape_ok,
  native_available,
  native_op,
)
from sensorquant_jax._src.native import (
  INT4_PACKED_TARGET,
  INT4_TARGET,
  INT4_ZERO_TARGET,
  W4A8_TARGET,
  W8_TARGET,
  WO_TARGET,
)
from sensorquant_jax._src.options import IMPLS, MODES, Impl, Mode
from sensorquant_jax._src.packed import (
  Matrix,
  PackedQArray,
  as_matrix,
  auto_tile,
  canonical_matrix,
  untile,
)
from sensorquant_jax._src.qarray import SYMMETRIC_INT4_ZERO, QArray, split_blocks
from sensorquant_jax._src.schemes import exact_div, fp8_round


def _tiled_dot(x2: jax.Array, tiles: jax.Array) -> jax.Array:
  """``x2 @ W`` for int8 ``W`` given as tiles ``[N/T, K, T]``, one tile at a time."""
  return untile(
    lax.map(lambda t: jnp.dot(x2, t.astype(x2.dtype), preferred_element_type=x2.dtype), tiles)
  )


def _sliced_dot(x2: jax.Array, values: jax.Array, tile: int) -> jax.Array:
  """``x2 @ W`` for int8 ``W [K, N]``, converting ``tile`` columns at a time in place."""
  k, n = values.shape

  def one(i):
    cols = lax.dynamic_slice_in_dim(values, i * tile, tile, axis=1)
    return jnp.dot(x2, cols.astype(x2.dtype), preferred_element_type=x2.dtype)

  return untile(lax.map(one, jnp.arange(n // tile)))


TILED_MAX_ROWS = 32


TILED_MIN_SIZE = 1 << 22


"""Kernels of fewer elements (whose float copy fits in cache) are tiled only up
to ``TILED_MAX_ROWS`` rows; above that one dot on the converted kernel is
faster. Larger kernels are always tiled (measured: benchmarks/bench_*.py)."""


def _use_tiles(k: int, n: int, rows: int) -> bool:
  return rows <= TILED_MAX_ROWS or k * n >= TILED_MIN_SIZE


def _pick_tile(
  tile: int | None, k: int, n: int, rows: int, tiles: bool | None = None
) -> int | None:
  if tiles is None:
    tiles = _use_tiles(k, n, rows)
  if not tile or not tiles:
    return None
  for t in (tile, tile // 2, tile // 4):
    if t >= 64 and n % t == 0 and n > t:
      return t
  return None


def _weights_key(m: Matrix) -> str:
  parts = ["fp8" if m.fp8 else f"int{m.bits}"]
  if m.tiled:
    parts.append(f"tiled{m.values.shape[-1]}")
  if m.block is not None:
    parts.append(f"block{m.block}")
  if m.zero_point is not None:
    parts.append("zero")
  return "/".join(parts)


def _on_arrays(m: Matrix, fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """``fn(x2, m, *extra)`` as a function of ``(x2, values, scale, zero, *extra)`` (for timing)."""

  def run(x2, values, scale, zero, *extra):
    return fn(x2, dataclasses.replace(m, values=values, scale=scale, zero_point=zero), *extra)

  return run


def _dispatch(mode: Mode, candidates: dict[str, Callable], x2: jax.Array, m: Matrix, *extra):
  """Runs the candidate :func:`tuning.choose` picks for this problem."""
  k = x2.shape[1]
  n = m.scale.shape[-1]
  problem = tuning.Problem(
    mode, _weights_key(m), k, n, tuning.rows_bucket(x2.shape[0]), jnp.dtype(x2.dtype).name
  )
  fns = {name: _on_arrays(m, fn) for name, fn in candidates.items()}
  args = (x2, m.values, m.scale, m.zero_point, *extra)

  def example(seed: int) -> tuple:
    made = tuning.example_like(*args)(seed)
    return (jnp.resize(made[0], (problem.rows, x2.shape[1])), *made[1:])

  name = tuning.choose(problem, fns, example)
  return fns[name](*args)


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _weight_only_candidates(m: Matrix, tile: int | None, rows: int) -> dict[str, Callable]:
  """The weight-only implementations that run here, the shipped fallback first.

  The fallback is what measurements on the machines in the README favour:
  the native kernel on CPU (int4 up to :data:`INT4_MAX_ROWS` rows), XLA on GPU
  (until a Pallas kernel is measured faster on the device).
  """
  out: dict[str, Callable] = {}
  if m.fp8:  # the native and Pallas kernels read integer codes
    return {"xla": lambda x2, m: _xla_weight_only(x2, m, tile)}
  if m.bits == 4 and m.tiled:  # packed int4 tiles: the native kernel reads them as they are
    if native_available(INT4_PACKED_TARGET, "auto"):
      out["native"] = native_int4_packed
    out["xla_groups"] = lambda x2, m: _xla_int4(x2, m, dequantize=False)
    out["xla_dequantize"] = lambda x2, m: _xla_int4(x2, m, dequantize=True)
    if _on_gpu():
      out["pallas"] = _pallas_weight_only
    return out
  if m.bits == 4:
    target = INT4_TARGET if m.zero_point is None else INT4_ZERO_TARGET
    if m.values.shape[1] % 16 == 0 and native_available(target, "auto"):
      out["native"] = lambda x2, m: _native_int4(x2, m, target)
    xla = {
      "xla_groups": lambda x2, m: _xla_int4(x2, m, dequantize=False),
      "xla_dequantize": lambda x2, m: _xla_int4(x2, m, dequantize=True),
    }
    if rows > INT4_MAX_ROWS:
      out = {"xla_dequantize": xla["xla_dequantize"], **out, "xla_groups": xla["xla_groups"]}
    else:
      out.update(xla)
    if _on_gpu():
      out["pallas"] = _pallas_weight_only
    return out
  if kernel_shape_ok(m.values) and native_available(WO_TARGET, "auto"):
    out["native"] = _native_weight_only
  out["xla"] = lambda x2, m: _xla_weight_only(x2, m, tile)
  if m.block is None and (tile or m.tiled):
    out["xla_dot"] = lambda x2, m: _xla_weight_only(x2, m, None, tiles=False)
    out["xla_tiles"] = lambda x2, m: _xla_weight_only(x2, m, tile, tiles=True)
  if _on_gpu():
    out["pallas"] = _pallas_weight_only
  return out


def _weight_only(x2: jax.Array, m: Matrix, tile: int | None, impl: Impl = "auto") -> jax.Array:
  cdt = x2.dtype if jnp.issubdtype(x2.dtype, jnp.floating) else jnp.float32
  x2 = x2.astype(cdt)
  if impl == "auto":
    candidates = _weight_only_candidates(m, tile, x2.shape[0])
    return _dispatch("weight_only", candidates, x2, m).astype(cdt)
  if impl in ("native", "pallas") and m.fp8:
    raise ValueError(f"impl={impl!r} runs integer kernels; fp8 kernels run on impl='xla'")
  if impl == "pallas":
    return _pallas_weight_only(x2, m).astype(cdt)
  if m.bits == 4 and m.tiled:
    if impl == "native":
      native_available(INT4_PACKED_TARGET, impl)  # raises why
      return native_int4_packed(x2, m).astype(cdt)
    return _xla_int4(x2, m)
  if m.bits == 4:
    target = INT4_TARGET if m.zero_point is None else INT4_ZERO_TARGET
    if impl == "native":
      if m.values.shape[1] % 16 or not native_available(target, impl):
        raise RuntimeError(f"native int4 kernel: N must be a multiple of 16, got {m.values.shape}")
      return _native_int4(x2, m, target).astype(cdt)
    return _xla_int4(x2, m)
  if impl == "native":
    if not (kernel_shape_ok(m.values) and native_available(WO_TARGET, impl)):
      raise RuntimeError(f"native kernel: unsupported kernel layout {m.values.shape}")
    return _native_weight_only(x2, m).astype(cdt)
  return _xla_weight_only(x2, m, tile)


def _pallas_weight_only(x2: jax.Array, m: Matrix) -> jax.Array:
  from sensorquant_jax._src import pallas  # Pallas imports only when used

  m = canonical_matrix(m, x2.shape[1])
  values = m.values
  interpret = not _on_gpu()
  if m.bits == 4:
    assert m.block is not None
    y = pallas.int4_dense(x2, values, m.scale, m.zero_point, block=m.block, interpret=interpret)
  else:
    y = pallas.int8_dense(x2, values, m.scale, m.zero_point, block=m.block, interpret=interpret)
  return y.astype(x2.dtype)


def _native_weight_only(x2: jax.Array, m: Matrix) -> jax.Array:
  """Weight-only on the native kernel: float32 activations and accumulation."""
  block = m.block or 0
  xf = x2.astype(jnp.float32)
  scale = m.scale.astype(jnp.float32)

  def reference(x, values, scale):
    return _xla_weight_only(
      x, dataclasses.replace(m, values=values, scale=scale, zero_point=None), None
    )

  y = native_op(WO_TARGET, 1, block, m.tiled, reference)(xf, m.values, scale)
  if m.zero_point is not None:  # x @ ((q - z) * s) = x @ (q * s) - rowsum(x) * (z * s)
    y = y - jnp.sum(xf, axis=-1, keepdims=True) * (m.zero_point.astype(jnp.float32) * scale)
  return y


INT4_MAX_ROWS = 16
"""Up to this many rows ``impl="auto"`` runs int4 on the native kernel, which
converts the codes once per two rows; above it, XLA's dequantize-then-dot was
faster (measured with benchmarks/bench_dense.py on a 2-core AVX2 EPYC)."""


def int4_centered(m: Matrix, k: int) -> jax.Array:
  """The int4 kernel's ``code - zero`` as int8 ``[K, N]`` (in ``[-15, 15]``)."""
  assert m.block is not None
  q = nibbles.unpack(m.values, 0, k).astype(jnp.int8)
  if m.zero_point is None:
    return q - jnp.int8(SYMMETRIC_INT4_ZERO)
  return q - jnp.repeat(m.zero_point, m.block, axis=0, total_repeat_length=k)


def _native_int4(x2: jax.Array, m: Matrix, target: str) -> jax.Array:
  """Int4 weight-only on the native kernel: nibbles converted in registers."""
  assert m.block is not None
  xf = x2.astype(jnp.float32)
  scale = m.scale.astype(jnp.float32)
  cols = (scale,) if m.zero_point is None else (scale, m.zero_point)

  def reference(x, values, scale, *zero):
    return _xla_int4(
      x, dataclasses.replace(m, values=values, scale=scale, zero_point=zero[0] if zero else None)
    )

  op = native_op(target, 1, m.block, False, reference, n_cols=len(cols))
  return op(xf, m.values, *cols)


def native_int4_packed(x2: jax.Array, m: Matrix, isa: int = native.ISA_BEST) -> jax.Array:
  """Int4 weight-only on packed int4 tiles: codes masked in place and converted in
  registers (against activations scaled by the matching power of two), summed per group,
  ``s * (sum - z * sum(x))`` added group by group (see csrc/dense.cc)."""
  assert m.block is not None and m.tiled
  xf = x2.astype(jnp.float32)
  scale = m.scale.astype(jnp.float32)
  zero = m.zero_point
  if zero is None:  # the symmetric codes' implicit zero point
    zero = jnp.full(scale.shape, SYMMETRIC_INT4_ZERO, jnp.int8)

  def reference(x, values, scale, zero):
    return _xla_int4(x, dataclasses.replace(m, values=values, scale=scale, zero_point=zero))

  op = native_op(INT4_PACKED_TARGET, 1, m.block, True, reference, n_cols=2, isa=isa)
  return op(xf, m.values, scale, zero)


def _xla_int4(x2: jax.Array, m: Matrix, dequantize: bool | None = None) -> jax.Array:
  """Int4 weight-only in XLA: per-group partial products, scaled and summed
  (few rows), or one dot on the dequantized kernel (many rows; ``dequantize``
  forces either). Packed int4 tiles are untiled first."""
  m = canonical_matrix(m, x2.shape[1])
  assert m.block is not None
  cdt = x2.dtype
  k = x2.shape[1]
  if dequantize is None:
    dequantize = x2.shape[0] > INT4_MAX_ROWS
  if dequantize:
    w = int4_centered(m, k).astype(jnp.float32)
    w = (split_blocks(w, 0, m.block) * m.scale[:, None, :]).reshape(-1, w.shape[1])[:k]
    return jnp.dot(x2, w.astype(cdt), preferred_element_type=cdt)
  xb = split_blocks(x2, 1, m.block)
  qb = split_blocks(int4_centered(m, k), 0, m.block)
  part = jnp.einsum("bnk,nko->bno", xb, qb.astype(cdt), preferred_element_type=cdt)
  return jnp.sum(part * m.scale.astype(cdt)[None], axis=1)


def _xla_weight_only(
  x2: jax.Array, m: Matrix, tile: int | None, tiles: bool | None = None
) -> jax.Array:
  """Weight-only in XLA; ``tiles`` forces tiling on or off (default: by size and rows)."""
  cdt = x2.dtype
  if not m.tiled:
    k, n = m.values.shape
    tile = _pick_tile(tile, k, n, x2.shape[0], tiles)
  if m.block is not None:
    xb, qb = split_blocks(x2, 1, m.block), split_blocks(m.values, 0, m.block)
    part = jnp.einsum("bnk,nko->bno", xb, qb.astype(cdt), preferred_element_type=cdt)
    return jnp.sum(part * m.scale.astype(cdt)[None], axis=1)
  if m.tiled:
    nt, k, t = m.values.shape
    if tiles is None:
      tiles = bool(tile) and _use_tiles(k, nt * t, x2.shape[0])
    if tiles:
      acc = _tiled_dot(x2, m.values)
    else:
      acc = jnp.dot(x2, untile(m.values).astype(cdt), preferred_element_type=cdt)
  elif tile:
    acc = _sliced_dot(x2, m.values, tile)
  else:
    acc = jnp.dot(x2, m.values.astype(cdt), preferred_element_type=cdt)
  if m.zero_point is not None:
    acc = acc - jnp.sum(x2, axis=-1, keepdims=True) * m.zero_point.astype(cdt)
  return acc * m.scale.astype(cdt)


def quantize_activations(
  x2: jax.Array, act_scale: jax.Array | float | None = None
) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 activations: per-token dynamic scales, or a static scale.

  Args:
    x2: ``[tokens, K]`` floats.
    act_scale: a calibrated static scale (scalar); ``None`` for per-token
      ``max|x| / 127``.

  Returns:
    ``(int8 values, float32 scales [tokens, 1])``.
  """
  xf = x2.astype(jnp.float32)
  if act_scale is None:
    # IEEE divisions: XLA turns ``/ 127`` into ``* (1 / 127)``, a different scale in
    # about one row in twenty, and now and then a different code.
    s = exact_div(jnp.max(jnp.abs(xf), axis=-1, keepdims=True), jnp.float32(127))
    s = jnp.maximum(s, 1e-12)
  else:
    s = jnp.broadcast_to(jnp.asarray(act_scale, jnp.float32).reshape(1, 1), (xf.shape[0], 1))
  q = jnp.clip(lax.round(exact_div(xf, s), lax.RoundingMethod.AWAY_FROM_ZERO), -127, 127)
  return q.astype(jnp.int8), s


def quantize_activations_fp8(
  x2: jax.Array, act_scale: jax.Array | float | None = None
) -> tuple[jax.Array, jax.Array]:
  """fp8 E4M3 activations: per-token dynamic scales ``max|x| / 448``, or a static scale.

  Args:
    x2: ``[tokens, K]`` floats.
    act_scale: a calibrated static scale (scalar); ``None`` for per-token scales.

  Returns:
    ``(float8_e4m3fn values, float32 scales [tokens, 1])``: ``fp8(x / s)``, saturated
    and rounded to nearest even as :func:`schemes.fp8_round`.
  """
  xf = x2.astype(jnp.float32)
  if act_scale is None:
    s = exact_div(jnp.max(jnp.abs(xf), axis=-1, keepdims=True), jnp.float32(options.FP8_MAX))
    s = jnp.maximum(s, 1e-12)
  else:
    s = jnp.broadcast_to(jnp.asarray(act_scale, jnp.float32).reshape(1, 1), (xf.shape[0], 1))
  return fp8_round(exact_div(xf, s)), s


def _xla_w8a8_fp8(x2: jax.Array, m: Matrix, act_scale=None) -> jax.Array:
  """fp8 x fp8 dots with float32 accumulation (cuBLASLt fp8 GEMMs where XLA has them)."""
  xq, xs = quantize_activations_fp8(x2, act_scale)
  values = untile(m.values) if m.tiled else m.values
  if m.block is not None:
    xb, qb = split_blocks(xq, 1, m.block), split_blocks(values, 0, m.block)
    acc = jnp.einsum("bnk,nko->bno", xb, qb, preferred_element_type=jnp.float32)
    return jnp.sum(acc * m.scale[None], axis=1) * xs
  acc = lax.dot_general(xq, values, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return acc * xs * m.scale


W4A8_AMX_MIN_ROWS = 8
"""From this many rows the shipped fallback for W4A8 on packed int4 tiles is the AMX path
where it runs (fewer: the VNNI kernel; on our AMX Xeon it was 1.2-1.6x faster at one row,
0.8-1.3x at four, 0.6-0.7x at sixteen)."""


def _w8a8_candidates(m: Matrix, k: int, rows: int) -> dict[str, Callable]:
  """The W8A8 implementations that run here, the shipped fallback first: AMX tiles where
  they run (W4A8: from :data:`W4A8_AMX_MIN_ROWS` rows), else the native kernel on CPU."""
  out: dict[str, Callable] = {}
  if m.fp8:  # fp8 activations against fp8 weights
    return {"xla": _xla_w8a8_fp8}
  if (
    m.bits == 8
    and m.block is None
    and k <= W8_MAX_K
    and kernel_shape_ok(m.values)
    and native_available(W8_TARGET, "auto")
  ):
    if native.w8a8_amx():  # AMX tiles where the CPU and OS have them: faster at every batch
      out["native_amx"] = _native_w8a8_amx_float
    out["native"] = _native_w8a8_float
  if m.bits == 4 and w4a8_ok(m) and native_available(W4A8_TARGET, "auto"):
    amx = w4a8_amx_ok(m)
    if amx and rows >= W4A8_AMX_MIN_ROWS:
      out["native_amx"] = _native_w4a8_amx_float
    out["native"] = _native_w4a8_float
    if amx:
      out.setdefault("native_amx", _native_w4a8_amx_float)
  out["xla"] = _xla_w8a8_float
  if _on_gpu() and m.bits == 8:
    out["pallas"] = _pallas_w8a8
  return out


def w4a8_ok(m: Matrix, isa: int = native.ISA_BEST) -> bool:
  """Whether the native W4A8 kernel takes this int4 kernel: groups of a multiple of 4,
  N a multiple of the build's column chunk (64 with AVX-512, else 32); packed int4
  tiles always (their groups are a multiple of 8)."""
  chunk = native.w4a8_isas().get(isa)
  if m.bits != 4 or m.block is None or chunk is None:
    return False
  return m.tiled or (m.block % 4 == 0 and m.values.shape[1] % chunk == 0)


def w4a8_amx_ok(m: Matrix) -> bool:
  """Whether the W4A8 kernel's AMX path takes this int4 kernel: packed int4 tiles with
  groups of a multiple of 64, where :func:`native.w8a8_amx`."""
  if m.bits != 4 or not m.tiled or m.block is None or m.block % 64:
    return False
  return native.w8a8_amx()


def _w8a8(x2: jax.Array, m: Matrix, act_scale, impl: Impl = "auto") -> jax.Array:
  k = x2.shape[1]
  scale = None if act_scale is None else jnp.asarray(act_scale, jnp.float32).reshape(())
  if impl == "auto":
    candidates = _w8a8_candidates(m, k, x2.shape[0])
    if scale is None:
      return _dispatch("w8a8", candidates, x2, m)
    return _dispatch("w8a8", candidates, x2, m, scale)
  if m.fp8:
    if impl in ("native", "pallas"):
      raise ValueError(f"impl={impl!r} runs integer kernels; fp8 kernels run on impl='xla'")
    return _xla_w8a8_fp8(x2, m, scale)
  if impl == "pallas":
    return _pallas_w8a8(x2, m, scale)
  if impl == "native":
    candidates = _w8a8_candidates(m, k, x2.shape[0])
    if "native" not in candidates:
      native_available(W4A8_TARGET if m.bits == 4 else W8_TARGET, impl)  # raises why
      raise RuntimeError(
        f"native W8A8 kernel: unsupported kernel {m.values.shape}, block {m.block}"
      )
    # The shipped fallback's native kernel: AMX tiles where they run, else VNNI / AVX2.
    best = next(name for name in candidates if name.startswith("native"))
    return candidates[best](x2, m, scale)
  return _xla_w8a8_float(x2, m, scale)


def _native_w8a8_float(x2: jax.Array, m: Matrix, act_scale=None) -> jax.Array:
  return native_w8a8(*quantize_activations(x2, act_scale), m)


def _native_w8a8_amx_float(x2: jax.Array, m: Matrix, act_scale=None) -> jax.Array:
  return native_w8a8(*quantize_activations(x2, act_scale), m, isa=native.ISA_AMX)


def _native_w4a8_float(x2: jax.Array, m: Matrix, act_scale=None) -> jax.Array:
  return native_w4a8(*quantize_activations(x2, act_scale), m)


def _native_w4a8_amx_float(x2: jax.Array, m: Matrix, act_scale=None) -> jax.Array:
  return native_w4a8(*quantize_activations(x2, act_scale), m, isa=native.ISA_AMX)


def native_w4a8(xq: jax.Array, xs: jax.Array, m: Matrix, isa: int = native.ISA_BEST) -> jax.Array:
  """W4A8 on the native kernel: int8 activations x int4 codes on integer dot products,
  int32 sums per group, ``fl(s * float(sum - z * sum(x)))`` added group by group, times
  the activation scale (see csrc/dense.cc). ``isa=ISA_AMX`` runs AMX tiles on packed int4
  tiles (:func:`w4a8_amx_ok`)."""
  assert m.block is not None
  scale = m.scale.astype(jnp.float32)
  zero = m.zero_point
  if zero is None:  # the symmetric codes' implicit zero point
    zero = jnp.full(scale.shape, SYMMETRIC_INT4_ZERO, jnp.int8)

  def reference(xq, xs, values, scale, zero):
    return _xla_w8a8(xq, xs, dataclasses.replace(m, values=values, scale=scale, zero_point=zero))

  op = native_op(W4A8_TARGET, 2, m.block, m.tiled, reference, n_cols=2, isa=isa)
  return op(xq, xs, m.values, scale, zero)


def _xla_w8a8_float(x2: jax.Array, m: Matrix, act_scale=None) -> jax.Array:
  return _xla_w8a8(*quantize_activations(x2, act_scale), m)


def _pallas_w8a8(x2: jax.Array, m: Matrix, act_scale=None) -> jax.Array:
  from sensorquant_jax._src import pallas  # Pallas imports only when used

  if m.bits != 8:
    raise ValueError("the Pallas W8A8 kernel takes int8 kernels")
  values = untile(m.values) if m.tiled else m.values
  return pallas.w8a8_dense(
    x2, values, m.scale, m.zero_point, act_scale, block=m.block, interpret=not _on_gpu()
  )


def native_w8a8(xq: jax.Array, xs: jax.Array, m: Matrix, isa: int = native.ISA_BEST) -> jax.Array:
  """Int8 x int8 -> int32 on the native kernel (AVX-512 VNNI where built, else AVX2's
  ``vpmaddubsw``; ``isa=ISA_MADD256`` forces the latter, ``isa=ISA_AMX`` runs AMX tiles
  where :func:`native.w8a8_amx`), rescaled to float32."""
  scale = m.scale.astype(jnp.float32)

  def reference(xq, xs, values, scale):
    return _xla_w8a8(xq, xs, dataclasses.replace(m, values=values, scale=scale, zero_point=None))

  y = native_op(W8_TARGET, 2, 0, m.tiled, reference, isa=isa)(xq, xs, m.values, scale)
  if m.zero_point is not None:
    rows = jnp.sum(xq.astype(jnp.int32), axis=-1, keepdims=True).astype(jnp.float32) * xs
    y = y - rows * (m.zero_point.astype(jnp.float32) * scale)
  return y


_INT_PRECISION = lax.Precision.DEFAULT


def _xla_w8a8(xq: jax.Array, xs: jax.Array, m: Matrix) -> jax.Array:
  m = canonical_matrix(m, xq.shape[1])
  values = m.values
  if m.bits == 4:  # int8 x int4 per group: the centred codes, exact in int32
    values = int4_centered(m, xq.shape[1])
    m = dataclasses.replace(m, zero_point=None)
  if m.block is not None:
    xb, qb = split_blocks(xq, 1, m.block), split_blocks(values, 0, m.block)
    acc = jnp.einsum(
      "bnk,nko->bno", xb, qb, preferred_element_type=jnp.int32, precision=_INT_PRECISION
    )
    y = jnp.sum(acc.astype(jnp.float32) * m.scale[None], axis=1)
    return y * xs
  acc = lax.dot_general(
    xq,
    values,
    (((1,), (0,)), ((), ())),
    preferred_element_type=jnp.int32,
    precision=_INT_PRECISION,
  )
  if m.zero_point is not None:
    acc = acc - jnp.sum(xq.astype(jnp.int32), axis=-1, keepdims=True) * m.zero_point.astype(
      jnp.int32
    )
  return acc.astype(jnp.float32) * xs * m.scale


def _offset_term(x2: jax.Array, m: Matrix) -> jax.Array:
  """``x2`` times the kernel's per-group ``offset``: each group's input sum times its offset
  (float activations in either mode: the offset is a float term, like a bias)."""
  assert m.offset is not None
  xf = x2.astype(jnp.float32)
  if m.block is None:
    return jnp.sum(xf, axis=-1, keepdims=True) * m.offset
  sums = jnp.sum(split_blocks(xf, 1, m.block), axis=-1)  # [rows, n_blocks]
  return jnp.dot(sums, m.offset.astype(jnp.float32), precision=lax.Precision.HIGHEST)


def apply_input_scale(x: jax.Array, input_scale: jax.Array, in_shape: tuple[int, ...]) -> jax.Array:
  """``x * input_scale`` over ``x``'s trailing ``in_shape`` axes, in float32, in ``x``'s dtype."""
  dt = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  s = jnp.asarray(input_scale, jnp.float32).reshape(in_shape)
  return (x.astype(jnp.float32) * s).astype(dt)


def dense_general(
  x: jax.Array,
  kernel: QArray | PackedQArray,
  bias: jax.Array | None = None,
  *,
  n_in: int = 1,
  mode: Mode = "weight_only",
  act_scale: jax.Array | float | None = None,
  tile: int | str | None = "auto",
  dtype: Any = None,
  impl: Impl = "auto",
) -> jax.Array:
  """``x`` contracted with a quantized kernel over its first ``n_in`` axes.

  The kernel's first ``n_in`` axes match ``x``'s last ``n_in`` axes (Flax
  DenseGeneral layout: ``[*in, *out]``); the output is ``[*batch, *out]``.

  Args:
    x: float activations.
    kernel: :class:`QArray` (any scheme, int4 included; with an
      ``input_scale``, ``x`` is multiplied by it first) or :class:`PackedQArray`.
    bias: optional float bias of shape ``kernel.shape[n_in:]``.
    n_in: number of contracted kernel axes.
    mode: ``"weight_only"`` (quantized weights, float activations and
      accumulation) or ``"w8a8"`` (int8 activations with per-token dynamic
      scales, or ``act_scale`` when given; int32 accumulation; on int4 kernels
      this is W4A8: the int8 activations against the 4-bit codes, int32 sums
      per group, on CPU the native integer dot-product kernel; for fp8 kernels
      fp8 E4M3 activations, ``max|x| / 448`` per token, float32 accumulation).
    act_scale: static activation scale for ``w8a8`` (from calibration).
    tile: columns converted per step by the XLA weight-only path; ``"auto"``:
      512 on CPU, one fused dot elsewhere; ``None``: one dot.
    dtype: output dtype (default: ``x``'s floating dtype).
    impl: ``"auto"``: the fastest implementation that runs here for this
      mode, kernel format, shape and row count, timed once per machine (see
      :func:`sensorquant_jax.tune`; ``SENSORQUANT_TUNING=0``: the shipped
      fallback, the native CPU kernels where built, else XLA);
      ``"native"``: the native CPU kernels (raise if unavailable); ``"xla"``;
      ``"pallas"``: the Pallas kernels (interpret mode off GPU).

  Returns:
    The layer output, close to ``x @ dequantize(kernel) + bias``.
  """
  options.check("mode", mode, MODES)
  options.check("impl", impl, IMPLS)
  if impl == "pallas" and mode == "w8a8" and getattr(kernel, "bits", 8) != 8:
    raise ValueError("impl='pallas' runs W8A8 with int8 kernels only")
  shape = kernel.shape
  in_shape, out_shape = tuple(shape[:n_in]), tuple(shape[n_in:])
  if tuple(x.shape[x.ndim - n_in :]) != in_shape:
    raise ValueError(
      f"input feature shape {x.shape[x.ndim - n_in :]} does not match kernel {shape}"
    )
  out_dtype = dtype or (x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32)
  if isinstance(kernel, QArray) and kernel.input_scale is not None:
    x = apply_input_scale(x, kernel.input_scale, in_shape)
    kernel = dataclasses.replace(kernel, input_scale=None)
  batch = x.shape[: x.ndim - n_in]
  x2 = x.reshape(math.prod(batch), math.prod(in_shape))
  tile = auto_tile(tile)
  m = as_matrix(kernel, n_in)
  if m is None:  # scales do not factor out: dequantize (correct, not fast)
    w = kernel.dequantize(jnp.float32).reshape(x2.shape[1], -1)
    y = jnp.dot(x2.astype(jnp.float32), w)
  else:
    plain = dataclasses.replace(m, offset=None)
    if isinstance(kernel, QArray) and kernel.perm is not None:  # the stored order of the inputs
      x2 = jnp.take(x2, kernel.perm, axis=1)
    if mode == "weight_only":
      y = _weight_only(x2, plain, tile, impl)
    else:
      y = _w8a8(x2, plain, act_scale, impl)
    if m.offset is not None:
      y = y + _offset_term(x2, m).astype(y.dtype)
  y = y.reshape(batch + out_shape)
  if bias is not None:
    y = y + jnp.asarray(bias).astype(y.dtype)
  return y.astype(out_dtype)


def dense(
  x: jax.Array,
  qkernel: QArray | PackedQArray,
  bias: jax.Array | None = None,
  *,
  mode: Mode = "weight_only",
  dtype: Any = None,
  act_scale: jax.Array | float | None = None,
  impl: Impl = "auto",
  tile: int | str | None = "auto",
) -> jax.Array:
  """``x @ kernel + bias`` for a quantized Dense kernel ``[in, out]``.

  On CPU the native kernels (``csrc/dense.cc``) convert int8 weights in
  registers or L2-sized blocks, so no float copy of the weight is ever built;
  a :func:`pack`-ed kernel streams fastest. Without them (or with
  ``impl="xla"``) the XLA path converts ``tile`` columns at a time. See
  :func:`dense_general`.

  Example:
    >>> qk = sq.quantize_array(kernel, "symmetric_per_channel_int8")
    >>> y = jax.jit(sq.dense)(x, qk, bias)
  """
  return dense_general(
    x, qkernel, bias, n_in=1, mode=mode, act_scale=act_scale, tile=tile, dtype=dtype, impl=impl
  )
