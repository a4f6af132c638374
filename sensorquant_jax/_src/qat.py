"""Quantization-aware training: weights trained through the rounding they will be served with.

:func:`qat` marks the leaves :func:`sensorquant_jax.quantize` would quantize (the
same ``scheme`` / ``rules`` / ``min_size`` / ``like`` selection) as
:class:`QATWeight` leaves: the float weight, and optionally a learned scale
(LSQ, Esser et al. 2020). :func:`fake_quant` turns such a tree into the float
params the model runs in training: each weight becomes
``quantize_leaf(w, spec, scale).dequantize()``, the very functions
:func:`sensorquant_jax.quantize` runs, with a straight-through gradient.
:func:`qat_export` returns the QArrays those functions give, so the exported
model dequantizes to the trained forward's weights bit for bit.

Gradients (the straight-through estimator with LSQ's scale gradient), with
``v = w / s``, ``c`` the clipped code and ``z`` the zero point:

* ``d w_hat / d w = 1`` where ``round(v) + z`` is inside the code range, ``0``
  where it was clipped;
* ``d w_hat / d s = (c - z) - v`` inside the range and ``c - z`` outside, each
  group's sum multiplied by LSQ's ``1 / sqrt(n * q_p)`` (``n`` values per scale,
  ``q_p`` = 127 for int8, 7 for int4).

Without a learned scale the scale follows the weight's range each step (as
:func:`sensorquant_jax.quantize` computes it) and is held constant in the
gradient.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sensorquant_jax._src import schemes
from sensorquant_jax._src.batching import as_args
from sensorquant_jax._src.options import Scheme
from sensorquant_jax._src.qarray import QArray, grid, is_qarray, split_blocks
from sensorquant_jax._src.quantize import (
  MIN_SIZE,
  NonFiniteError,
  RulesLike,
  as_rules,
  message,
  quantize_leaf_counted,
  select_spec,
  uses_of,
)
from sensorquant_jax._src.tree_paths import path_str


@struct.dataclass
class QATWeight:
  """A weight trained through quantization (a pytree; ``spec`` is static).

  Attributes:
    weight: the float weight (trainable).
    scale: the learned scale in the QArray's layout (trainable), or ``None``:
      the scale follows the weight's range each step.
    spec: the resolved quantization of this leaf (scheme, axes, group size).
  """

  weight: jax.Array
  scale: jax.Array | None = None
  spec: schemes.Spec = struct.field(pytree_node=False, default=schemes.Spec())

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.weight.shape)

  @property
  def dtype(self) -> Any:
    return self.weight.dtype


def is_qat_weight(x: Any) -> bool:
  """Whether ``x`` is a :class:`QATWeight`."""
  return isinstance(x, QATWeight)


def qat(
  params: Any,
  scheme: Scheme = schemes.PER_TENSOR,
  rules: RulesLike = None,
  *,
  min_size: int = MIN_SIZE,
  like: tuple | None = None,
  learn_scales: bool = False,
  division_fix: bool | None = None,
) -> Any:
  """Marks the leaves :func:`sensorquant_jax.quantize` would quantize for training.

  Pure: returns the tree with :class:`QATWeight` leaves where ``quantize(params,
  scheme, rules, min_size=..., like=...)`` would put QArrays, other leaves
  unchanged (QArrays too: they are not trained). Train it with any optimizer
  (e.g. ``optax``) on a loss of ``model.apply(fake_quant(tree), ...)``, then
  :func:`qat_export`.

  Args:
    params: a float param tree (Linen variables, ``nnx.to_pure_dict`` of an NNX
      model's params, a plain dict).
    scheme, rules, min_size, like, division_fix: as for
      :func:`sensorquant_jax.quantize`.
    learn_scales: train each scale too (LSQ), starting from the scale
      :func:`sensorquant_jax.quantize` computes.

  Returns:
    The tree to train.

  Example:
    >>> tree = sq.qat(params, "asymmetric_per_group_int4", learn_scales=True)
    >>> loss = lambda t, x: jnp.mean((model.apply(sq.fake_quant(t), x) - y) ** 2)
    >>> qparams = sq.qat_export(train(tree, loss))
  """
  default = schemes.Spec(scheme, division_fix=division_fix)
  rule_list = as_rules(rules)
  uses = uses_of(params, like)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_kept)
  out = []
  for path, x in leaves:
    spec = (
      None if _is_kept(x) else select_spec(path_str(path), x, default, rule_list, min_size, uses)
    )
    if spec is None:
      out.append(x)
      continue
    scale = None
    if learn_scales:
      qa, _, _ = quantize_leaf_counted(x, spec)
      scale = qa.scale
    out.append(QATWeight(x, scale, spec))
  return jax.tree_util.tree_unflatten(treedef, out)


def _is_kept(x: Any) -> bool:
  return is_qarray(x) or is_qat_weight(x)


def fake_quant(tree: Any) -> Any:
  """The float params a model runs in training: each :class:`QATWeight` fake-quantized.

  Differentiable (straight-through, see the module doc) and jittable; other
  leaves are returned as they are.

  Args:
    tree: a tree from :func:`qat`.

  Returns:
    The tree with each :class:`QATWeight` replaced by its quantized-then-
    dequantized weight (the weight's dtype), equal bit for bit to
    ``qat_export(tree)``'s QArray dequantized.
  """
  return jax.tree_util.tree_map(
    lambda x: _fake(x.weight, x.scale, x.spec) if is_qat_weight(x) else x,
    tree,
    is_leaf=_is_kept,
  )


def qat_export(tree: Any, *, check_finite: bool = True) -> Any:
  """The quantized tree: each :class:`QATWeight` as the QArray its forward used.

  Args:
    tree: a tree from :func:`qat`, trained or not.
    check_finite: raise :class:`NonFiniteError` for NaN or Inf weights (a
      diverged training run), naming every bad leaf.

  Returns:
    The tree with :class:`QArray` leaves, usable wherever
    :func:`sensorquant_jax.quantize`'s output is (``sq.apply``, checkpoints,
    kernels).

  Raises:
    NonFiniteError: a weight (or learned scale) holds NaN or Inf values.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_kept)
  out, pending = [], []
  for path, x in leaves:
    if not is_qat_weight(x):
      out.append(x)
      continue
    qa, n_nan, n_inf = quantize_leaf_counted(x.weight, x.spec, x.scale)
    if check_finite:
      if x.scale is not None:
        n_nan = n_nan + jnp.sum(jnp.isnan(x.scale))
        n_inf = n_inf + jnp.sum(jnp.isinf(x.scale))
      pending.append((path_str(path), int(np.prod(x.shape)), n_nan, n_inf))
    out.append(qa)
  counts = jax.device_get([(a, b) for _, _, a, b in pending])  # one fetch for every leaf
  bad = [
    message(p, int(a), int(b), size)
    for (p, size, _, _), (a, b) in zip(pending, counts, strict=True)
    if int(a) or int(b)
  ]
  if bad:
    raise NonFiniteError("non-finite weights: " + "; ".join(bad))
  return jax.tree_util.tree_unflatten(treedef, out)


Loss = Literal["mse", "cosine", "kl"]


def distill(
  model: Any,
  params: Any,
  batches: Sequence[Any],
  scheme: Scheme = schemes.PER_TENSOR,
  rules: RulesLike = None,
  *,
  steps: int = 300,
  learning_rate: float = 1e-4,
  loss: Loss = "mse",
  learn_scales: bool = True,
  min_size: int = MIN_SIZE,
  like: tuple | None = None,
  output: Callable[..., jax.Array] | None = None,
  start: Any = None,
  optimizer: Any = None,
  seed: int = 0,
  progress: bool = True,
) -> Any:
  """Trains a quantized student to reproduce the float model's outputs (no labels).

  The float model (``params``) is the teacher; the student is ``qat(params,
  scheme, rules, ...)`` run through :func:`fake_quant`. Each step takes one of
  ``batches`` (drawn with ``seed``) and updates every float leaf of the student
  (weights, learned scales, biases and norms) with ``optimizer`` (by default Adam,
  its step decaying from ``learning_rate`` to 0 on a cosine over ``steps``) on the
  distance between the two outputs. Deterministic for a given ``seed``.

  Args:
    model: a Linen module or ``f(params, *batch)``.
    params: the float params.
    batches: model inputs (a tuple or list is the arguments, else the one argument).
    scheme, rules, min_size, like, learn_scales: as for :func:`qat`.
    steps: optimizer steps.
    learning_rate: Adam's first step size (ignored with ``optimizer``).
    loss: ``"mse"`` (mean squared distance), ``"cosine"`` (one minus the cosine
      along the last axis, averaged) or ``"kl"`` (KL divergence of the student's
      softmax over the last axis from the teacher's: logits).
    output: ``output(model_output, *batch)`` to compare instead of the raw output
      (e.g. a pooled embedding).
    start: float params the student starts from instead of ``params`` (same tree),
      e.g. ``sq.dequantize(sq.gptq(...))`` to start from GPTQ's rounding: its
      weights lie on their own grid, so the first forward is GPTQ's model.
    optimizer: an ``optax.GradientTransformation``.
    seed: the batch order.
    progress: one line every tenth of the steps on stderr (the loss and the time left).

  Returns:
    The trained tree (export it with :func:`qat_export`).

  Example:
    >>> tree = sq.distill(model, params, batches, "asymmetric_per_group_int4",
    ...                   rules=[("embedding", None)], loss="cosine")
    >>> qparams = sq.qat_export(tree)
  """
  import optax

  if steps < 1:
    raise ValueError(f"steps must be at least 1, got {steps}")
  if loss not in ("mse", "cosine", "kl"):
    raise ValueError(f"loss must be 'mse', 'cosine' or 'kl', got {loss!r}")
  if not batches:
    raise ValueError("distill needs at least one batch")
  fn = _as_function(model)
  see = output or (lambda y, *_: y)
  tree = qat(
    params if start is None else start,
    scheme,
    rules,
    min_size=min_size,
    like=like,
    learn_scales=learn_scales,
  )
  opt = optimizer or optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  # Integer leaves (if any) ride along untrained.
  trained = [i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.inexact)]
  fixed = {i: x for i, x in enumerate(leaves) if i not in set(trained)}

  def rebuild(ws):
    it = iter(ws)
    return jax.tree_util.tree_unflatten(
      treedef, [fixed[i] if i in fixed else next(it) for i in range(len(leaves))]
    )

  ws = [leaves[i] for i in trained]
  state = opt.init(ws)
  teacher = jax.jit(lambda p, *a: see(fn(p, *a), *a))
  targets = [teacher(params, *as_args(b)) for b in batches]

  def objective(ws, target, *a):
    y = see(fn(fake_quant(rebuild(ws)), *a), *a)
    return _distance(loss, y.astype(jnp.float32), target.astype(jnp.float32))

  @jax.jit
  def step(ws, state, target, *a):
    value, g = jax.value_and_grad(objective)(ws, target, *a)
    updates, state = opt.update(g, state, ws)
    return optax.apply_updates(ws, updates), state, value

  order = np.random.default_rng(seed).integers(0, len(batches), steps)
  start, every = time.perf_counter(), max(1, steps // 10)
  for i, b in enumerate(order):
    ws, state, value = step(ws, state, targets[b], *as_args(batches[b]))
    if progress and ((i + 1) % every == 0 or i + 1 == steps):
      spent = time.perf_counter() - start
      print(
        f"distill: step {i + 1}/{steps} loss {float(value):.4g} "
        f"{spent:.0f} s, about {spent / (i + 1) * (steps - i - 1):.0f} s left",
        file=sys.stderr,
      )
  return rebuild(ws)


def _as_function(model: Any) -> Callable[..., Any]:
  from sensorquant_jax._src.gptq import as_function

  return as_function(model)


def _distance(loss: str, y: jax.Array, t: jax.Array) -> jax.Array:
  if loss == "mse":
    return jnp.mean((y - t) ** 2)
  if loss == "cosine":
    num = jnp.sum(y * t, axis=-1)
    den = jnp.linalg.norm(y, axis=-1) * jnp.linalg.norm(t, axis=-1)
    return jnp.mean(1 - num / jnp.maximum(den, 1e-12))
  return jnp.mean(
    jnp.sum(jax.nn.softmax(t) * (jax.nn.log_softmax(t) - jax.nn.log_softmax(y)), axis=-1)
  )


def _lsq_factor(qa: QArray) -> float:
  """LSQ's gradient scale ``1 / sqrt(n * q_p)``: ``n`` values per scale."""
  lo, hi = schemes.code_range(qa.scheme)
  per_scale = int(np.prod(qa.shape)) // max(1, int(np.prod(qa.scale.shape)))
  if qa.block_size is not None:
    per_scale = qa.block_size
  return float(1.0 / np.sqrt(per_scale * ((hi - lo) // 2)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fake(w: jax.Array, scale: jax.Array | None, spec: schemes.Spec) -> jax.Array:
  return schemes.quantize_leaf(w, spec, scale).dequantize()


def _fake_fwd(w, scale, spec):
  qa = schemes.quantize_leaf(w, spec, scale)
  return qa.dequantize(), (w, scale, qa)


def _fake_bwd(spec, res, g):
  w, scale, qa = res
  s, z = grid(qa)
  v = w.astype(jnp.float32) / s
  lo, hi = schemes.code_range(qa.scheme)
  r = jax.lax.round(v, jax.lax.RoundingMethod.AWAY_FROM_ZERO) + z
  inside = (r >= lo) & (r <= hi)
  g32 = g.astype(jnp.float32)
  gw = jnp.where(inside, g32, 0).astype(w.dtype)
  if scale is None:
    return gw, None
  d = (qa.codes().astype(jnp.float32) - z) - jnp.where(inside, v, 0)
  per = g32 * d
  if qa.block_size is not None:
    axis = qa.axes[0] % per.ndim
    gs = jnp.sum(split_blocks(per, axis, qa.block_size), axis=axis + 1)
  else:
    gs = jnp.sum(per, axis=qa.axes, keepdims=True)
  return gw, (gs * _lsq_factor(qa)).astype(scale.dtype).reshape(scale.shape)


_fake.defvjp(_fake_fwd, _fake_bwd)
