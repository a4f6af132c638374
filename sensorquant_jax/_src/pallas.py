"""Pallas kernels (GPU through Triton; any backend in interpret mode).

The int4 weight-only kernel: a grid over column blocks of the output; each
program walks the groups of K, unpacks one group's nibbles in registers (low
nibbles meet the even activations, high nibbles the odd ones, so nothing is
interleaved), takes its two partial dots in float32 and adds
``scale * (dot - zero * sum(x))`` to the accumulator. Neither a float nor an
int8 copy of the weight is written to memory.

Not yet measured on a GPU (no device was lent when it was written), so
``impl="auto"`` does not pick it; ``impl="pallas"`` does. On CPU it runs in
interpret mode, which is how the tests check it against the XLA reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sensorquant_jax._src.qarray import SYMMETRIC_INT4_ZERO

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
