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

W8A8 (``qat(..., mode="w8a8")``): :func:`fake_quantized` also rounds the
activation operand of every matmul that reads such a weight, as the W8A8 op
(``quantize_activations``) does: ``x_hat = clip(round(x / s), -127, 127) * s``
with a static scale ``s`` (trained, LSQ's gradient with ``q_p = 127``, from the
calibrated one) or per-token ``max|x| / 127`` where none is given (never
clipped; the scale is held constant in the gradient).
"""

from __future__ import annotations

import functools
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sensorquant_jax._src import options, schemes, transform
from sensorquant_jax._src.batching import as_args
from sensorquant_jax._src.options import FP8_SCHEMES, Mode, Scheme
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
    act_scale: W8A8's static activation scale (a float32 scalar; trained when
      ``learn_act_scale``), or ``None``: per-token scales when ``w8a8``.
    w8a8: the matmuls reading this weight round their activations to int8 (in
      :func:`fake_quantized`), as ``mode="w8a8"`` serves them.
    learn_act_scale: ``act_scale`` gets LSQ's gradient (else none: it stays).
  """

  weight: jax.Array
  scale: jax.Array | None = None
  spec: schemes.Spec = struct.field(pytree_node=False, default=schemes.Spec())
  act_scale: jax.Array | None = None
  w8a8: bool = struct.field(pytree_node=False, default=False)
  learn_act_scale: bool = struct.field(pytree_node=False, default=False)

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
  mode: Mode = "weight_only",
  act_scales: Mapping[str, Any] | None = None,
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
      :func:`sensorquant_jax.quantize` computes, and W8A8's static activation
      scales from ``act_scales``.
    mode: ``"w8a8"`` to train with int8 activations too (run the model through
      :func:`fake_quantized`); ``"weight_only"`` by default.
    act_scales: W8A8's static activation scales, keyed as for
      :func:`sensorquant_jax.quantized` (leaf path, or the Linen module path),
      e.g. ``sq.act_scales(sq.calibrate(...))``: each becomes the weight's
      ``act_scale``. Leaves without one use per-token scales.

  Returns:
    The tree to train.

  Raises:
    ValueError: an unknown ``mode``, ``act_scales`` without ``"w8a8"``, a
      static scale that is not a positive finite number, or ``"w8a8"`` on an fp8
      scheme.

  Example:
    >>> tree = sq.qat(params, "asymmetric_per_group_int4", learn_scales=True)
    >>> loss = lambda t, x: jnp.mean((model.apply(sq.fake_quant(t), x) - y) ** 2)
    >>> qparams = sq.qat_export(train(tree, loss))
  """
  options.check("mode", mode, options.MODES)
  if act_scales and mode != "w8a8":
    raise ValueError('act_scales are for mode="w8a8"')
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
    name = path_str(path)
    if mode == "w8a8" and spec.scheme in FP8_SCHEMES:
      raise ValueError(
        f'{name}: mode="w8a8" trains int8 activations; fp8 ({spec.scheme}) serves fp8 '
        'activations, which training does not round yet: use mode="weight_only"'
      )
    act = _act_scale_for(name, act_scales or {}) if mode == "w8a8" else None
    out.append(QATWeight(x, scale, spec, act, w8a8=mode == "w8a8", learn_act_scale=learn_scales))
  return jax.tree_util.tree_unflatten(treedef, out)


def _act_scale_for(leaf: str, act_scales: Mapping[str, Any]) -> jax.Array | None:
  """The static scale of ``leaf``: keyed by the leaf or its module (as the W8A8 op looks it up)."""
  module = leaf.rsplit("/", 1)[0]
  s = act_scales.get(leaf, act_scales.get(module))
  if s is None:
    return None
  v = np.asarray(jax.device_get(s), np.float32)
  if v.size != 1 or not np.isfinite(v).all() or float(v.reshape(())) <= 0:
    raise ValueError(f"{leaf}: the static activation scale must be positive, got {v!r}")
  return jnp.asarray(v.reshape(()))


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


def fake_quantized(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` trained through quantization: runs it on a :func:`qat` tree.

  The weights are :func:`fake_quant`'s. For weights marked W8A8 (``qat(...,
  mode="w8a8")``), the activation operand of every matmul (``dot_general``)
  reading them is rounded as the W8A8 op rounds it (see the module doc), found
  at the op as :func:`sensorquant_jax.quantized` finds its matmuls (through
  reshapes, scans, ``jit`` and ``remat``). Without W8A8 weights this is
  ``fn(fake_quant(tree), ...)``.

  Args:
    fn: any function of a param tree, e.g. ``model.apply``.

  Returns:
    ``g(tree, *args, **kwargs)``, differentiable in ``tree`` (and jittable).

  Example:
    >>> tree = sq.qat(params, "symmetric_per_channel_int8", mode="w8a8",
    ...               act_scales=sq.act_scales(sq.calibrate(model, params, batches)))
    >>> loss = lambda t, x, y: jnp.mean((sq.fake_quantized(model.apply)(t, x) - y) ** 2)
  """

  def wrapped(tree: Any, *args: Any, **kwargs: Any) -> Any:
    params = fake_quant(tree)
    acts = {
      path_str(p): x
      for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_kept)[0]
      if is_qat_weight(x) and x.w8a8
    }
    if not acts:
      return fn(params, *args, **kwargs)
    served = _served_quantized(fn, tree, args, kwargs, set(acts))

    def mark(view, x, cw, cx, bw, bx):
      w = acts.get(view.leaf)
      if w is None or view.leaf not in served or not jnp.issubdtype(x.dtype, jnp.floating):
        return x
      if w.act_scale is None:
        return _fake_act_dynamic(x, tuple(cx))
      s = w.act_scale if w.learn_act_scale else jax.lax.stop_gradient(w.act_scale)
      return _fake_act(x, s)

    return transform.run_marked(fn, params, args, kwargs, set(acts), mark)

  return wrapped


def _served_quantized(
  fn: Callable[..., Any], tree: Any, args: Sequence[Any], kwargs: Mapping[str, Any], leaves: set
) -> set[str]:
  """The W8A8 leaves whose matmuls the W8A8 op serves quantized (traced, nothing runs).

  The op computes a matmul in float where it cannot run it on the quantized
  layout (e.g. scales that vary along the contracted axes): there the
  activations stay float, so training leaves them float too.
  """
  abstract = jax.eval_shape(lambda t: qat_export(t, check_finite=False), tree)
  shapes = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if isinstance(a, jax.Array) else a,
    (tuple(args), dict(kwargs)),
  )
  uses = transform.explain(
    fn, abstract, *shapes[0], mode="w8a8", act_scales=dict.fromkeys(leaves, 1.0), **shapes[1]
  )
  quantized = {u.leaf for u in uses if u.kind == "dot"}
  in_float = {u.leaf for u in uses if u.kind != "dot" and u.detail.startswith("dot ")}
  mixed = sorted(quantized & in_float)
  if mixed:
    warnings.warn(
      "W8A8 training rounds the activations of every matmul reading "
      + ", ".join(mixed)
      + ", but the W8A8 op computes some of them in float (see sq.explain)",
      stacklevel=3,
    )
  return quantized


def qat_act_scales(tree: Any) -> dict[str, jax.Array]:
  """W8A8's static activation scales of a :func:`qat` tree, for the W8A8 op.

  Returns:
    ``{leaf path: float32 scalar}`` for every W8A8 weight with a static scale:
    ``sq.quantized(fn, mode="w8a8", act_scales=qat_act_scales(tree))`` runs
    :func:`qat_export`'s tree as :func:`fake_quantized` trained it.

  Raises:
    ValueError: a trained scale is not a positive finite number (names the leaf).
  """
  out = {}
  for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_kept)[0]:
    if is_qat_weight(x) and x.w8a8 and x.act_scale is not None:
      out[path_str(p)] = x.act_scale
  got = jax.device_get(out)
  bad = [k for k, v in got.items() if not (np.isfinite(v) and v > 0)]
  if bad:
    raise ValueError("activation scales not positive and finite: " + ", ".join(sorted(bad)))
  return out


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
  mode: Mode = "weight_only",
  act_scales: Mapping[str, Any] | None = None,
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
    scheme, rules, min_size, like, learn_scales, mode, act_scales: as for
      :func:`qat` (the student runs through :func:`fake_quantized`).
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
    mode=mode,
    act_scales=act_scales,
  )
  student = fake_quantized(fn)
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
    y = see(student(rebuild(ws), *a), *a)
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
  if qa.scheme in FP8_SCHEMES:  # saturates past 448
    inside = jnp.abs(v) <= hi
  else:
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


_A_MAX = 127.0  # int8 activations: symmetric codes -127..127, as ops.quantize_activations


def _act_codes(x: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(x / s, its int8 codes)`` in float32, rounded as ``ops.quantize_activations``."""
  v = schemes.exact_div(x.astype(jnp.float32), s)
  return v, jnp.clip(jax.lax.round(v, jax.lax.RoundingMethod.AWAY_FROM_ZERO), -_A_MAX, _A_MAX)


@jax.custom_vjp
def _fake_act(x: jax.Array, s: jax.Array) -> jax.Array:
  s = s.astype(jnp.float32)
  return (_act_codes(x, s)[1] * s).astype(x.dtype)


def _fake_act_fwd(x, s):
  return _fake_act(x, s), (x, s)


def _fake_act_bwd(res, g):
  x, s = res
  s32 = s.astype(jnp.float32)
  v, c = _act_codes(x, s32)
  inside = jnp.abs(jax.lax.round(v, jax.lax.RoundingMethod.AWAY_FROM_ZERO)) <= _A_MAX
  g32 = g.astype(jnp.float32)
  gx = jnp.where(inside, g32, 0).astype(x.dtype)
  gs = jnp.sum(g32 * (c - jnp.where(inside, v, 0))) / np.sqrt(max(1, x.size) * _A_MAX)
  return gx, gs.astype(s.dtype).reshape(s.shape)


_fake_act.defvjp(_fake_act_fwd, _fake_act_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fake_act_dynamic(x: jax.Array, k_axes: tuple[int, ...]) -> jax.Array:
  xf = x.astype(jnp.float32)
  s = jnp.maximum(jnp.max(jnp.abs(xf), axis=k_axes, keepdims=True) / _A_MAX, 1e-12)
  return (_act_codes(xf, s)[1] * s).astype(x.dtype)


def _fake_act_dynamic_fwd(x, k_axes):
  return _fake_act_dynamic(x, k_axes), None


def _fake_act_dynamic_bwd(k_axes, res, g):
  return (g,)  # per-token scales never clip: straight through


_fake_act_dynamic.defvjp(_fake_act_dynamic_fwd, _fake_act_dynamic_bwd)
