"""Running unmodified Flax Linen models on quantized params."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sensorquant_jax._src import flax_common, ops, options
from sensorquant_jax._src.options import Mode
from sensorquant_jax._src.packed import is_quantized
from sensorquant_jax._src.scaled import is_input_scaled
from sensorquant_jax._src.tree_paths import join, path_str


def _compute_dtype(module, x, kernel) -> Any:
  if getattr(module, "dtype", None) is not None:
    return module.dtype
  kd = kernel.dtype if hasattr(kernel, "dtype") else jnp.float32
  return jnp.result_type(x.dtype, kd)


def handled(module: nn.Module, method: str) -> bool:
  kind = type(module)
  if kind is nn.Dense or kind is nn.Embed:
    return method in ("__call__", "attend")
  if kind is nn.DenseGeneral:
    return method == "__call__" and not module.batch_dims
  return False


def _interceptor(mode: Mode, act_scales: Mapping[str, Any] | None):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    method = context.method_name
    if (
      method == "setup"
      and type(module) is nn.Embed
      and module.has_variable("params", "embedding")
      and is_quantized(module.get_variable("params", "embedding"))
    ):
      # Embed.setup declares the float table, and Flax checks its shape against
      # the first leaf of ours (packed int4 values are half as wide); the
      # intercepted __call__ and attend read the QArray themselves.
      return None
    if not handled(module, method) or not module.has_variable("params", _param_name(module)):
      return next_fun(*args, **kwargs)
    param = module.get_variable("params", _param_name(module))
    if not is_quantized(param):
      return next_fun(*args, **kwargs)
    key = join("params", *module.path)
    act = None if act_scales is None else act_scales.get(key)
    kind = type(module)
    (x,) = args
    if kind is nn.Embed:
      if method == "__call__":
        return flax_common.embed_lookup(param, x, module.dtype)
      dt = _compute_dtype(module, x, param)
      return flax_common.embed_attend(param, x, mode=mode, act_scale=act, dtype=dt)
    bias = module.get_variable("params", "bias") if module.use_bias else None
    dt = _compute_dtype(module, x, param)
    if kind is nn.Dense:
      return ops.dense(x.astype(dt), param, bias, mode=mode, act_scale=act, dtype=dt)
    return flax_common.dense_general_axes(
      x, param, bias, module.axis, mode=mode, act_scale=act, dtype=dt
    )

  return intercept


def _is_leaf(x: Any) -> bool:
  return is_quantized(x) or is_input_scaled(x)


def _param_name(module: nn.Module) -> str:
  return "embedding" if type(module) is nn.Embed else "kernel"


def _handled_paths(model: nn.Module, variables: Any, args, kwargs, method) -> set[str]:
  """Param paths that the int8 ops will consume, found by tracing the float model."""
  seen: set[str] = set()

  def record(next_fun, a, k, context):
    module = context.module
    if handled(module, context.method_name):
      seen.add(join("params", *module.path, _param_name(module)))
    return next_fun(*a, **k)

  def run(v, a, k):
    with nn.intercept_methods(record):
      return model.apply(v, *a, method=method, **k)

  abstract = jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if _is_leaf(x) else x,
    variables,
    is_leaf=_is_leaf,
  )
  jax.eval_shape(run, abstract, args, kwargs)
  return seen


def apply(
  model: nn.Module,
  qparams: Any,
  *args,
  mode: Mode = "weight_only",
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
  options.check("mode", mode, options.MODES)
  consumed = _handled_paths(model, qparams, args, kwargs, method)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=_is_leaf)
  fixed = []
  for p, x in leaves:
    if is_input_scaled(x):  # a smoothed float kernel: the folded one computes the same
      x = x.fold()
    elif is_quantized(x) and path_str(p) not in consumed:
      x = x.dequantize()
    fixed.append(x)
  variables = jax.tree_util.tree_unflatten(treedef, fixed)
  with nn.intercept_methods(_interceptor(mode, act_scales)):
    return model.apply(variables, *args, method=method, **kwargs)


class QuantizedDenseGeneral(nn.Module):
  """DenseGeneral over the last ``n_in`` input axes with a :class:`QArray` kernel."""

  features: int | tuple[int, ...]
  n_in: int = 1
  use_bias: bool = True
  mode: Mode = "weight_only"
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    kernel, bias = _params(self)
    return ops.dense_general(x, kernel, bias, n_in=self.n_in, mode=self.mode, dtype=self.dtype)


class QuantizedDense(QuantizedDenseGeneral):
  """A Dense layer whose ``kernel`` param is a :class:`QArray` (from ``quantize``).

  Create its params by quantizing a float ``nn.Dense``'s params, then use it
  in place of the ``nn.Dense`` (a :class:`QuantizedDenseGeneral` with one
  input axis).
  """


def _params(module):
  kernel = module.get_variable("params", "kernel")
  bias = module.get_variable("params", "bias") if module.use_bias else None
  if kernel is None or (module.use_bias and bias is None):
    raise ValueError(
      "quantized modules have no initializer: quantize a float model's params and pass them in"
    )
  return kernel, bias
