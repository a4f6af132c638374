"""Running unmodified Flax Linen models on quantized params."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sensorquant_jax import ops
from sensorquant_jax.qarray import QArray
from sensorquant_jax.tree_paths import path_str

_HANDLED = (nn.Dense, nn.DenseGeneral, nn.Embed)


def _is_q(x: Any) -> bool:
  return isinstance(x, (QArray, ops.PackedQArray))


def transpose_2d(w: QArray) -> QArray:
  """The QArray of ``w.T`` for a 2-D QArray (an Embed table used as an output layer)."""
  swap = {-1: -2, -2: -1}
  return QArray(
    w.values.T,
    w.scale.T,
    None if w.zero_point is None else w.zero_point.T,
    w.scheme,
    tuple(sorted(swap[a] for a in w.axes)),
    w.block_size,
    w.dtype,
  )


def _take_rows(table: QArray, idx: jax.Array) -> jax.Array:
  """``table[idx]`` dequantized, gathering int8 rows (and their scales) first."""
  v = jnp.take(table.values, idx, axis=0)

  def rows(a):
    if a is None:
      return None
    if a.shape[0] == table.shape[0] and table.shape[0] != 1:
      return jnp.take(a, idx, axis=0)
    return a.reshape((1,) * idx.ndim + a.shape[1:])

  part = QArray(
    v,
    rows(table.scale),
    rows(table.zero_point),
    table.scheme,
    table.axes,
    table.block_size,
    table.dtype,
  )
  return part.dequantize()


def _compute_dtype(module, x, kernel) -> Any:
  if getattr(module, "dtype", None) is not None:
    return module.dtype
  kd = kernel.dtype if hasattr(kernel, "dtype") else jnp.float32
  return jnp.result_type(x.dtype, kd)


def _handled(module: nn.Module, method: str) -> bool:
  kind = type(module)
  if kind is nn.Dense or kind is nn.Embed:
    return method in ("__call__", "attend")
  if kind is nn.DenseGeneral:
    return method == "__call__" and not module.batch_dims
  return False


def _interceptor(mode: str, act_scales: Mapping[str, Any] | None):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    method = context.method_name
    if not _handled(module, method) or not module.has_variable("params", _param_name(module)):
      return next_fun(*args, **kwargs)
    param = module.get_variable("params", _param_name(module))
    if not _is_q(param):
      return next_fun(*args, **kwargs)
    key = "/".join(("params",) + tuple(module.path))
    act = None if act_scales is None else act_scales.get(key)
    kind = type(module)
    if kind is nn.Embed:
      (x,) = args
      if method == "__call__":
        if not jnp.issubdtype(x.dtype, jnp.integer):
          raise ValueError("Input type must be an integer or unsigned integer.")
        table = param.unpack() if isinstance(param, ops.PackedQArray) else param
        out = _take_rows(table, x)
        return out.astype(module.dtype or out.dtype)
      table = param.unpack() if isinstance(param, ops.PackedQArray) else param
      dt = _compute_dtype(module, x, table)
      return ops.dense(x.astype(dt), transpose_2d(table), mode=mode, act_scale=act, dtype=dt)
    (x,) = args
    bias = module.get_variable("params", "bias") if module.use_bias else None
    dt = _compute_dtype(module, x, param)
    if kind is nn.Dense:
      return ops.dense(x.astype(dt), param, bias, mode=mode, act_scale=act, dtype=dt)
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    axis = tuple(a % x.ndim for a in axis)
    rest = tuple(a for a in range(x.ndim) if a not in axis)
    xt = jnp.transpose(x, rest + axis)
    return ops.dense_general(
      xt.astype(dt), param, bias, n_in=len(axis), mode=mode, act_scale=act, dtype=dt
    )

  return intercept


def _param_name(module: nn.Module) -> str:
  return "embedding" if type(module) is nn.Embed else "kernel"


def _handled_paths(model: nn.Module, variables: Any, args, kwargs, method) -> set[str]:
  """Param paths that the int8 ops will consume, found by tracing the float model."""
  seen: set[str] = set()

  def record(next_fun, a, k, context):
    module = context.module
    if _handled(module, context.method_name):
      seen.add("/".join(("params",) + tuple(module.path) + (_param_name(module),)))
    return next_fun(*a, **k)

  def run(v, a, k):
    with nn.intercept_methods(record):
      return model.apply(v, *a, method=method, **k)

  abstract = jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if _is_q(x) else x,
    variables,
    is_leaf=_is_q,
  )
  jax.eval_shape(run, abstract, args, kwargs)
  return seen


def apply(
  model: nn.Module,
  qparams: Any,
  *args,
  mode: str = "weight_only",
  act_scales: Mapping[str, Any] | None = None,
  method: Any = None,
  **kwargs,
) -> Any:
  """Runs an unmodified Linen ``model`` on quantized ``qparams``.

  Every quantized kernel of an ``nn.Dense``, ``nn.DenseGeneral`` (attention
  projections included) or ``nn.Embed`` (lookup and ``attend``) goes to the
  int8 ops (:func:`sensorquant_jax.dense`); a quantized leaf that no int8 op
  consumes (``nn.Conv``, ``nn.Einsum``, custom modules) is dequantized first,
  so results are never silently wrong. Works under ``jax.jit``.

  Args:
    model: a Linen module.
    qparams: variables from :func:`sensorquant_jax.quantize` (or
      :func:`sensorquant_jax.pack`), e.g. ``{"params": ...}``.
    *args: the model's inputs.
    mode: ``"weight_only"`` or ``"w8a8"``.
    act_scales: static activation scales for ``w8a8`` keyed by the module's
      param path (``"params/encoder/fc1"``), e.g. from calibration.
    method: as in ``model.apply``.
    **kwargs: passed to the model.

  Returns:
    The model's output.
  """
  if mode not in ops.MODES:
    raise ValueError(f"unknown mode {mode!r}; expected one of {ops.MODES}")
  handled = _handled_paths(model, qparams, args, kwargs, method)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=_is_q)
  fixed = []
  for p, x in leaves:
    if _is_q(x) and path_str(p) not in handled:
      x = x.dequantize()
    fixed.append(x)
  variables = jax.tree_util.tree_unflatten(treedef, fixed)
  with nn.intercept_methods(_interceptor(mode, act_scales)):
    return model.apply(variables, *args, method=method, **kwargs)


class QuantizedDense(nn.Module):
  """A Dense layer whose ``kernel`` param is a :class:`QArray` (from ``quantize``).

  Create its params by quantizing a float ``nn.Dense``'s params, then use it
  in place of the ``nn.Dense``.
  """

  features: int
  use_bias: bool = True
  mode: str = "weight_only"
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    kernel, bias = _params(self)
    return ops.dense(x, kernel, bias, mode=self.mode, dtype=self.dtype)


class QuantizedDenseGeneral(nn.Module):
  """DenseGeneral over the last ``n_in`` input axes with a :class:`QArray` kernel."""

  features: int | tuple[int, ...]
  n_in: int = 1
  use_bias: bool = True
  mode: str = "weight_only"
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    kernel, bias = _params(self)
    return ops.dense_general(x, kernel, bias, n_in=self.n_in, mode=self.mode, dtype=self.dtype)


def _params(module):
  kernel = module.get_variable("params", "kernel")
  bias = module.get_variable("params", "bias") if module.use_bias else None
  if kernel is None or (module.use_bias and bias is None):
    raise ValueError(
      "quantized modules have no initializer: quantize a float model's params and pass them in"
    )
  return kernel, bias
