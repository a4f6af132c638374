"""Pallas kernels (GPU through Triton; any backend in interpret mode).

Three kernels, none of which writes a float (or, for int4, an int8) copy of
the weight to memory:

- ``int8_dense``: weight-only int8 for small batches. A grid over (row
  blocks, column blocks, K splits): each program streams one K range of one
  column block, converting int8 tiles to the activation dtype in registers
  and accumulating in float32; split-K keeps every SM streaming when the
  batch is 1 and N alone gives too few programs. Per-block scales are applied
  per K block inside; per-channel scales, zero points and the split sum are
  one XLA epilogue.
- ``w8a8_dense``: int8 x int8 -> int32 (tensor cores on GPU) with the
  activation quantization fused: each program quantizes its activation tile
  in registers (per-token scales are one XLA reduction beforehand), so no int8
  copy of the activations goes through memory.
- ``int4_dense``: int4 weight-only per group; each program walks the groups of
  K, unpacks one group's nibbles in registers (low nibbles meet the even
  activations, high nibbles the odd ones, so nothing is interleaved), takes
  its two partial dots in float32 and adds ``scale * (dot - zero * sum(x))``.

``impl="pallas"`` runs them (interpret mode off GPU: how the tests check them
against XLA on CPU); ``impl="auto"`` considers them on GPU only, where
:mod:`tuning` times them against XLA and keeps the faster.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sensorquant_jax._src.qarray import SYMMETRIC_INT4_ZERO
from sensorquant_jax._src.schemes import exact_div

BLOCK_N = 128
"""Output columns per program."""


def _int4_kernel(xe_ref, xo_ref, w_ref, s_ref, *refs, groups: int, half: int):
  z_ref, o_ref = refs if len(refs) == 2 else (None, refs[0])  # symmetric: no zero points
  m = xe_ref.shape[0]
  bn = w_ref.shape[1]

  def body(g, acc):
    rows = pl.ds(g * half, half)
    xe = xe_ref[:, rows].astype(jnp.float32)
    xo = xo_ref[:, rows].astype(jnp.float32)
    w = w_ref[rows, :].astype(jnp.int32)
    lo = (w & 0xF).astype(jnp.float32)
    hi = (w >> 4).astype(jnp.float32)
    part = jnp.dot(xe, lo, preferred_element_type=jnp.float32)
    part += jnp.dot(xo, hi, preferred_element_type=jnp.float32)
    xsum = jnp.sum(xe, axis=1, keepdims=True) + jnp.sum(xo, axis=1, keepdims=True)
    s = s_ref[pl.ds(g, 1), :]
    z = (
      jnp.float32(SYMMETRIC_INT4_ZERO)
      if z_ref is None
      else z_ref[pl.ds(g, 1), :].astype(jnp.float32)
    )
    return acc + s * (part - z * xsum)

  acc = jax.lax.fori_loop(0, groups, body, jnp.zeros((m, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block", "interpret"))
def int4_dense(
  x: jax.Array,
  packed: jax.Array,
  scale: jax.Array,
  zero: jax.Array | None,
  *,
  block: int,
  interpret: bool,
) -> jax.Array:
  """``x @ W`` for int4 ``W`` given as nibbles ``[ceil(K / 2), N]`` (float32 result).

  Args:
    x: ``[M, K]`` floats.
    packed: uint8 nibbles, low nibble = even k.
    scale: float32 ``[ceil(K / block), N]``.
    zero: int8 zero points like ``scale``, or ``None`` (symmetric: code 8 is 0).
    block: the group size (even).
    interpret: run the kernel in Pallas interpret mode (CPU, tests).
  """
  mrows, k = x.shape
  n = packed.shape[1]
  groups = scale.shape[0]
  half = block // 2
  kp = groups * block  # K padded to whole groups; padded activations are 0
  x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, kp - k)))
  xe, xo = x[:, 0::2], x[:, 1::2]
  w = jnp.pad(packed, ((0, groups * half - packed.shape[0]), (0, 0)))
  bn = min(BLOCK_N, n)
  npad = -(-n // bn) * bn
  if npad != n:
    w = jnp.pad(w, ((0, 0), (0, npad - n)))
    scale = jnp.pad(scale, ((0, 0), (0, npad - n)))
    if zero is not None:
      zero = jnp.pad(zero, ((0, 0), (0, npad - n)))
  kernel = functools.partial(_int4_kernel, groups=groups, half=half)
  rows = pl.BlockSpec((mrows, groups * half), lambda j: (0, 0))
  per_group = pl.BlockSpec((groups, bn), lambda j: (0, j))
  args = [xe, xo, w, scale.astype(jnp.float32)]
  specs = [rows, rows, pl.BlockSpec((groups * half, bn), lambda j: (0, j)), per_group]
  if zero is not None:
    args.append(zero)
    specs.append(per_group)
  out = pl.pallas_call(
    kernel,
    grid=(npad // bn,),
    in_specs=specs,
    out_specs=pl.BlockSpec((mrows, bn), lambda j: (0, j)),
    out_shape=jax.ShapeDtypeStruct((mrows, npad), jnp.float32),
    interpret=interpret,
  )(*args)
  return out[:, :n]


def _round_away(y: jax.Array) -> jax.Array:
  """Round half away from zero (as :func:`ops.quantize_activations`), exactly:
  ``floor(|y|) + (|y| - floor(|y|) >= 0.5)`` never rounds the sum."""
  a = jnp.abs(y)
  r = jnp.floor(a)
  return jnp.sign(y) * (r + (a - r >= 0.5).astype(y.dtype))


def _int8_kernel(x_ref, w_ref, *refs, steps: int, bk: int, scaled: bool):
  s_ref, o_ref = refs if scaled else (None, refs[0])
  bm, bn = o_ref.shape[-2], o_ref.shape[-1]
  cdt = x_ref.dtype

  def body(i, acc):
    cols = pl.ds(i * bk, bk)
    part = jnp.dot(x_ref[:, cols], w_ref[cols, :].astype(cdt), preferred_element_type=jnp.float32)
    if s_ref is not None:  # one scale row per K block (bk == block)
      part = part * s_ref[pl.ds(i, 1), :]
    return acc + part

  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc.reshape(o_ref.shape)


def _pad_to(a: jax.Array, axis: int, size: int) -> jax.Array:
  if a.shape[axis] == size:
    return a
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, size - a.shape[axis])
  return jnp.pad(a, pad)


def _ceil_to(v: int, m: int) -> int:
  return -(-v // m) * m


def _pow2(v: int, lo: int = 16) -> int:
  """The least power of two >= ``max(v, lo)``: Triton's block sizes (and its
  dots' smallest side, 16)."""
  return 1 << (max(v, lo) - 1).bit_length()


def _check_block(block: int | None) -> None:
  if block is not None and block != _pow2(block):
    raise ValueError(f"the Pallas int8 kernels take power-of-two blocks >= 16, got {block}")


SM_PROGRAMS = 264
"""Programs a weight-only grid aims for (two per SM of an H100/H200): split-K
adds K splits until the grid has about this many."""


def _splits(k_steps: int, programs: int) -> int:
  return max(1, min(k_steps // 4 if k_steps >= 8 else 1, -(-SM_PROGRAMS // max(programs, 1))))


@functools.partial(jax.jit, static_argnames=("block", "interpret", "splits"))
def int8_dense(
  x: jax.Array,
  values: jax.Array,
  scale: jax.Array,
  zero: jax.Array | None,
  *,
  block: int | None,
  interpret: bool,
  splits: int | None = None,
) -> jax.Array:
  """``x @ ((values - zero) * scale)`` for an int8 kernel ``[K, N]`` (float32 result).

  Args:
    x: ``[M, K]`` floats (float32 or bf16: the dot runs in this dtype).
    values: int8 ``[K, N]``.
    scale: float32 ``[1, N]`` (per tensor or channel) or ``[ceil(K / block), N]``.
    zero: int8 ``[1, N]`` zero points, or ``None``.
    block: the per-block scale's block size, or ``None``.
    interpret: Pallas interpret mode (CPU, tests).
    splits: K splits (default: enough for :data:`SM_PROGRAMS` programs).
  """
  m, k = x.shape
  n = values.shape[1]
  cdt = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
  _check_block(block)
  bm, bn = min(64, _pow2(m)), min(128, _pow2(n))
  bk = block if block is not None else 256
  k_steps = -(-k // bk)
  mp, np_ = _ceil_to(m, bm), _ceil_to(n, bn)
  if splits is None:
    splits = _splits(k_steps, (mp // bm) * (np_ // bn))
  steps = -(-k_steps // splits)
  kp = steps * splits * bk  # padded K: zero activations meet zero weights
  xp = _pad_to(_pad_to(x.astype(cdt), 0, mp), 1, kp)
  wp = _pad_to(_pad_to(values, 0, kp), 1, np_)
  args = [xp, wp]
  specs = [
    pl.BlockSpec((bm, steps * bk), lambda i, j, s: (i, s)),
    pl.BlockSpec((steps * bk, bn), lambda i, j, s: (s, j)),
  ]
  if block is not None:
    sp = _pad_to(_pad_to(scale.astype(jnp.float32), 0, kp // bk), 1, np_)
    args.append(sp)
    specs.append(pl.BlockSpec((steps, bn), lambda i, j, s: (s, j)))
  kernel = functools.partial(_int8_kernel, steps=steps, bk=bk, scaled=block is not None)
  part = pl.pallas_call(
    kernel,
    grid=(mp // bm, np_ // bn, splits),
    in_specs=specs,
    out_specs=pl.BlockSpec((1, bm, bn), lambda i, j, s: (s, i, j)),
    out_shape=jax.ShapeDtypeStruct((splits, mp, np_), jnp.float32),
    interpret=interpret,
  )(*args)
  y = jnp.sum(part, axis=0)[:m, :n]
  if zero is not None:
    y = y - jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True) * zero.astype(jnp.float32)
  if block is None:
    y = y * scale.astype(jnp.float32)
  return y


def _w8a8_kernel(x_ref, xs_ref, w_ref, *refs, steps: int, bk: int, scaled: bool, zero: bool):
  s_ref = refs[0] if scaled else None
  z_ref = refs[int(scaled)] if zero else None
  o_ref = refs[-1]
  bm, bn = o_ref.shape
  xs = xs_ref[...]  # [bm, 1] float32

  def body(i, carry):
    acc, rows = carry
    cols = pl.ds(i * bk, bk)
    xq = jnp.clip(_round_away(x_ref[:, cols].astype(jnp.float32) / xs), -127, 127)
    part = jnp.dot(xq.astype(jnp.int8), w_ref[cols, :], preferred_element_type=jnp.int32)
    if s_ref is not None:  # per-block weight scales: float from here on
      acc = acc + part.astype(jnp.float32) * s_ref[pl.ds(i, 1), :]
    else:
      acc = acc + part.astype(jnp.float32)
    if zero:
      rows = rows + jnp.sum(xq, axis=1, keepdims=True)
    return acc, rows

  init = (jnp.zeros((bm, bn), jnp.float32), jnp.zeros((bm, 1), jnp.float32))
  acc, rows = jax.lax.fori_loop(0, steps, body, init)
  if z_ref is not None:
    acc = acc - rows * z_ref[...].astype(jnp.float32)
  o_ref[...] = acc * xs


@functools.partial(jax.jit, static_argnames=("block", "interpret"))
def w8a8_dense(
  x: jax.Array,
  values: jax.Array,
  scale: jax.Array,
  zero: jax.Array | None,
  act_scale: jax.Array | None,
  *,
  block: int | None,
  interpret: bool,
) -> jax.Array:
  """Int8 activations times an int8 kernel ``[K, N]``, rescaled (float32 result).

  The activations are quantized as :func:`ops.quantize_activations` does (per
  token ``max|x| / 127``, or the static ``act_scale``), inside the kernel.

  Args:
    x: ``[M, K]`` floats.
    values: int8 ``[K, N]``.
    scale: float32 ``[1, N]`` or per-block ``[ceil(K / block), N]``.
    zero: int8 ``[1, N]`` or ``None``.
    act_scale: a static activation scale (scalar), or ``None`` for per token.
    block: per-block scales' block size, or ``None``.
    interpret: Pallas interpret mode.
  """
  m, k = x.shape
  n = values.shape[1]
  xf = x.astype(jnp.float32)
  if act_scale is None:
    xs = exact_div(jnp.max(jnp.abs(xf), axis=1, keepdims=True), jnp.float32(127))
    xs = jnp.maximum(xs, 1e-12)  # the scales of ops.quantize_activations, bit for bit
  else:
    xs = jnp.broadcast_to(jnp.asarray(act_scale, jnp.float32).reshape(1, 1), (m, 1))
  _check_block(block)
  bm, bn = min(128, _pow2(m)), min(128, _pow2(n))
  bk = block if block is not None else 128
  steps = -(-k // bk)
  mp, np_, kp = _ceil_to(m, bm), _ceil_to(n, bn), steps * bk
  args = [
    _pad_to(_pad_to(x, 0, mp), 1, kp),
    _pad_to(xs, 0, mp),  # padded rows: zero activations over a scale of 0 are masked below
    _pad_to(_pad_to(values, 0, kp), 1, np_),
  ]
  args[1] = jnp.where(jnp.arange(mp)[:, None] < m, args[1], 1.0)
  specs = [
    pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
    pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
    pl.BlockSpec((kp, bn), lambda i, j: (0, j)),
  ]
  if block is not None:
    args.append(_pad_to(_pad_to(scale.astype(jnp.float32), 0, steps), 1, np_))
    specs.append(pl.BlockSpec((steps, bn), lambda i, j: (0, j)))
  if zero is not None:
    args.append(_pad_to(zero, 1, np_))
    specs.append(pl.BlockSpec((1, bn), lambda i, j: (0, j)))
  kernel = functools.partial(
    _w8a8_kernel, steps=steps, bk=bk, scaled=block is not None, zero=zero is not None
  )
  y = pl.pallas_call(
    kernel,
    grid=(mp // bm, np_ // bn),
    in_specs=specs,
    out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
    out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.float32),
    interpret=interpret,
  )(*args)[:m, :n]
  return y if block is not None else y * scale.astype(jnp.float32)
