"""Activation calibration: observers over real batches, static W8A8 scales."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sensorquant_jax._src import capture, distributed, gptq, options, transform
from sensorquant_jax._src.batching import as_args
from sensorquant_jax._src.calibration import LayerCalibration
from sensorquant_jax._src.convert import default_layer_name
from sensorquant_jax._src.options import OBSERVERS
from sensorquant_jax._src.quantize import dequantize
from sensorquant_jax._src.scaled import is_input_scaled
from sensorquant_jax._src.tree_paths import join, path_str


@dataclasses.dataclass(frozen=True)
class ObserverConfig:
  """How activation ranges are estimated.

  Attributes:
    kind: ``"minmax"`` (exact running min/max), ``"moving_average"`` (EMA of
      per-batch min/max, order dependent), ``"percentile"`` (exact
      ``percentile``/``100 - percentile`` of all values, kept in a bounded
      top-k buffer sized for ``max_samples`` values per layer) or ``"mse"``
      (the symmetric clip ``c`` in a ``grid`` of ratios of max|x| minimising
      the int8 quantization error of all values; two passes).
    momentum: EMA momentum for ``moving_average``.
    percentile: for ``percentile``, e.g. 99.99.
    max_samples: bound on values per layer for the exact percentile.
    grid: number of clip ratios tried by ``mse`` (from 1/grid to 1).
  """

  kind: str = "minmax"
  momentum: float = 0.9
  percentile: float = 99.99
  max_samples: int = 10_000_000
  grid: int = 64

  def __post_init__(self):
    options.check("observer", self.kind, OBSERVERS)
    if not 50 < self.percentile <= 100:
      raise ValueError("percentile must be in (50, 100]")


def _capture(
  model: Any, variables: Any, args: tuple, kwargs: dict, scales: dict | None = None
) -> dict[str, jax.Array]:
  """Inputs of every module whose kernel the int8 ops consume, by module path.

  ``scales`` maps module paths of smoothed layers to their input scale: those
  inputs are recorded as the int8 op sees them (``x * input_scale``).
  """
  seen: dict[str, jax.Array] = {}
  scales = scales or {}

  def record(next_fun, a, k, context):
    module = context.module
    if capture.act_layer(module, context.method_name) and a:
      key = join("params", *module.path)
      x = a[0]
      if jnp.issubdtype(x.dtype, jnp.floating) and key not in seen:
        if key in scales:
          s = scales[key]
          x = capture.rows(x, capture.input_axes(module)) * s.reshape(-1).astype(jnp.float32)
        seen[key] = x
    return next_fun(*a, **k)

  with nn.intercept_methods(record):
    model.apply(variables, *args, **kwargs)
  return seen


def calibrate(
  model: nn.Module | Callable[..., Any],
  params: Any,
  batches: Iterable[Any] | Callable[[], Iterable[Any]],
  *,
  observer: str | ObserverConfig = "minmax",
  **kwargs,
) -> dict[str, LayerCalibration]:
  """Runs the float model over ``batches`` and records real activation ranges.

  Streaming: each batch runs jitted and is reduced to per-layer statistics
  before the next one; activations are never accumulated.

  Layers are found two ways: the inputs of ``nn.Dense``, ``nn.DenseGeneral``
  and ``Embed.attend`` modules (by module path), and, at the op, the input
  of every other matmul that reads a param (``Einsum`` layers, ``@`` in
  custom code, scanned stacks; by leaf path, e.g.
  ``"params/layer_0/attn/q_einsum/w"``, with ``minmax`` ranges over every
  call and layer). :func:`sensorquant_jax.quantized` looks static scales up
  by either key.

  Args:
    model: a Linen module, or any function ``f(params, *batch)``.
    params: its float variables (``{"params": ...}``).
    batches: model inputs, one per batch (a tuple for several positional
      arguments); a sequence or a zero-argument callable returning an iterable
      (``"mse"`` reads the batches twice).
    observer: an observer name or :class:`ObserverConfig`.
    **kwargs: :class:`ObserverConfig` fields (``percentile=99.9``, ...).

  Returns:
    ``{module param path or leaf path: LayerCalibration}`` with the weight
    range of the kernel and the measured input activation range. Feed it to
    :func:`act_scales`.
  """
  config = observer if isinstance(observer, ObserverConfig) else ObserverConfig(observer, **kwargs)
  if config.kind == "mse" and not (callable(batches) or isinstance(batches, Sequence)):
    raise ValueError("the mse observer reads the batches twice: pass a sequence or a callable")

  def iterate():
    read = batches() if callable(batches) else iter(batches)
    if distributed.is_multiprocess():  # batch i of every process forms one global batch
      return (distributed.process_local_batch(b, params) for b in read)
    return read

  scales = _input_scales(params)
  float_params = params
  params = dequantize(params) if scales else params

  if config.kind == "percentile":
    stats_fn = jax.jit(
      lambda v, *a: {k: _extremes(x, config) for k, x in _capture(model, v, a, {}, scales).items()}
    )
  else:
    stats_fn = jax.jit(
      lambda v, *a: {
        k: (jnp.min(x), jnp.max(x)) for k, x in _capture(model, v, a, {}, scales).items()
      }
    )

  state: dict[str, Any] = {}
  counts: dict[str, int] = {}
  for batch in iterate() if isinstance(model, nn.Module) else ():
    args = as_args(batch)
    stats = jax.device_get(stats_fn(params, *args))
    for key, s in stats.items():
      if config.kind == "percentile":
        hi, lo, n = s
        counts[key] = counts.get(key, 0) + int(n)
        if counts[key] > config.max_samples:
          raise ValueError(f"{key}: more than max_samples={config.max_samples} values; raise it")
        prev = state.get(key)
        hi = np.sort(np.concatenate([prev[0], hi]) if prev else hi)[::-1][: _topk(config)]
        lo = np.sort(np.concatenate([prev[1], lo]) if prev else lo)[::-1][: _topk(config)]
        state[key] = (hi, lo)
      else:
        mn, mx = float(s[0]), float(s[1])
        if key not in state:
          state[key] = (mn, mx)
        elif config.kind == "moving_average":
          m = config.momentum
          state[key] = (m * state[key][0] + (1 - m) * mn, m * state[key][1] + (1 - m) * mx)
        else:
          state[key] = (min(state[key][0], mn), max(state[key][1], mx))
  op_level = _op_level_ranges(model, params, iterate, state, config)
  if not state and not op_level:
    raise ValueError("no batches, or no matmul reads a param")

  ranges: dict[str, tuple[float, float]] = {}
  for key, s in state.items():
    if config.kind == "percentile":
      ranges[key] = (
        -_percentile_from_top(s[1], counts[key], config.percentile),
        _percentile_from_top(s[0], counts[key], config.percentile),
      )
    else:
      ranges[key] = s
  if config.kind == "mse":
    ranges = _mse_clip(model, params, iterate, ranges, config, scales)
  ranges.update(op_level)

  out = {}
  flat = {
    path_str(p): x.kernel if is_input_scaled(x) else x
    for p, x in jax.tree_util.tree_flatten_with_path(float_params, is_leaf=is_input_scaled)[0]
  }
  for key, (lo, hi) in sorted(ranges.items()):
    kernel = flat.get(key, flat.get(key + "/kernel", flat.get(key + "/embedding")))
    w_min = float(np.min(kernel)) if kernel is not None else float("nan")
    w_max = float(np.max(kernel)) if kernel is not None else float("nan")
    name = default_layer_name(key if key in op_level else key + "/kernel")
    out[key] = LayerCalibration(name, w_min, w_max, float(lo), float(hi))
  return out


def _op_level_ranges(model, params, iterate, covered, config) -> dict[str, tuple[float, float]]:
  """``{leaf path: (min, max)}`` of the inputs of matmuls that the module pass did not see."""
  first = next(iter(iterate()), None)
  if first is None:
    return {}
  fn = gptq.as_function(model)
  smoothed = {
    path_str(p)
    for p, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_input_scaled)[0]
    if is_input_scaled(x)
  }
  params = dequantize(params) if smoothed else params
  uses = transform.consumers(fn, params, *as_args(first))
  seen = {k + "/kernel" for k in covered} | {k + "/embedding" for k in covered}
  leaves = sorted(
    leaf for leaf, u in uses.items() if leaf not in seen and any(kind == "dot" for kind, _ in u)
  )
  if smoothed & set(leaves):
    warnings.warn(
      "calibrate: smoothed kernels found at the op are not calibrated (their op scales the "
      "input first; use dynamic W8A8 there): " + ", ".join(sorted(smoothed & set(leaves))),
      stacklevel=3,
    )
    leaves = [leaf for leaf in leaves if leaf not in smoothed]
  if not leaves:
    return {}
  if config.kind != "minmax":
    warnings.warn(
      f"calibrate: the {config.kind} observer runs on Dense/DenseGeneral/Embed modules only; "
      f"not calibrated (found at the op): {', '.join(leaves)}",
      stacklevel=3,
    )
    return {}

  def minmax(rows):
    return {"min": jnp.min(rows), "max": jnp.max(rows)}

  stats, skipped = gptq.op_level_stats(model, params, iterate, leaves, minmax)
  out: dict[str, tuple[float, float]] = {}
  for key, s in jax.device_get(stats).items():
    leaf = transform.parse_key(key)[0]
    lo, hi = float(s["min"]), float(s["max"])
    if leaf in out:
      lo, hi = min(lo, out[leaf][0]), max(hi, out[leaf][1])
    out[leaf] = (lo, hi)
  missing = sorted(set(leaves) - set(out))
  if missing:
    warnings.warn(
      "calibrate: no inputs captured for "
      + ", ".join(f"{m} ({skipped.get(m, 'never reached')})" for m in missing),
      stacklevel=3,
    )
  return out


def _input_scales(params: Any) -> dict[str, jax.Array]:
  """``{module path: input_scale}`` of the smoothed (InputScaled) kernels in ``params``."""
  out = {}
  for p, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_input_scaled)[0]:
    name = path_str(p)
    if is_input_scaled(x) and name.endswith("/kernel"):
      out[name.rsplit("/", 1)[0]] = x.input_scale
  return out


def _topk(config: ObserverConfig) -> int:
  return int(math.ceil((1 - config.percentile / 100) * config.max_samples)) + 2


def _extremes(x: jax.Array, config: ObserverConfig):
  flat = x.reshape(-1).astype(jnp.float32)
  k = min(_topk(config), flat.size)
  return jax.lax.top_k(flat, k)[0], jax.lax.top_k(-flat, k)[0], flat.size


def _percentile_from_top(top_desc: np.ndarray, n: int, q: float) -> float:
  """np.percentile(x, q) (linear) from the largest values of x, sorted descending."""
  pos = q / 100 * (n - 1)
  lo_rank, hi_rank = int(math.floor(pos)), int(math.ceil(pos))
  value = lambda rank: float(top_desc[n - 1 - rank])  # noqa: E731  (rank from the bottom)
  frac = pos - lo_rank
  return value(lo_rank) + (value(hi_rank) - value(lo_rank)) * frac


def _mse_clip(model, params, iterate, ranges, config, scales):
  keys = sorted(ranges)
  amax = np.array([max(abs(ranges[k][0]), abs(ranges[k][1]), 1e-12) for k in keys], np.float32)
  ratios = np.arange(1, config.grid + 1, dtype=np.float32) / config.grid
  clips = amax[:, None] * ratios[None, :]  # [layers, grid]

  def errors(v, clips, *a):
    acts = _capture(model, v, a, {}, scales)
    out = {}
    for i, k in enumerate(keys):
      x = acts[k].reshape(-1).astype(jnp.float32)

      def err_for(c, x=x):
        s = c / 127.0
        q = jnp.clip(jax.lax.round(x / s, jax.lax.RoundingMethod.AWAY_FROM_ZERO), -127, 127)
        return jnp.sum((x - q * s) ** 2)

      out[k] = jax.lax.map(err_for, clips[i])
    return out

  fn = jax.jit(errors)
  total = {k: np.zeros(config.grid, np.float64) for k in keys}
  for batch in iterate():
    for k, e in jax.device_get(fn(params, clips, *as_args(batch))).items():
      total[k] += np.asarray(e, np.float64)
  out = {}
  for i, k in enumerate(keys):
    c = float(clips[i, int(np.argmin(total[k]))])
    lo, hi = ranges[k]
    out[k] = (max(lo, -c), min(hi, c))
  return out
