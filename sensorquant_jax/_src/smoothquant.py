"""SmoothQuant: migrating activation outliers into the weights (Xiao et al., 2023)."""

from __future__ import annotations

import sys
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from sensorquant_jax._src import capture, schemes
from sensorquant_jax._src.awq import input_scale_shape
from sensorquant_jax._src.gptq import Batches, reader
from sensorquant_jax._src.options import Scheme
from sensorquant_jax._src.quantize import MIN_SIZE, is_float_array, select_spec
from sensorquant_jax._src.scaled import InputScaled
from sensorquant_jax._src.tree_paths import path_str


def smooth_scale(act_max: jax.Array, w_max: jax.Array, alpha: float) -> jax.Array:
  """``s_j = max|x_j| ** alpha / max|w_j| ** (1 - alpha)``; 1 where a channel is all zero."""
  act_max = act_max.astype(jnp.float32)
  w_max = w_max.astype(jnp.float32)
  ok = (act_max > 0) & (w_max > 0)
  s = jnp.where(ok, act_max**alpha / jnp.where(ok, w_max, 1.0) ** (1 - alpha), 1.0)
  return jnp.maximum(s, 1e-5)


AUTO_ALPHAS = (None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""What ``alpha="auto"`` tries per layer (``None``: leave the layer unsmoothed)."""


def smoothquant(
  model: nn.Module,
  params: Any,
  batches: Batches,
  alpha: float | Literal["auto"] = 0.5,
  *,
  scheme: Scheme = schemes.PER_CHANNEL,
  min_size: int = MIN_SIZE,
  progress: bool = True,
) -> Any:
  """Float params with activation outliers moved into the Dense kernels.

  For every ``nn.Dense``/``nn.DenseGeneral`` kernel the model calls (with at
  least ``min_size`` values), measures ``max|x_j|`` per input channel over the
  batches and returns the kernel as :class:`~sensorquant_jax.InputScaled`
  ``(W * s, 1 / s)`` with ``s_j = max|x_j|**alpha / max|W_j|**(1 - alpha)``:
  the float function is unchanged, and the layer input ``x / s`` is flat
  enough for per-tensor int8 activations. Then calibrate and quantize as usual:

    >>> smooth = sq.smoothquant(model, variables, batches, alpha=0.5)
    >>> scales = sq.act_scales(sq.calibrate(model, smooth, batches))
    >>> q = sq.quantize(smooth, sq.PER_CHANNEL)
    >>> y = sq.apply(model, q, x, mode="w8a8", act_scales=scales)

  Args:
    model: a Linen module.
    params: its float variables.
    batches: model inputs (a sequence or a callable).
    alpha: migration strength, 0 (none) to 1 (all into the weights), or
      ``"auto"``: per layer, the value of :data:`AUTO_ALPHAS` (or no
      smoothing) whose simulated W8A8 output (static per-tensor activations
      at their calibrated max, weights in ``scheme``) is closest to the float
      layer on the batches (one more pass per layer group).
    scheme: the weight scheme ``"auto"`` simulates.
    min_size: smaller kernels are left alone.
    progress: print one line per layer to stderr.

  Returns:
    The float tree with :class:`InputScaled` kernels.
  """
  if alpha != "auto" and not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
    raise ValueError(f"alpha must be in [0, 1] or 'auto', got {alpha!r}")
  iterate = reader(batches)
  first = next(iter(iterate()), None)
  if first is None:
    raise ValueError("no batches")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  current = [x for _, x in leaves]
  where = {path_str(p): i for i, (p, _) in enumerate(leaves)}

  def eligible(layer):
    x = current[where[layer.kernel]] if layer.kernel in where else None
    return x is not None and is_float_array(x) and x.ndim >= 2 and int(x.size) >= min_size

  found = [layer for layer in capture.layers(model, params, first) if eligible(layer)]
  n_opts = len(AUTO_ALPHAS) if alpha == "auto" else 0

  def size(layer):  # the candidate kernels ``alpha="auto"`` simulates
    return n_opts * 4 * int(current[where[layer.kernel]].size)

  for n, group in enumerate(capture.passes(found, size)):
    stats = capture.input_stats(model, lambda: params, iterate(), group, xtx=False)
    kernels = {layer.path: jnp.asarray(current[where[layer.kernel]]) for layer in group}
    options: dict[str, list[Any]] = {}
    for layer in group:
      w = kernels[layer.path]
      w_max = jnp.max(jnp.abs(w.astype(jnp.float32).reshape(layer.k, -1)), axis=1)
      act_max = stats[layer.path].abs_max
      alphas = AUTO_ALPHAS if alpha == "auto" else (alpha,)
      options[layer.path] = [
        (a, None if a is None else smooth_scale(act_max, w_max, a)) for a in alphas
      ]
    if alpha == "auto":
      chosen = _search(model, params, iterate, group, stats, kernels, options, scheme)
    else:
      chosen = {p: opts[0] for p, opts in options.items()}
    for layer in group:
      a, s = chosen[layer.path]
      if progress:
        act_max = stats[layer.path].abs_max
        flat = act_max if s is None else act_max / s
        ratio = lambda v: float(jnp.max(v) / jnp.maximum(jnp.median(v), 1e-30))  # noqa: E731
        print(
          f"smoothquant pass {n + 1} {layer.kernel}: alpha {a if a is not None else 'off'}, "
          f"input max/median {ratio(act_max):.3g} -> {ratio(flat):.3g}",
          file=sys.stderr,
        )
      if s is None:
        continue
      w = kernels[layer.path]
      bshape = input_scale_shape(w.shape, len(layer.axis))
      kernel = (w.astype(jnp.float32) * s.reshape(bshape)).astype(w.dtype)
      current[where[layer.kernel]] = InputScaled(kernel, (1.0 / s).reshape(bshape))
  return jax.tree_util.tree_unflatten(treedef, current)


def _search(model, params, iterate, group, stats, kernels, options, scheme):
  """Per layer, the option whose simulated W8A8 output error over the batches is least."""
  sims = {}
  default = schemes.Spec(scheme)
  for layer in group:
    w = kernels[layer.path].astype(jnp.float32)
    spec = select_spec(layer.kernel, w, default, (), 0)
    assert spec is not None
    bshape = input_scale_shape(w.shape, len(layer.axis))
    act_max = stats[layer.path].abs_max
    ws, inv, act_scales = [], [], []
    for _, s in options[layer.path]:
      s = jnp.ones_like(act_max) if s is None else s
      q = schemes.quantize_leaf(w * s.reshape(bshape), spec).dequantize(jnp.float32)
      ws.append(q.reshape(layer.k, -1))
      inv.append(1.0 / s)
      act_scales.append(jnp.maximum(jnp.max(act_max / s), 1e-12) / 127.0)
    sims[layer.path] = (
      w.reshape(layer.k, -1),
      jnp.stack(ws),
      jnp.stack(inv),
      jnp.stack(act_scales),
    )

  def errors(layer, r, sim):
    w, wq, inv, sa = sim

    def one(wq, inv, sa):
      xq = jnp.clip(lax.round(r * inv / sa, lax.RoundingMethod.AWAY_FROM_ZERO), -127, 127) * sa
      d = jnp.matmul(xq, wq, precision=_HIGHEST) - jnp.matmul(r, w, precision=_HIGHEST)
      return jnp.sum(d * d)

    return jax.vmap(one)(wq, inv, sa)

  errs = capture.input_stats(
    model, lambda: params, iterate(), group, xtx=False, extra=errors, aux=sims
  )
  out = {}
  for layer in group:
    e = errs[layer.path].extra
    assert e is not None
    out[layer.path] = options[layer.path][int(jnp.argmin(e))]
  return out


_HIGHEST = lax.Precision.HIGHEST
