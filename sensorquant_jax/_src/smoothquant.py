"""SmoothQuant: migrating activation outliers into the weights (Xiao et al., 2023)."""

from __future__ import annotations

import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sensorquant_jax._src import capture
from sensorquant_jax._src.awq import input_scale_shape
from sensorquant_jax._src.gptq import Batches, reader
from sensorquant_jax._src.quantize import MIN_SIZE, is_float_array
from sensorquant_jax._src.scaled import InputScaled
from sensorquant_jax._src.tree_paths import path_str


def smooth_scale(act_max: jax.Array, w_max: jax.Array, alpha: float) -> jax.Array:
  """``s_j = max|x_j| ** alpha / max|w_j| ** (1 - alpha)``; 1 where a channel is all zero."""
  act_max = act_max.astype(jnp.float32)
  w_max = w_max.astype(jnp.float32)
  ok = (act_max > 0) & (w_max > 0)
  s = jnp.where(ok, act_max**alpha / jnp.where(ok, w_max, 1.0) ** (1 - alpha), 1.0)
  return jnp.maximum(s, 1e-5)


def smoothquant(
  model: nn.Module,
  params: Any,
  batches: Batches,
  alpha: float = 0.5,
  *,
  min_size: int = MIN_SIZE,
  progress: bool = True,
) -> Any:
  """Float params with activation outliers moved into the Dense kernels.

  For every ``nn.Dense``/``nn.DenseGeneral`` kernel the model calls (with at
  least ``min_size`` values), measures ``max|x_j|`` per input channel over the
  batches and returns the kernel as :class:`~sensorquant_jax.InputScaled`
  ``(W * s, 1 / s)`` with ``s_j = max|x_j|**alpha / max|W_j|**(1 - alpha)``:
  the float function is unchanged, and the layer input ``x / s`` is flat
  enough for per-tensor int8. Then calibrate and quantize as usual:

    >>> smooth = sq.smoothquant(model, variables, batches, alpha=0.5)
    >>> scales = sq.act_scales(sq.calibrate(model, smooth, batches))
    >>> q = sq.quantize(smooth, sq.PER_TENSOR)
    >>> y = sq.apply(model, q, x, mode="w8a8", act_scales=scales)

  Args:
    model: a Linen module.
    params: its float variables.
    batches: model inputs (a sequence or a callable).
    alpha: migration strength, 0 (none) to 1 (all into the weights).
    min_size: smaller kernels are left alone.
    progress: print one line per layer to stderr.

  Returns:
    The float tree with :class:`InputScaled` kernels.
  """
  if not 0 <= alpha <= 1:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
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
  for n, group in enumerate(capture.groups(found)):
    stats = capture.input_stats(model, lambda: params, iterate(), group, xtx=False)
    for layer in group:
      i = where[layer.kernel]
      w = jnp.asarray(current[i])
      n_in = len(layer.axis)
      w_max = jnp.max(jnp.abs(w.astype(jnp.float32).reshape(layer.k, -1)), axis=1)
      act_max = stats[layer.path].abs_max
      s = smooth_scale(act_max, w_max, alpha)
      bshape = input_scale_shape(w.shape, n_in)
      kernel = (w.astype(jnp.float32) * s.reshape(bshape)).astype(w.dtype)
      current[i] = InputScaled(kernel, (1.0 / s).reshape(bshape))
      if progress:
        before = float(jnp.max(act_max) / jnp.maximum(jnp.median(act_max), 1e-30))
        flat = act_max / s
        after = float(jnp.max(flat) / jnp.maximum(jnp.median(flat), 1e-30))
        print(
          f"smoothquant group {n + 1} {layer.kernel}: input max/median {before:.3g} -> {after:.3g}",
          file=sys.stderr,
        )
  return jax.tree_util.tree_unflatten(treedef, current)
