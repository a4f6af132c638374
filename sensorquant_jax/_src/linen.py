"""Running unmodified Flax Linen models on quantized params."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from sensorquant_jax._src import ops, options, transform
from sensorquant_jax._src.options import Mode


def apply(
  model: nn.Module,
  qparams: Any,
  *args,
  mode: Mode = "weight_only",
  act_scales: Mapping[str, Any] | None = None,
  method: Any = None,
  warn: bool = True,
  **kwargs,
) -> Any:
  """Runs an unmodified Linen ``model`` on quantized ``qparams``.

  A thin adapter over :func:`sensorquant_jax.quantized`: every matmul of the
  model whose operand is a quantized leaf (``nn.Dense``, ``nn.DenseGeneral``,
  ``nn.Einsum``, ``Embed.attend``, custom modules calling ``jnp.einsum`` or
  ``@``, ``nn.scan`` stacks...) runs on the int8 / int4 ops; lookups read
  int8 rows; any other use of a quantized leaf gets its dequantized value
  (see :func:`sensorquant_jax.explain`). Python flags among ``kwargs`` stay
  static. Works under ``jax.jit``.

  Args:
    model: a Linen module.
    qparams: variables from :func:`sensorquant_jax.quantize` (or
      :func:`sensorquant_jax.pack`), e.g. ``{"params": ...}``.
    *args: the model's inputs.
    mode: ``"weight_only"`` or ``"w8a8"``.
    act_scales: static activation scales for ``w8a8`` keyed by the leaf path
      (``"params/encoder/fc1/kernel"``) or the module's param path
      (``"params/encoder/fc1"``), e.g. from calibration.
    method: as in ``model.apply``.
    warn: warn when a quantized leaf is dequantized in full.
    **kwargs: passed to ``model.apply`` (``rngs``, ``mutable``, flags...).

  Returns:
    The model's output.
  """
  options.check("mode", mode, options.MODES)

  def run(variables, *a, **k):
    return model.apply(variables, *a, method=method, **k)

  fn = transform.quantized(run, mode=mode, act_scales=act_scales, warn=warn)
  return fn(qparams, *args, **kwargs)


def quantized_module(
  model: nn.Module,
  *,
  mode: Mode = "weight_only",
  act_scales: Mapping[str, Any] | None = None,
  warn: bool = True,
) -> nn.Module:
  """``model`` as a module of its own class whose ``apply`` runs on quantized params.

  For code that calls ``model.apply`` itself (samplers, serving loops): hand
  it this module and the quantized params; every other attribute and method
  is the model's. ``init`` and ``bind`` are the float model's.

  Args:
    model: a Linen module.
    mode, act_scales, warn: as for :func:`apply`.

  Returns:
    An instance of a subclass of ``type(model)`` with the same fields.

  Example:
    >>> qparams = sq.quantize(params, sq.INT4, like=(model.apply, tokens))
    >>> sampler = Sampler(model=sq.quantized_module(model), params=qparams["params"])
  """
  options.check("mode", mode, options.MODES)
  cls = type(model)

  def quantized_apply(self, variables, *args, method=None, **kwargs):
    return apply(
      model, variables, *args, mode=mode, act_scales=act_scales, method=method, warn=warn, **kwargs
    )

  sub = type(
    f"Quantized{cls.__name__}",
    (cls,),
    {"apply": nn.nowrap(quantized_apply), "__module__": cls.__module__},
  )
  fields = {
    f.name: getattr(model, f.name)
    for f in dataclasses.fields(model)
    if f.init and f.name not in ("parent", "name")
  }
  return sub(**fields)


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
