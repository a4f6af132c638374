"""Running unmodified Flax Linen models on quantized params."""

from __future__ import annotations

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
