"""Any Flax NNX model on quantized params, through the op-level transform."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from sensorquant_jax._src import options, schemes, transform
from sensorquant_jax._src.options import Mode, Scheme
from sensorquant_jax._src.quantize import MIN_SIZE, RulesLike
from sensorquant_jax._src.quantize import quantize as _quantize_tree


class QuantizedModel(nnx.Module):
  """An NNX module whose params hold QArrays, run through :func:`sensorquant_jax.quantized`.

  Calling it calls the wrapped module; its other methods are reached with
  :meth:`call` (or as attributes: ``qmodel.attend(x)``). Every matmul on a
  quantized param runs on the int8 / int4 ops, whatever the layer type.
  State other than params (caches, batch statistics, RNG counters) is updated
  as the wrapped module updates it.

  Attributes:
    model: the wrapped module (its ``nnx.Param`` values are QArrays where
      quantized).
    mode: ``"weight_only"`` or ``"w8a8"``.
  """

  def __init__(
    self,
    model: nnx.Module,
    *,
    mode: Mode = "weight_only",
    act_scales: Mapping[str, Any] | None = None,
    warn: bool = True,
  ):
    options.check("mode", mode, options.MODES)
    self.model = model
    self.mode = mode
    self.act_scales = None if act_scales is None else dict(act_scales)
    self.warn = warn

  def __call__(self, *args, **kwargs) -> Any:
    return self.call("__call__", *args, **kwargs)

  def call(self, method: str | Callable, *args, **kwargs) -> Any:
    """Runs ``method`` (a name, or ``f(module, *args, **kwargs)``) of the wrapped module."""
    graphdef, params, rest = _split(self.model)

    def run(pure, rest, *a, **k):
      state = nnx.State(params)
      nnx.replace_by_pure_dict(state, pure)
      module = nnx.merge(graphdef, state, rest)
      fn = (
        getattr(module, method)
        if isinstance(method, str)
        else lambda *a, **k: method(module, *a, **k)
      )
      out = fn(*a, **k)
      return out, nnx.state(module, nnx.Not(nnx.Param))

    fn = transform.quantized(run, mode=self.mode, act_scales=self.act_scales, warn=self.warn)
    out, new_rest = fn(nnx.to_pure_dict(params), rest, *args, **kwargs)
    nnx.update(self.model, new_rest)
    return out

  def __getattr__(self, name: str) -> Any:
    if name.startswith("_") or name in ("model", "mode", "act_scales", "warn"):
      raise AttributeError(name)
    attr = getattr(self.model, name)
    if callable(attr) and not isinstance(attr, nnx.Module):
      return lambda *a, **k: self.call(name, *a, **k)
    return attr


def _split(model: nnx.Module) -> tuple[Any, nnx.State, nnx.State]:
  """``(graphdef, params, everything else)``."""
  graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest[0]


def quantize(
  model: nnx.Module,
  scheme: Scheme = schemes.PER_TENSOR,
  rules: RulesLike = None,
  *,
  min_size: int = MIN_SIZE,
  mode: Mode = "weight_only",
  act_scales: Mapping[str, Any] | None = None,
  like: tuple | None = None,
  check_finite: bool = True,
  warn: bool = True,
) -> QuantizedModel:
  """Returns a :class:`QuantizedModel` holding a quantized copy of any NNX ``model``.

  Params are chosen exactly as :func:`sensorquant_jax.quantize` chooses them,
  on paths such as ``"blocks/0/attn/query/kernel"``. Works for every module
  type (``nnx.Linear``, ``nnx.Einsum``, ``nnx.Embed``, custom modules,
  ``nnx.bridge.ToNNX`` around Linen code). The input model is left unchanged.

  Args:
    model: any NNX module.
    scheme, rules, min_size, check_finite: as for :func:`sensorquant_jax.quantize`.
    mode: ``"weight_only"`` or ``"w8a8"``.
    act_scales: static W8A8 activation scales keyed by param path.
    like: ``(fn, *example_args)`` with ``fn(model, *example_args)`` (e.g.
      ``(lambda m, x: m(x), x)``): read each param's axes from that
      computation (see :func:`sensorquant_jax.quantize`).
    warn: warn when a quantized param is dequantized in full.

  Example:
    >>> qmodel = sq.nnx.quantize(model, "symmetric_per_channel_int8")
    >>> y = nnx.jit(lambda m, x: m(x))(qmodel, x)
  """
  options.check("mode", mode, options.MODES)
  model = nnx.clone(model)
  graphdef, params, rest = _split(model)
  pure = nnx.to_pure_dict(params)
  like_tree = None
  if like is not None:
    if not isinstance(like, (tuple, list)) or not like or not callable(like[0]):
      raise ValueError("like must be a tuple (fn, *example_args) with fn(model, *example_args)")
    fn = like[0]

    def on_params(p, r, *a):  # the other state is traced too: NNX mutates RNG counts
      state = nnx.State(params)
      nnx.replace_by_pure_dict(state, p)
      return fn(nnx.merge(graphdef, state, r), *a)

    like_tree = (on_params, rest, *like[1:])
  qpure = _quantize_tree(
    pure, scheme, rules, min_size=min_size, check_finite=check_finite, like=like_tree
  )
  nnx.replace_by_pure_dict(params, qpure)
  nnx.update(model, params)
  return QuantizedModel(model, mode=mode, act_scales=act_scales, warn=warn)
