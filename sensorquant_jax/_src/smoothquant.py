"""SmoothQuant: migrating activation outliers into the weights (Xiao et al., 2023)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from sensorquant_jax._src import blockwise, capture, gptq, schemes, transform
from sensorquant_jax._src.awq import input_scale_shape, scale_tensor
from sensorquant_jax._src.batching import as_args
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
  blockwise: bool = True,
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

  Every kernel a ``dot_general`` reads is found at the op (``Dense``,
  ``Einsum`` layers, ``@`` in custom code, scanned stacks: one scale per
  layer). Block by block (the default, see :func:`sensorquant_jax.gptq`) the
  float model runs once over the batches and ``"auto"`` scores each matrix's
  options on the activations kept at its cut; ``blockwise=False`` measures
  ``Dense`` / ``DenseGeneral`` modules in passes from the input (``"auto"``
  for those only) and other kernels in one more pass.

  Args:
    model: a Linen module, or any function ``f(params, *batch)``.
    params: its float variables.
    batches: model inputs (a sequence or a callable).
    alpha: migration strength, 0 (none) to 1 (all into the weights), or
      ``"auto"``: per layer, the value of :data:`AUTO_ALPHAS` (or no
      smoothing) whose simulated W8A8 output (static per-tensor activations
      at their calibrated max, weights in ``scheme``) is closest to the float
      layer on the batches (one more pass per layer group).
    scheme: the weight scheme ``"auto"`` simulates.
    min_size: smaller kernels are left alone.
    blockwise: run the model once, block by block; ``False``: passes.
    progress: print one line per layer to stderr.

  Returns:
    The float tree with :class:`InputScaled` kernels.
  """
  if alpha != "auto" and not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
    raise ValueError(f"alpha must be in [0, 1] or 'auto', got {alpha!r}")
  iterate = reader(batches, params)
  first = next(iter(iterate()), None)
  if first is None:
    raise ValueError("no batches")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  current = [x for _, x in leaves]
  where = {path_str(p): i for i, (p, _) in enumerate(leaves)}
  if blockwise:
    _blockwise(model, params, iterate, current, where, alpha, scheme, min_size, progress)
    return jax.tree_util.tree_unflatten(treedef, current)

  def eligible(layer):
    x = current[where[layer.kernel]] if layer.kernel in where else None
    return x is not None and is_float_array(x) and x.ndim >= 2 and int(x.size) >= min_size

  modules = capture.layers(model, params, first) if isinstance(model, nn.Module) else []
  found = [layer for layer in modules if eligible(layer)]
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
  covered = {layer.kernel for layer in modules}
  _op_level(model, params, iterate, first, current, where, covered, alpha, min_size, progress)
  return jax.tree_util.tree_unflatten(treedef, current)


def _blockwise(model, params, iterate, current, where, alpha, scheme, min_size, progress):
  """SmoothQuant block by block on the float model (one scale per matrix)."""
  leaves = {
    p
    for p, i in where.items()
    if is_float_array(current[i]) and current[i].ndim >= 2 and int(current[i].size) >= min_size
  }
  floats = {p: current[where[p]] for p in leaves}
  scales: dict[str, list[tuple[tuple, jax.Array]]] = {}
  k_of: dict[str, set] = {}
  default = schemes.Spec(scheme)
  errors = jax.jit(_errors)

  def finalize(group, rows_of, complete):
    for m, st in group:
      k_of.setdefault(m.leaf, set()).add(m.k_axes)
      w = jnp.asarray(floats[m.leaf])
      wm, _ = gptq.sub_matrix(w.astype(jnp.float32), m.k_axes, m.index)
      act_max = st["abs_max"]
      alphas = AUTO_ALPHAS if alpha == "auto" else (alpha,)
      w_max = jnp.max(jnp.abs(wm), axis=1)
      opts = [(a, None if a is None else smooth_scale(act_max, w_max, a)) for a in alphas]
      a, sc = opts[0]
      if alpha == "auto":
        spec = select_spec(m.leaf, wm, default, (), 0)
        assert spec is not None
        sim = _simulate(wm, spec, act_max, [s for _, s in opts])
        total = None
        for r in rows_of(m):
          e = errors(r, *sim)
          total = e if total is None else total + e
        a, sc = opts[int(jnp.argmin(total))]
      if progress:
        _report(m.leaf + "".join(f" {x}:{i}" for x, i in m.index), a, act_max, sc)
      if sc is not None:
        scales.setdefault(m.leaf, []).append((m.index, sc))
    for leaf in complete:
      got = scales.pop(leaf, None)
      if not got:
        continue
      if len(k_of[leaf]) != 1:
        warnings.warn(
          f"smoothquant: not smoothed: {leaf} (read by matmuls contracting different axes)",
          stacklevel=4,
        )
        continue
      w = jnp.asarray(floats[leaf])
      scale = scale_tensor(w.shape, next(iter(k_of[leaf])), got)
      kernel = (w.astype(jnp.float32) * scale).astype(w.dtype)
      current[where[leaf]] = InputScaled(kernel, 1.0 / scale)

  passes = blockwise.run(
    gptq.as_function(model),
    params,
    iterate(),
    leaves,
    _abs_max,
    finalize,
    label="smoothquant",
    progress=progress,
  )
  if passes:
    warnings.warn(
      "smoothquant: not smoothed (read where block-by-block measuring cannot reach; "
      "blockwise=False measures them in passes): "
      + "; ".join(f"{leaf} ({why})" for leaf, why in sorted(passes.items())),
      stacklevel=3,
    )


def _abs_max(rows: jax.Array) -> dict[str, jax.Array]:
  return {"abs_max": jnp.max(jnp.abs(rows), axis=0)}


def _report(name: str, a: float | None, act_max: jax.Array, s: jax.Array | None) -> None:
  flat = act_max if s is None else act_max / s

  def ratio(v):
    return float(jnp.max(v) / jnp.maximum(jnp.median(v), 1e-30))

  print(
    f"smoothquant {name}: alpha {a if a is not None else 'off'}, "
    f"input max/median {ratio(act_max):.3g} -> {ratio(flat):.3g}",
    file=sys.stderr,
  )


def _simulate(w2: jax.Array, spec: schemes.Spec, act_max: jax.Array, options: Sequence[Any]):
  """Per option ``s`` (``None``: unsmoothed), ``Q(W * s)``, ``1 / s`` and the static
  activation scale of ``x / s``, for a ``[K, N]`` matrix ``w2``: what :func:`_errors` scores."""
  ws, inv, act_scales = [], [], []
  for s in options:
    s = jnp.ones_like(act_max) if s is None else s
    q = schemes.quantize_leaf(w2 * s.reshape(-1, 1), spec).dequantize(jnp.float32)
    ws.append(q)
    inv.append(1.0 / s)
    act_scales.append(jnp.maximum(jnp.max(act_max / s), 1e-12) / 127.0)
  return w2, jnp.stack(ws), jnp.stack(inv), jnp.stack(act_scales)


def _errors(r, w, wq, inv, sa):
  """Squared output error of each simulated W8A8 option on rows ``r``."""

  def one(wq, inv, sa):
    xq = jnp.clip(lax.round(r * inv / sa, lax.RoundingMethod.AWAY_FROM_ZERO), -127, 127) * sa
    d = jnp.matmul(xq, wq, precision=_HIGHEST) - jnp.matmul(r, w, precision=_HIGHEST)
    return jnp.sum(d * d)

  return jax.vmap(one)(wq, inv, sa)


def _op_level(model, params, iterate, first, current, where, covered, alpha, min_size, progress):
  """SmoothQuant of the kernels found at the op (one scale per layer of a stack)."""
  uses = transform.consumers(gptq.as_function(model), params, *as_args(first))
  leaves = sorted(
    leaf
    for leaf, u in uses.items()
    if leaf not in covered
    and leaf in where
    and any(kind == "dot" for kind, _ in u)
    and is_float_array(current[where[leaf]])
    and current[where[leaf]].ndim >= 2
    and int(current[where[leaf]].size) >= min_size
  )
  if not leaves:
    return
  if alpha == "auto":
    warnings.warn(
      "smoothquant: alpha='auto' searches Dense/DenseGeneral modules only; give a number to "
      f"smooth the matmuls found at the op: {', '.join(leaves)}",
      stacklevel=3,
    )
    return

  def abs_max(rows):
    return {"abs_max": jnp.max(jnp.abs(rows), axis=0)}

  stats, skipped = gptq.op_level_stats(model, params, iterate, leaves, abs_max)
  by_leaf: dict[str, list] = {}
  for key, st in stats.items():
    leaf, k_axes, index = transform.parse_key(key)
    by_leaf.setdefault(leaf, []).append((k_axes, index, st["abs_max"]))
  for leaf in leaves:
    entries = by_leaf.get(leaf)
    if not entries or len({k for k, _, _ in entries}) != 1 or leaf in skipped:
      skipped.setdefault(leaf, "read by matmuls contracting different axes")
      continue
    w = jnp.asarray(current[where[leaf]])
    k_axes = entries[0][0]
    fixed = {a for _, index, _ in entries for a, _ in index}
    bshape = tuple(d if a in k_axes or a in fixed else 1 for a, d in enumerate(w.shape))
    inv = jnp.ones(bshape, jnp.float32)
    for _, index, act_max in entries:
      wm, _ = gptq.sub_matrix(w.astype(jnp.float32), k_axes, index)
      sc = smooth_scale(act_max, jnp.max(jnp.abs(wm), axis=1), float(alpha))
      at = dict(index)
      sel = tuple(at.get(a, slice(None)) for a in range(w.ndim))
      inv = inv.at[sel].set((1.0 / sc).reshape(inv[sel].shape))
      if progress:
        ratio = float(jnp.max(act_max) / jnp.maximum(jnp.median(act_max), 1e-30))
        flat = act_max * (1.0 / sc)
        after = float(jnp.max(flat) / jnp.maximum(jnp.median(flat), 1e-30))
        print(
          f"smoothquant {leaf} {index or ''}: alpha {alpha}, input max/median "
          f"{ratio:.3g} -> {after:.3g}",
          file=sys.stderr,
        )
    kernel = (w.astype(jnp.float32) / inv).astype(w.dtype)
    current[where[leaf]] = InputScaled(kernel, inv)
  if skipped:
    warnings.warn(
      "smoothquant: not smoothed: "
      + "; ".join(f"{leaf} ({why})" for leaf, why in sorted(skipped.items())),
      stacklevel=3,
    )


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
    return _errors(r, *sim)

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
