"""Quantization schemes (int8, int4, fp8 E4M3): the arithmetic, one function per scheme.

Exactness notes. The Rust ``sensorlm`` module computes, in float32,
``scale = max(max|w| / 127, 1e-8)`` and ``q = clamp(round(w / scale))`` with
``f32::round`` (half away from zero). Two XLA behaviours break a literal port:

* ``jnp.round`` rounds half to even; ``lax.round``'s default
  (``AWAY_FROM_ZERO``) is what Rust does.
* XLA's algebraic simplifier rewrites ``a / broadcast(b)`` (and ``a / const``)
  into ``a * (1 / b)``, which is off by one ulp for a large share of inputs and
  then flips rounding decisions. :func:`exact_div` divides by
  ``where(isnan(a), 1, b)`` instead: the same value, but no longer a broadcast
  or a constant, so the rewrite does not match and the division stays a true
  IEEE division, which is just as fast on CPU (the op is memory bound).

A third holds on GPU: XLA:GPU's float32 division is not correctly rounded
(on an H100, 12 of 76 oracle cases differed). On backends other than CPU the
scale and the rounding decision are therefore corrected with error-free
residuals (:func:`_scale_fix` for scales, :func:`_quotient_round_fix` for
rounding decisions, :func:`_div_fix` for the asymmetric zero point), which makes the result exact
for any division that is within 2 ulps. All three are covered by tests against
fixtures made by the Rust module (the asymmetric scheme against numpy); the
correction also by tests that perturb every quotient by up to 2 ulps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sensorquant_jax._src import nibbles
from sensorquant_jax._src.options import (
  ASYMMETRIC_INT4,
  ASYMMETRIC_PER_CHANNEL,
  BLOCK_SCHEMES,
  FP8_BLOCK,
  FP8_MAX,
  FP8_PER_CHANNEL,
  FP8_PER_TENSOR,
  FP8_SCHEMES,
  INT4,
  INT4_SCHEMES,
  MIN_SCALE,
  PER_BLOCK,
  PER_CHANNEL,
  PER_TENSOR,
  SCHEMES,
  Scheme,
)
from sensorquant_jax._src.qarray import SYMMETRIC_INT4_ZERO, QArray, merge_blocks, split_blocks

DEFAULT_BLOCK_SIZE = 32
"""Values per block of ``symmetric_per_block_int8`` (as GGUF Q8_0)."""
DEFAULT_GROUP_SIZE = 128
"""Values per group of the int4 schemes."""


FP8_TILE = 128
"""Rows and columns of an ``fp8_e4m3_block128`` tile (DeepSeek-V3's weight blocks)."""


def default_block_size(scheme: str) -> int:
  """The block (group) size ``scheme`` uses when none is given."""
  if scheme == FP8_BLOCK:
    return FP8_TILE
  return DEFAULT_GROUP_SIZE if scheme in INT4_SCHEMES else DEFAULT_BLOCK_SIZE


def code_range(scheme: str) -> tuple[int, int]:
  """The integer range of ``scheme``'s codes as :meth:`QArray.codes` gives them.

  A weight is ``(code - zero_point) * scale``; symmetric int4 codes are centred.
  The fp8 schemes' "codes" are their E4M3 values, in ``[-448, 448]`` (not integers:
  round them with :func:`fp8_round`).
  """
  if scheme == ASYMMETRIC_PER_CHANNEL:
    return -128, 127
  if scheme == ASYMMETRIC_INT4:
    return 0, 15
  if scheme == INT4:
    return -7, 7
  if scheme in FP8_SCHEMES:
    return -int(FP8_MAX), int(FP8_MAX)
  return -127, 127


@dataclasses.dataclass(frozen=True)
class Spec:
  """A resolved quantization request for one array.

  Attributes:
    scheme: one of :data:`SCHEMES`.
    axes: per-channel schemes: the channel (kept) axes; per-block: a 1-tuple
      with the block axis; ``None`` picks the documented default for the
      array's rank and leaf name (see :func:`default_axes`).
    block_size: values per block (per-block int8) or group (int4 schemes);
      ``None`` for the scheme's default (32 and 128). Int4 groups are even,
      so no byte holds codes of two groups.
    division_fix: correct float32 divisions with exact residuals (``True``),
      trust them (``False``), or ``None``: correct on every backend but
      XLA:CPU, whose division is IEEE. Part of the jit cache key, so results
      never depend on mutable state.
  """

  scheme: Scheme = PER_TENSOR
  axes: tuple[int, ...] | None = None
  block_size: int | None = None
  division_fix: bool | None = None

  def __post_init__(self):
    if self.scheme not in SCHEMES:
      raise ValueError(f"unknown scheme {self.scheme!r}; expected one of {', '.join(SCHEMES)}")
    if self.axes is not None:
      object.__setattr__(self, "axes", tuple(int(a) for a in self.axes))
    if self.block_size is None:
      object.__setattr__(self, "block_size", default_block_size(self.scheme))
    if int(self.block_size) < 1:
      raise ValueError(f"block_size must be >= 1, got {self.block_size}")
    if self.scheme in INT4_SCHEMES and int(self.block_size) % 2:
      raise ValueError(f"int4 group size must be even, got {self.block_size}")


def default_axes(scheme: str, ndim: int, leaf_name: str = "") -> tuple[int, ...] | None:
  """The default channel axes (per-channel) or block axis (per-block).

  Per-channel keeps one scale per output feature. Flax kernels put the output
  features last (Dense ``[in, out]``, Conv ``[..., in, out]``, DenseGeneral
  ``[in, heads, head_dim]`` and ``[heads, head_dim, out]``), so the default
  channel axis is ``-1``; embedding tables (leaf ``embedding``, ``[vocab,
  features]``) get one scale per row (axis ``0``).

  Per-block (and the int4 per-group schemes) split the contraction axis:
  axis ``0`` for 2-D and 3-D kernels (Dense input features; DenseGeneral
  ``in`` or ``heads``), ``-2`` for 4-D and larger (a Conv kernel's input
  features), and the feature axis ``-1`` for embedding tables. Override
  with a :class:`~sensorquant_jax.Rule`'s ``axes``.

  Args:
    scheme: scheme name.
    ndim: rank of the array.
    leaf_name: last component of the leaf's path.

  Returns:
    A tuple of axes, or ``None`` for the per-tensor scheme.
  """
  if scheme in (PER_CHANNEL, ASYMMETRIC_PER_CHANNEL, FP8_PER_CHANNEL):
    if ndim == 0:
      return ()
    return (0,) if leaf_name == "embedding" else (ndim - 1,)
  if scheme in BLOCK_SCHEMES:
    if ndim == 0:
      raise ValueError("per-block quantization needs at least one axis")
    if leaf_name == "embedding" or ndim == 1:
      return (ndim - 1,)
    return (0,) if ndim <= 3 else (ndim - 2,)
  return None


def exact_div(a: jax.Array, b: jax.Array) -> jax.Array:
  """IEEE ``a / b`` that XLA cannot turn into ``a * (1 / b)`` (see module doc)."""
  return a / jnp.where(jnp.isnan(a), jnp.float32(1), b)


def _split12(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``x = hi + lo`` exactly, each half with at most 12 significant bits."""
  bits = lax.bitcast_convert_type(x, jnp.uint32)
  hi = lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
  return hi, x - hi


def _closest_neighbour(c0: jax.Array, residual) -> jax.Array:
  """Of ``c0`` and its two float neighbours on each side, the one whose
  ``residual`` (an exact ``|a - b c|``) is smallest (NaN residuals lose)."""
  down = jnp.nextafter(c0, jnp.float32(-jnp.inf))
  up = jnp.nextafter(c0, jnp.float32(jnp.inf))
  cands = jnp.stack(
    [
      jnp.nextafter(down, jnp.float32(-jnp.inf)),
      down,
      c0,
      up,
      jnp.nextafter(up, jnp.float32(jnp.inf)),
    ]
  )
  r = jnp.stack([residual(cands[i]) for i in range(5)])
  r = jnp.where(jnp.isnan(r), jnp.float32(jnp.inf), r)
  return jnp.take_along_axis(cands, jnp.argmin(r, axis=0)[None], axis=0)[0]


def _scale_fix(m: jax.Array, c0: jax.Array, d: int = 127) -> jax.Array:
  """The correctly rounded ``m / d`` from an approximation ``c0`` (within 2 ulps).

  For an odd divisor ``d`` of at most 12 bits (127, 255). For each neighbour
  ``c`` of ``c0`` the residual ``m - d c`` is computed exactly (``c`` split
  into 12-bit halves: every product is exact, and each difference is
  representable, so IEEE subtraction returns it exactly); the correctly
  rounded quotient is the neighbour with the smallest residual (ties cannot
  occur: ``d`` is odd). Unlike :func:`_div_fix` it never forms ``d c`` whole,
  which would overflow for weights near float32 max.
  """

  def resid(c):
    hi, lo = _split12(c)
    return jnp.abs((m - hi * jnp.float32(d)) - lo * jnp.float32(d))

  return jnp.where(jnp.isfinite(m) & jnp.isfinite(c0), _closest_neighbour(c0, resid), c0)


def _exact_residual(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
  """``a - b c`` without rounding error when ``c`` is within an ulp of ``a / b``.

  Dekker's product with 12-bit halves gives ``b c = p + e`` exactly (every
  partial product is exact, so fused multiply-adds change nothing); ``a - p``
  is exact by Sterbenz's lemma, and the remainder is representable
  (Boldo-Daumas), so the last subtraction is exact too.
  """
  p = b * c
  bh, bl = _split12(b)
  ch, cl = _split12(c)
  e = ((bh * ch - p) + bh * cl + bl * ch) + bl * cl
  return (a - p) - e


def _div_fix(a: jax.Array, b: jax.Array, c0: jax.Array) -> jax.Array:
  """The correctly rounded ``a / b`` from an approximation ``c0`` (within 2 ulps).

  Picks the neighbour of ``c0`` with the smallest exact residual; the true
  quotient is never a midpoint of two floats unless it is itself a float (a
  24-bit ``a`` cannot equal ``b`` times a 25-bit midpoint), so there are no ties.
  Exact while the partial products stay normal (``|a| >= 2^-100``, no
  overflow); the asymmetric scheme only needs it where that holds (a smaller
  zero-point quotient cannot move the rounded zero point).
  """
  best = _closest_neighbour(c0, lambda c: jnp.abs(_exact_residual(a, b, c)))
  ok = jnp.isfinite(a) & jnp.isfinite(b) & jnp.isfinite(c0) & (b != 0)
  return jnp.where(ok, best, c0)


def _quotient_round_fix(w: jax.Array, s: jax.Array, y0: jax.Array) -> jax.Array:
  """``round_half_away(fl(w / s))`` from an approximate quotient ``y0`` (within 2 ulps).

  Only quotients within 2^-12 of a half-integer ``b`` can round the wrong
  way; for those, ``fl(|w| / s) >= b`` is decided exactly: it holds iff
  ``|w| - b s > -s ulp_below(b) / 2``, and ``|w| - b s`` is computed exactly
  with ``s`` split into 12-bit halves (``b`` has at most 8 significant bits,
  so both products are exact and both differences representable).
  """
  a = jnp.abs(y0)
  b = jnp.floor(a) + jnp.float32(0.5)
  near = jnp.abs(a - b) < jnp.float32(2.0**-12)
  hi, lo = _split12(s)
  t = (jnp.abs(w) - b * hi) - b * lo
  half_ulp = (b - jnp.nextafter(b, jnp.float32(0))) * jnp.float32(0.5)
  above = t > -(half_ulp * s)
  q_near = jnp.where(above, b + jnp.float32(0.5), b - jnp.float32(0.5))
  q_abs = jnp.where(near, q_near, lax.round(a, lax.RoundingMethod.AWAY_FROM_ZERO))
  return jnp.where(jnp.signbit(y0), -q_abs, q_abs)


def _needs_fix(spec: Spec) -> bool:
  """Whether to correct divisions: ``spec.division_fix``, or by default on every
  backend but XLA:CPU (whose float32 division is IEEE)."""
  if spec.division_fix is not None:
    return spec.division_fix
  return jax.default_backend() != "cpu"


def _round_clip(y: jax.Array, lo: int, hi: int) -> jax.Array:
  """round-half-away-from-zero, NaN -> 0, clamp; as Rust's ``round().clamp() as i32``."""
  r = lax.round(y, lax.RoundingMethod.AWAY_FROM_ZERO)
  r = jnp.where(jnp.isnan(r), jnp.float32(0), r)
  return jnp.clip(r, lo, hi)


def _abs_max(w: jax.Array, axis: tuple[int, ...]) -> jax.Array:
  # NaN is ignored as Rust's fold(0.0, f32::max) ignores it; the caller reports it.
  return jnp.max(jnp.where(jnp.isnan(w), jnp.float32(0), jnp.abs(w)), axis=axis, keepdims=True)


def _symmetric(
  w: jax.Array,
  reduce_axes: tuple[int, ...],
  fix: bool,
  qmax: int = 127,
  given: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """``q`` in ``[-qmax, qmax]`` and ``scale = max(max|w| / qmax, 1e-8)`` (or ``given``)."""
  if given is None:
    m = _abs_max(w, reduce_axes)
    s0 = exact_div(m, jnp.float32(qmax))
    if fix:
      s0 = _scale_fix(m, s0, qmax)
  else:
    s0 = given.astype(jnp.float32)
  scale = jnp.maximum(s0, MIN_SCALE)
  y = exact_div(w, scale)
  if fix:
    y = _quotient_round_fix(w, scale, y)
  q = _round_clip(y, -qmax, qmax).astype(jnp.int8)
  return q, scale


def _asymmetric(
  wf: jax.Array,
  reduce_axes: tuple[int, ...],
  fix: bool,
  qmin: int,
  qmax: int,
  given: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``q`` in ``[qmin, qmax]``, ``scale = (hi - lo) / (qmax - qmin)`` (or ``given``) and
  the zero point.

  The range ``[lo, hi]`` always includes 0, so 0 is exactly representable (with a
  ``given`` scale, the zero point still places ``lo`` at ``qmin``).
  """
  levels = qmax - qmin
  finite = jnp.where(jnp.isnan(wf), jnp.float32(0), wf)
  lo = jnp.minimum(jnp.min(finite, axis=reduce_axes, keepdims=True), 0)
  if given is None:
    hi = jnp.maximum(jnp.max(finite, axis=reduce_axes, keepdims=True), 0)
    span = hi - lo
    s0 = exact_div(span, jnp.float32(levels))
    if fix:
      s0 = _scale_fix(span, s0, levels)
    # hi - lo overflows for ranges wider than float32 max (e.g. +-2e38): divide
    # before subtracting there (a finite scale; exactness is moot at that size).
    s0 = jnp.where(
      jnp.isinf(span),
      exact_div(hi, jnp.float32(levels)) - exact_div(lo, jnp.float32(levels)),
      s0,
    )
  else:
    s0 = given.astype(jnp.float32)
  scale = jnp.maximum(s0, MIN_SCALE)
  z0 = exact_div(lo, scale)
  if fix:
    z0 = _div_fix(lo, scale, z0)
  zp = _round_clip(jnp.float32(qmin) - z0, qmin, qmax)
  y = exact_div(wf, scale)
  if fix:
    y = _quotient_round_fix(wf, scale, y)
  q = _round_clip(_round_clip(y, -levels, levels) + zp, qmin, qmax)
  return q, scale, zp


def _normalize_axes(axes: Sequence[int], ndim: int) -> tuple[int, ...]:
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"axis {a} is out of range for an array of rank {ndim}")
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"repeated axes {tuple(axes)}")
  return tuple(sorted(out))


def resolve(spec: Spec, ndim: int, leaf_name: str = "") -> Spec:
  """Fills in default axes and validates them for an array of rank ``ndim``."""
  axes = spec.axes if spec.axes is not None else default_axes(spec.scheme, ndim, leaf_name)
  if spec.scheme in (PER_TENSOR, FP8_PER_TENSOR) or axes is None:
    return dataclasses.replace(spec, axes=None)
  axes = _normalize_axes(axes, ndim)
  if spec.scheme in BLOCK_SCHEMES and len(axes) != 1:
    raise ValueError(f"{spec.scheme} takes exactly one block axis, got {axes}")
  return dataclasses.replace(spec, axes=axes)


def quantize_leaf(w: jax.Array, spec: Spec, scale: jax.Array | None = None) -> QArray:
  """Quantizes one array under a resolved :class:`Spec` (traceable).

  Args:
    w: the array.
    spec: a resolved spec (:func:`resolve`).
    scale: a given scale in the QArray's layout (as ``quantize_leaf(w, spec).scale``)
      instead of the one the scheme computes from ``w`` (learned scales); at least
      ``1e-8``. The codes, the zero point and the rounding are the scheme's.

  Returns:
    The :class:`QArray`.
  """
  dtype = np.dtype(w.dtype)
  fix = _needs_fix(spec)
  ndim = w.ndim
  wf = w.astype(jnp.float32)
  neg = lambda axes: tuple(a - ndim for a in axes)  # noqa: E731

  if spec.scheme == PER_TENSOR:
    axes = tuple(range(ndim))
    q, scale = _symmetric(wf, axes, fix, given=scale)
    return QArray(q, scale, None, PER_TENSOR, neg(axes), None, dtype)
  if spec.scheme in FP8_SCHEMES:
    return _fp8_leaf(wf, spec, fix, scale, dtype)

  if spec.scheme in (PER_CHANNEL, ASYMMETRIC_PER_CHANNEL):
    kept = spec.axes or ()
    reduce_axes = tuple(a for a in range(ndim) if a not in kept)
    if spec.scheme == PER_CHANNEL:
      q, scale = _symmetric(wf, reduce_axes, fix, given=scale)
      return QArray(q, scale, None, PER_CHANNEL, neg(reduce_axes), None, dtype)
    q, scale, z8 = _asymmetric(wf, reduce_axes, fix, -128, 127, given=scale)
    return QArray(
      q.astype(jnp.int8),
      scale,
      z8.astype(jnp.int8),
      ASYMMETRIC_PER_CHANNEL,
      neg(reduce_axes),
      None,
      dtype,
    )

  # Per-block and per-group: pad the block axis with zeros (they never raise a
  # block's max), split it into (n_blocks, block), reduce over the block, then
  # undo the split.
  assert spec.axes is not None, "resolve() gives per-block specs their axis"
  (axis,) = spec.axes
  assert spec.block_size is not None, "Spec fills in the scheme's default"
  block = int(spec.block_size)
  blocks = split_blocks(wf, axis, block)
  given = None if scale is None else jnp.expand_dims(scale, axis + 1)
  zp: jax.Array | None = None
  if spec.scheme == ASYMMETRIC_INT4:
    q, scale, z = _asymmetric(blocks, (axis + 1,), fix, 0, 15, given=given)
    zp = jnp.squeeze(z, axis + 1).astype(jnp.int8)
  elif spec.scheme == INT4:
    q, scale = _symmetric(blocks, (axis + 1,), fix, 7, given=given)
    q = q + jnp.int8(SYMMETRIC_INT4_ZERO)
  else:
    q, scale = _symmetric(blocks, (axis + 1,), fix, given=given)
  q = merge_blocks(q, axis, wf.shape[axis])
  scale = jnp.squeeze(scale, axis + 1)
  if spec.scheme not in INT4_SCHEMES:
    return QArray(q, scale, None, PER_BLOCK, (axis - ndim,), block, dtype)
  n = wf.shape[axis]
  # An odd axis gets one padding nibble, never shown; symmetric pads with its 0.
  fill = SYMMETRIC_INT4_ZERO if zp is None else 0
  packed = nibbles.pack(q.astype(jnp.uint8), axis, fill)
  return QArray(packed, scale, zp, spec.scheme, (axis - ndim,), block, dtype, n % 2)


def fp8_round(y: jax.Array) -> jax.Array:
  """``y`` (float32) saturated to ``[-448, 448]`` and rounded to the nearest
  ``float8_e4m3fn``, ties to even, as ``ml_dtypes`` converts (NaN stays NaN)."""
  return jnp.clip(y, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)


def _fp8_scale(m: jax.Array) -> jax.Array:
  """The correctly rounded ``m / 448``: ``fl(m / 7) / 64`` (a power of two divides
  exactly while the result is normal), with the odd-divisor fix on every backend:
  where a shard holds a whole tile, XLA:CPU turns the division by a per-shard
  scalar into a multiply by its reciprocal (one ulp off)."""
  return _scale_fix(m, exact_div(m, jnp.float32(7)), 7) / jnp.float32(64)


def _fp8_leaf(
  wf: jax.Array, spec: Spec, fix: bool, given: jax.Array | None, dtype: np.dtype
) -> QArray:
  """fp8 E4M3 values ``fp8(w / scale)`` with ``scale = max(max|w| / 448, 1e-8)`` per
  tensor, channel or tile (see :func:`quantize_leaf`)."""
  ndim = wf.ndim
  if spec.scheme == FP8_PER_TENSOR:
    axes = tuple(range(ndim))
  elif spec.scheme == FP8_PER_CHANNEL:
    axes = tuple(a for a in range(ndim) if a not in (spec.axes or ()))
  else:
    axes = ()
  if spec.scheme != FP8_BLOCK:
    s = given if given is not None else _fp8_scale(_abs_max(wf, axes))
    scale = jnp.maximum(s.astype(jnp.float32), MIN_SCALE)
    q = fp8_round(_fp8_quotient(wf, scale, fix))
    return QArray(q, scale, None, spec.scheme, tuple(a - ndim for a in axes), None, dtype)
  assert spec.axes is not None and spec.block_size is not None
  (axis,) = spec.axes
  block = int(spec.block_size)
  if given is None:
    scale = _fp8_scale(_tile_abs_max(wf, axis, block))
  else:
    scale = given.astype(jnp.float32)
  scale = jnp.maximum(scale, MIN_SCALE)
  full = jnp.repeat(scale, block, axis=axis)[tuple(slice(0, d) for d in wf.shape)]
  q = fp8_round(_fp8_quotient(wf, full, fix))
  return QArray(q, scale, None, FP8_BLOCK, (axis - ndim,), block, dtype)


def tile_axis(ndim: int, axis: int) -> int | None:
  """The second axis of an ``fp8_e4m3_block128`` tile: the last axis other than the
  block axis ``axis`` (``None`` for 1-D arrays, whose tiles are blocks)."""
  others = [a for a in range(ndim) if a != axis % ndim]
  return others[-1] if others else None


def _tile_abs_max(wf: jax.Array, axis: int, block: int) -> jax.Array:
  """``max|w|`` of each ``block x block`` tile (the block axis and :func:`tile_axis`),
  in the per-block scale layout: one entry per block along ``axis``, each tile's
  value repeated over its columns."""
  m = jnp.squeeze(_abs_max(split_blocks(wf, axis, block), (axis + 1,)), axis + 1)
  col = tile_axis(wf.ndim, axis)
  if col is None:
    return m
  tiles = jnp.max(split_blocks(m, col, block), axis=col + 1)  # zero padding: never a max
  return lax.slice_in_dim(jnp.repeat(tiles, block, axis=col), 0, m.shape[col], axis=col)


def _fp8_quotient(wf: jax.Array, scale: jax.Array, fix: bool) -> jax.Array:
  """``fl(w / scale)``, correctly rounded off CPU too (an fp8 rounding decision
  depends on every bit of the float32 quotient)."""
  y = exact_div(wf, scale)
  if fix:
    y = _div_fix(wf, jnp.broadcast_to(scale, wf.shape), y)
  return y


def with_codes(qa: QArray, codes: jax.Array) -> QArray:
  """``qa`` holding new ``codes`` (logical shape, in :func:`code_range`; fp8 schemes:
  float32 values on the fp8 grid), scales kept."""
  if qa.scheme in FP8_SCHEMES:
    return dataclasses.replace(qa, values=fp8_round(codes.astype(jnp.float32)))
  if qa.bits == 8:
    return dataclasses.replace(qa, values=codes.astype(jnp.int8))
  # Symmetric int4 stores code + 8, and pads an odd axis with its 0.
  shift = SYMMETRIC_INT4_ZERO if qa.zero_point is None else 0
  axis = qa.axes[0] % codes.ndim
  stored = (codes.astype(jnp.int32) + shift).astype(jnp.uint8)
  return dataclasses.replace(qa, values=nibbles.pack(stored, axis, shift))
