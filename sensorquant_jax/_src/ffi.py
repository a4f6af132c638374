"""Native XLA:CPU kernels (``csrc/dense.cc``) as JAX ops: FFI targets,
sharding (``custom_partitioning``), batching (``custom_vmap``) and gradients
(``custom_vjp`` through the equivalent XLA formula)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sensorquant_jax._src import native, options
from sensorquant_jax._src.native import (
  INT4_PACKED_TARGET,
  INT4_TARGET,
  INT4_ZERO_TARGET,
  W4A8_TARGET,
  W8_TARGET,
  WO_TARGET,
)

_INT4 = (INT4_TARGET, INT4_ZERO_TARGET, W4A8_TARGET, INT4_PACKED_TARGET)
_BLOCK_ATTR = (WO_TARGET, *_INT4)
_ISA_ATTR = (W4A8_TARGET, INT4_PACKED_TARGET, W8_TARGET)

W8_MAX_K = 65536
"""Largest K whose int32 accumulation of ``(x + 128) * w`` is exact (``kW8A8MaxK`` in
csrc/dense.cc; tests/test_native.py checks they agree)."""


def native_available(target: str, impl: options.Impl) -> bool:
  """Whether ``target`` serves this call: CPU backend, built, not switched off."""
  options.check("impl", impl, options.IMPLS)
  if impl in ("xla", "pallas"):
    return False
  # A CPU default backend means no accelerator is attached: every computation
  # runs on XLA:CPU. Elsewhere XLA fuses the convert into its GEMM itself.
  ok = jax.default_backend() == "cpu" and target in native.ffi_targets()
  if impl == "native" and not ok:
    why = native.build_error() or (
      "not on a CPU backend" if jax.default_backend() != "cpu" else "CPU lacks the instructions"
    )
    raise RuntimeError(f"native kernel {target} is unavailable: {why}")
  return ok


def kernel_shape_ok(values: jax.Array) -> bool:
  if values.ndim not in (2, 3):
    return False
  n = values.shape[-1] if values.ndim == 2 else values.shape[0] * values.shape[2]
  return n % 16 == 0 and values.shape[-1] % 16 == 0


def _spec_axis(sharding, dim: int):
  spec = getattr(sharding, "spec", ())
  return spec[dim] if dim < len(spec) else None


def _names(axis) -> tuple:
  return () if axis is None else axis if isinstance(axis, tuple) else (axis,)


def _mesh_size(mesh, axis) -> int:
  return math.prod(mesh.shape[a] for a in _names(axis))


def _sharded(
  call, n_rows: int, tiled: bool, n_cols: int = 1, packed: bool = False, col_multiple: int = 16
):
  """``call`` partitioned like a matmul under ``jit`` with sharded operands.

  Rows (activations) and output columns (weights, scales) keep their
  shardings and each device runs the kernel on its own block; the contraction
  axis is gathered. Without this, XLA would gather every operand to run the
  opaque custom call whole. The operands are ``n_rows`` row arrays, the
  weights, then ``n_cols`` per-column arrays ``[b, N]`` (scales, zero points).
  """
  op = custom_partitioning(call)

  def shardings(mesh, arg_shapes):
    x, values = arg_shapes[0], arg_shapes[n_rows]
    row = _spec_axis(x.sharding, 0)
    if row is not None and x.shape[0] % _mesh_size(mesh, row):
      row = None
    col = _spec_axis(values.sharding, 0 if tiled else 1)
    size = _mesh_size(mesh, col)
    n = values.shape[0] * values.shape[2] if tiled else values.shape[1]
    if col is not None and ((values.shape[0] if tiled else n) % size or (n // size) % col_multiple):
      col = None  # the kernel needs whole tiles and whole column chunks per device
    if col is not None and row is not None and set(_names(row)) & set(_names(col)):
      col = None  # one mesh axis cannot shard both output dimensions
    rows = [NamedSharding(mesh, P(row, None)) for _ in range(n_rows)]
    vspec = P(col, None, None) if tiled else P(None, col)
    cols = [NamedSharding(mesh, P(None, col)) for _ in range(n_cols)]
    args = (*rows, NamedSharding(mesh, vspec), *cols)
    return args, NamedSharding(mesh, P(row, col))

  def infer(mesh, arg_shapes, result_shape):
    return shardings(mesh, arg_shapes)[1]

  def partition(mesh, arg_shapes, result_shape):
    args, out = shardings(mesh, arg_shapes)
    return mesh, call, out, args

  rows = ", ".join(["m k", "m o"][:n_rows])
  # Factors: k (contraction), h (packed int4 rows: ceil(k / 2)), b (blocks).
  kw = "h" if packed else "k"
  weights = f"t {kw} u" if tiled else f"{kw} n"
  cols = ", ".join(["b (t u)" if tiled else "b n"] * n_cols)
  out = "m (t u)" if tiled else "m n"
  rule = f"{rows}, {weights}, {cols} -> {out}"
  op.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule)
  return op


@functools.cache
def _ffi_kernel(target: str, n_rows: int, block: int, tiled: bool, n_cols: int = 1, isa: int = 0):
  """The FFI call as a ``custom_vmap`` function of ``(*row_args, values, *col_args)``.

  Batching rows (the usual ``vmap`` over examples) folds the batch into the
  kernel's M dimension; batched weights fall back to a loop over the batch.
  """
  native.ffi_targets()  # registered before the first call is lowered

  def call(*args):
    values = args[n_rows]
    n = values.shape[1] if values.ndim == 2 else values.shape[0] * values.shape[2]
    out = jax.ShapeDtypeStruct((args[0].shape[0], n), jnp.float32)
    attrs = {"block": np.int64(block)} if target in _BLOCK_ATTR else {}
    if target in _ISA_ATTR:
      attrs["isa"] = np.int64(isa)
    return jax.ffi.ffi_call(target, out)(*args, **attrs)

  chunk = native.w4a8_isas().get(isa, 16) if target == W4A8_TARGET and not tiled else 16
  kernel = jax.custom_batching.custom_vmap(
    _sharded(call, n_rows, tiled, n_cols, target in _INT4, chunk)
  )

  @kernel.def_vmap
  def _rule(axis_size, in_batched, *args):
    if not any(in_batched[n_rows:]):
      rows = []
      for a, batched in zip(args[:n_rows], in_batched[:n_rows], strict=True):
        a = a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
        rows.append(a.reshape(-1, *a.shape[2:]))
      y = kernel(*rows, *args[n_rows:])
      return y.reshape(axis_size, -1, y.shape[-1]), True
    full = [
      a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
      for a, b in zip(args, in_batched, strict=True)
    ]
    return lax.map(lambda xs: kernel(*xs), tuple(full)), True

  return kernel


def native_op(
  target: str, n_rows: int, block: int, tiled: bool, reference, n_cols: int = 1, isa: int = 0
):
  """The kernel, differentiable through ``reference`` (the XLA formula it computes)."""
  kernel = _ffi_kernel(target, n_rows, block, tiled, n_cols, isa)

  @jax.custom_vjp
  def op(*args):
    return kernel(*args)

  def fwd(*args):
    return kernel(*args), args

  def bwd(args, g):
    return jax.vjp(reference, *args)[1](g)

  op.defvjp(fwd, bwd)
  return op
