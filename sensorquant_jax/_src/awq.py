"""AWQ: activation-aware per-input-channel weight scaling (Lin et al., 2023)."""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from sensorquant_jax._src import blockwise, capture, schemes
from sensorquant_jax._src import gptq as gptq_mod
from sensorquant_jax._src.gptq import Batches, begin, matrix, output_error, relative_error
from sensorquant_jax._src.options import ASYMMETRIC_SCHEMES, BLOCK_SCHEMES, FP8_SCHEMES, Scheme
from sensorquant_jax._src.qarray import QArray, is_qarray, split_blocks
from sensorquant_jax._src.quantize import MIN_SIZE, RulesLike, as_rules, select_spec


def input_scale_shape(shape: tuple[int, ...], k_axes: int) -> tuple[int, ...]:
  """Shape of an input scale for a kernel ``[*in, *out]`` with ``k_axes`` input axes."""
  return tuple(shape[:k_axes]) + (1,) * (len(shape) - k_axes)


@functools.partial(jax.jit, static_argnames=("spec", "n_in", "grid"))
def search(
  w: jax.Array, h: jax.Array, act: jax.Array, *, spec: schemes.Spec, n_in: int, grid: int
) -> tuple[jax.Array, jax.Array]:
  """The AWQ scale of ``w`` (logical kernel) minimising the layer's output error.

  Tries two families of scales, each normalised to a geometric mean range of
  1, for ``r`` in ``0, 1/grid, ..., (grid - 1)/grid``: the paper's ``s = act **
  r`` (``r = 0`` is round-to-nearest), then AutoAWQ's "duo" scales ``act ** r /
  w_mean ** (1 - r)``, ``w_mean`` the mean over output channels of ``|w|``
  relative to its group's (or column's) largest. Each is measured by
  quantizing ``w * s``: ``tr(D^T H D)`` for ``D = w - Q(w * s) / s``.

  Returns:
    ``(s, errors)``: the best per-input-channel scale ``[K]`` and the error
    of every scale tried (``errors[0]``: round-to-nearest).
  """
  shape = w.shape
  k = act.shape[0]
  wf = w.astype(jnp.float32)
  w2 = wf.reshape(k, -1)
  bshape = input_scale_shape(shape, n_in)
  act = jnp.maximum(act.astype(jnp.float32), 1e-8)
  along_k = n_in == 1 and spec.scheme in BLOCK_SCHEMES and spec.axes == (0,)
  w_mean = _relative_magnitude(w2, spec.block_size if along_k else None)

  def scale_for(r, duo):
    s = act**r / jnp.where(duo, w_mean ** (1 - r) + 1e-4, 1.0)
    s = jnp.maximum(s, 1e-4)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))

  def err(rd):
    s = scale_for(*rd)
    q = schemes.quantize_leaf(wf * s.reshape(bshape), spec).dequantize(jnp.float32)
    d = w2 - (q / s.reshape(bshape)).reshape(k, -1)
    return jnp.sum(jnp.matmul(h, d, precision=lax.Precision.HIGHEST) * d)

  ratios = jnp.tile(jnp.arange(grid, dtype=jnp.float32) / grid, 2)
  duo = jnp.arange(2 * grid) >= grid
  errors = lax.map(err, (ratios, duo))
  best = jnp.argmin(errors)
  return scale_for(ratios[best], duo[best]), errors


def _relative_magnitude(w2: jax.Array, block: int | None) -> jax.Array:
  """``[K]``: the mean over columns of ``|w|`` divided by its group's largest along K (its
  column's without groups), as AutoAWQ weighs weights in its duo scales."""
  a = jnp.abs(w2)
  k = a.shape[0]
  if block is None or block >= k:
    top = jnp.max(a, axis=0, keepdims=True)
  else:
    pad = -k % block
    g = jnp.pad(a, ((0, pad), (0, 0))).reshape(-1, block, a.shape[1])
    top = jnp.repeat(jnp.max(g, axis=1), block, axis=0)[:k]
  return jnp.mean(a / (top + 1e-6), axis=1)


CLIP_GRID, CLIP_MAX_SHRINK = 20, 0.5
"""The clipping search's ratios: ``1, 0.95, ..., 0.55`` of each group's largest weight (the
paper's ``n_grid = 20``, ``max_shrink = 0.5``)."""


@functools.partial(jax.jit, static_argnames=("spec",))
def clip_search(ws: jax.Array, h: jax.Array, *, spec: schemes.Spec) -> jax.Array:
  """AWQ's weight clipping for one ``[K, N]`` matrix (its AWQ scale already applied).

  For each group of ``spec`` (a block along ``K``; the whole column for
  per-channel schemes) and each output column, tries the bounds ``r max|w|`` for
  ``r`` in ``1, 1 - 1/20, ..., 1 - 0.45``: clamps the group to ``[-bound, bound]``,
  quantizes the matrix and keeps, per group and column, the ``r`` with the least
  error of that group's share of the output, ``d^T H_gg d`` with ``d = w - Q(clamp
  w)`` and ``H_gg`` the group's block of the inputs' ``X^T X`` (the paper's
  objective over the same tokens). ``r = 1`` is no clipping, so no group's error grows.

  Asymmetric schemes place their grid on ``[min, max]`` rather than ``[-max|w|,
  max|w|]``, so for them the two ends shrink independently: ``[r_lo min, r_hi max]``
  over every pair of the same ratios (the group's error only depends on its own
  bounds, so each group's least-error pair is the best of all 100 combinations).

  Args:
    ws: the ``[K, N]`` matrix.
    h: ``X^T X`` of its (scaled) inputs, ``[K, K]``.
    spec: the matrix's spec: per-block / per-group along axis 0, or per-channel on axis 1.

  Returns:
    The bounds ``[2, K, N]``: lower and upper (each group's, repeated over it);
    apply them with :func:`clipped`.
  """
  k, n = ws.shape
  b = spec.block_size if spec.scheme in schemes.BLOCK_SCHEMES else k
  assert b is not None
  g = -(-k // b)
  wf = ws.astype(jnp.float32)
  hp = jnp.pad(h.astype(jnp.float32), ((0, g * b - k), (0, g * b - k))).reshape(g, b, g, b)
  at = jnp.arange(g)
  hd = hp[at, :, at, :]  # [G, B, B]: each group's diagonal block
  blocks = split_blocks(wf, 0, b)
  if spec.scheme in ASYMMETRIC_SCHEMES:
    # The scheme's range always holds 0, so the ends are min(., 0) and max(., 0).
    ends = jnp.stack([jnp.min(blocks, axis=1).clip(max=0), jnp.max(blocks, axis=1).clip(min=0)])
  else:
    amax = jnp.max(jnp.abs(blocks), axis=1)  # [G, N]
    ends = jnp.stack([-amax, amax])

  def full(per_group):  # [2, G, N] -> [2, K, N]
    return jnp.repeat(per_group, b, axis=1)[:, :k]

  def err(r):  # r: [2] ratios of the lower and upper end
    q = schemes.quantize_leaf(clipped(wf, full(r[:, None, None] * ends)), spec)
    d = split_blocks(wf - q.dequantize(jnp.float32), 0, b)
    return jnp.einsum("gbn,gbc,gcn->gn", d, hd, d, precision=lax.Precision.HIGHEST)

  steps = int(CLIP_MAX_SHRINK * CLIP_GRID)
  ratios = 1.0 - jnp.arange(steps, dtype=jnp.float32) / CLIP_GRID
  if spec.scheme in ASYMMETRIC_SCHEMES:
    pairs = jnp.stack(jnp.meshgrid(ratios, ratios, indexing="ij"), -1).reshape(-1, 2)
  else:
    pairs = jnp.stack([ratios, ratios], -1)
  errors = lax.map(err, pairs)  # [R, G, N]; pair 0 is (1, 1): no clipping
  best = pairs[jnp.argmin(errors, axis=0)]  # [G, N, 2]
  return full(jnp.moveaxis(best, -1, 0) * ends)


def clipped(w: jax.Array, bounds: jax.Array) -> jax.Array:
  """``w`` clamped to the ``[2, ...]`` lower and upper ``bounds`` of :func:`clip_search`."""
  return jnp.clip(w, bounds[0], bounds[1])


Rounding = Literal["nearest", "gptq"]


def _gptq_rounded(
  ws: jax.Array, qa: QArray, entries: Sequence[tuple[tuple[int, ...], tuple, jax.Array]]
) -> QArray:
  """``qa`` (the scaled, clipped leaf ``ws`` rounded to nearest) with GPTQ's codes on the
  same grid, each matrix against its scaled inputs' ``X^T X``."""
  return gptq_mod.gptq_entries(ws, qa, entries)[0]


def _note_whole(leaves: set[str], clip: bool, rounding: Rounding) -> None:
  """The one-line warning for kernels searched whole over several contracted axes (or
  not 2-D in passes), which get AWQ's scales but neither clipping nor GPTQ rounding."""
  what = [w for w, on in (("clipping", clip), ("GPTQ rounding", rounding == "gptq")) if on]
  if leaves and what:
    warnings.warn(
      f"awq: no {' or '.join(what)} for {', '.join(sorted(leaves))} (searched whole over "
      "several contracted axes: scales only)",
      stacklevel=4,
    )


def clip_spec(sub: schemes.Spec, n_in: int) -> schemes.Spec | None:
  """The spec the clipping search runs with for a matrix searched with ``sub``, or ``None``
  where it does not apply (per-tensor: one group; a leaf searched whole over several axes;
  fp8: E4M3's spacing is relative to each value, and block128's tile scales couple the
  columns that the search takes one at a time)."""
  if n_in != 1 or sub.scheme == schemes.PER_TENSOR or sub.scheme in FP8_SCHEMES:
    return None
  return sub


def quantize_layer(
  w: jax.Array,
  h: jax.Array,
  act: jax.Array,
  spec: schemes.Spec,
  n_in: int,
  grid: int,
  clip: bool = True,
  rounding: Rounding = "nearest",
) -> tuple[QArray, jax.Array]:
  """AWQ of one kernel: ``Q(clip(w * s))`` with ``input_scale = 1 / s``, and the errors
  of the scale search (clipping and GPTQ rounding: 2-D kernels, see :func:`clip_search`)."""
  s, errors = search(w, h, act, spec=spec, n_in=n_in, grid=grid)
  bshape = input_scale_shape(w.shape, n_in)
  ws = w.astype(jnp.float32) * s.reshape(bshape)
  cs = clip_spec(spec, n_in) if clip and w.ndim == 2 else None
  if cs is not None:
    ws = clipped(ws, clip_search(ws, _scaled_xtx(h, s), spec=cs))
  qa = schemes.quantize_leaf(ws, spec)
  if rounding == "gptq" and w.ndim == 2 and n_in == 1:
    qa = _gptq_rounded(ws, qa, [((0,), (), _scaled_xtx(h, s))])
  return dataclasses.replace(qa, input_scale=(1.0 / s).reshape(bshape)), errors


def _scaled_xtx(h: jax.Array, s: jax.Array) -> jax.Array:
  """``X^T X`` of the inputs ``x / s`` the scaled kernel reads."""
  inv = 1.0 / s.reshape(-1)
  return h * inv[:, None] * inv[None, :]


def awq(
  model: nn.Module | Callable[..., Any],
  params: Any,
  batches: Batches,
  scheme: Scheme = schemes.PER_TENSOR,
  rules: RulesLike = None,
  *,
  min_size: int = MIN_SIZE,
  like: tuple | None = None,
  grid: int = 20,
  clip: bool = True,
  rounding: Rounding = "nearest",
  blockwise: bool = True,
  progress: bool = True,
) -> Any:
  """Quantizes ``params`` like :func:`sensorquant_jax.quantize`, with AWQ scales on matmul kernels.

  For every ``nn.Dense``/``nn.DenseGeneral`` kernel the model calls, AWQ
  searches a per-input-channel scale ``s = mean|x| ** r`` (``r`` on a grid)
  that protects the weights of salient (large) input channels, quantizes
  ``W * s`` and keeps ``1 / s`` as the QArray's ``input_scale``, which the ops
  apply to the layer input (``(x / s) @ Q(W * s)``) and ``dequantize`` folds
  in. The search minimises the layer's output error over the real inputs
  (through ``X^T X``), so it is never worse there than round-to-nearest
  (``r = 0``). The scales are not folded into the previous op: the input
  multiply is kept explicit (it is correct for every graph). Then, as the
  paper does, each group's weights are clipped to the fraction of their
  largest magnitude (1 down to 0.55) that leaves the least output error on the
  same inputs (:func:`clip_search`; per-group, per-block and per-channel
  schemes, on matrices with one contracted axis).

  Every kernel a ``dot_general`` reads is found at the op (``Dense``,
  ``Einsum`` layers, ``@`` in custom code, scanned stacks): one scale search
  per matrix (per layer of a stack), the leaf quantized once with its
  scales; a block layout that does not run along one contracted axis keeps
  round-to-nearest, with a warning naming it. Block by block (the default,
  see :func:`sensorquant_jax.gptq`) the float model runs once over the
  batches, and each matrix's ``[K, K]`` sum is dropped after its search;
  ``blockwise=False`` measures groups of layers in passes from the input.

  Args:
    model: a Linen module, or any function ``f(params, *batch)``.
    params: its float variables.
    batches: model inputs, a sequence or a callable (read once per group of
      layers sharing an input).
    scheme: default scheme (as in ``quantize``).
    rules: per-leaf rules (as in ``quantize``).
    min_size: as in ``quantize``.
    like: as in ``quantize``: axes read from ``(fn, *example_args)``.
    grid: number of ratios ``r`` tried.
    clip: search each group's clipping bound after the scale (on by default; not
      for per-tensor or fp8 schemes, see :func:`clip_spec`).
    rounding: ``"nearest"``, or ``"gptq"``: round the scaled, clipped kernels with
      GPTQ against their scaled inputs (AWQ then GPTQ, on AWQ's grid; each
      matrix's ``[K, K]`` sum is kept until its leaf is complete).
    blockwise: run the model once, block by block; ``False``: passes.
    progress: print one line per layer to stderr.

  Returns:
    The quantized tree (QArrays with ``input_scale`` on the Dense kernels).

  Example:
    >>> qparams = sq.awq(model, variables, batches, sq.INT4)
  """
  iterate, treedef, current, where, floats, found = begin(
    model, params, batches, scheme, rules, min_size, like, layers=not blockwise
  )
  if blockwise:
    opts = (grid, clip, rounding, progress)
    rest = _blockwise(model, params, iterate, current, where, floats, *opts)
    if rest:
      _op_level(model, params, iterate, rest, floats, current, where, *opts)
    return jax.tree_util.tree_unflatten(treedef, current)
  default = schemes.Spec(scheme)
  rule_list = as_rules(rules)
  done = 0
  whole: set[str] = set()
  for group in capture.passes(found, capture.xtx_bytes):
    assert isinstance(model, nn.Module)  # found is empty for functions
    stats = capture.input_stats(model, lambda: params, iterate(), group)
    for layer in group:
      start = time.perf_counter()
      i = where[layer.kernel]
      qa: QArray = current[i]
      w = jnp.asarray(floats[layer.kernel])
      spec = select_spec(layer.kernel, w, default, rule_list, min_size)
      assert spec is not None  # the leaf was quantized with it
      st = stats[layer.path]
      assert st.xtx is not None
      new, errors = quantize_layer(
        w, st.xtx, st.abs_mean, spec, len(layer.axis), grid, clip, rounding
      )
      if w.ndim != 2 or len(layer.axis) != 1:
        whole.add(layer.kernel)
      current[i] = new
      done += 1
      if progress:
        before = output_error(matrix(w, layer.k), matrix(qa, layer.k), st.xtx)
        after = output_error(matrix(w, layer.k), matrix(new, layer.k), st.xtx)
        best = int(jnp.argmin(errors))
        ratio = f"{best % grid / grid:.2f}{' duo' if best >= grid else ''}"
        print(
          f"awq {done}/{len(found)} {layer.kernel}: ratio {ratio}, output error "
          f"{before:.3g} -> {after:.3g} ({time.perf_counter() - start:.1f} s)",
          file=sys.stderr,
        )
  _note_whole(whole, clip, rounding)
  covered = {layer.kernel for layer in found}
  rest = sorted(p for p, i in where.items() if is_qarray(current[i]) and p not in covered)
  if rest:
    _op_level(model, params, iterate, rest, floats, current, where, grid, clip, rounding, progress)
  return jax.tree_util.tree_unflatten(treedef, current)


def _scheme(qa: QArray) -> Scheme:
  return cast(Scheme, qa.scheme)


def _leaf_spec(qa: QArray) -> schemes.Spec:
  """The resolved spec ``qa`` was quantized with."""
  ndim = qa.ndim
  reduced = {a % ndim for a in qa.axes}
  if qa.scheme == schemes.PER_TENSOR:
    return schemes.Spec(_scheme(qa))
  if qa.block_size is not None:
    return schemes.Spec(_scheme(qa), (qa.axes[0] % ndim,), qa.block_size)
  return schemes.Spec(_scheme(qa), tuple(a for a in range(ndim) if a not in reduced))


def matrix_spec(qa: QArray, k_axes: tuple[int, ...]) -> schemes.Spec | None:
  """The spec of one ``[K, N]`` matrix of ``qa`` (``None``: no such 2-D layout)."""
  if qa.scheme == schemes.PER_TENSOR:
    return schemes.Spec(_scheme(qa))
  if qa.block_size is None:
    return schemes.Spec(_scheme(qa), (1,))
  if k_axes == (qa.axes[0] % qa.ndim,):
    return schemes.Spec(_scheme(qa), (0,), qa.block_size)
  return None


def moments(rows: jax.Array) -> dict[str, jax.Array]:
  """What AWQ (and the bits policy) keep of a matmul's input rows ``[tokens, K]``."""
  hp = lax.Precision.HIGHEST
  return {
    "xtx": lax.dot_general(rows, rows, (((0,), (0,)), ((), ())), precision=hp),
    "abs_sum": jnp.sum(jnp.abs(rows), axis=0),
    "count": jnp.float32(rows.shape[0]),
  }


def matrix_scale(
  w: jax.Array,
  k_axes: tuple[int, ...],
  index: tuple,
  st: dict,
  sub: schemes.Spec,
  grid: int,
  n_in: int = 1,
  clip: bool = True,
) -> tuple[jax.Array, jax.Array | None, float, float]:
  """AWQ's scale search (and clipping search) for one ``[K, N]`` matrix of the float leaf ``w``.

  ``n_in > 1``: ``w`` is searched as it is (its first ``n_in`` axes
  contracted, ``sub`` its own spec), for block layouts that a ``[K, N]`` view
  cannot hold (groups along one of several contracted axes).

  Returns:
    ``(scale [K], clipping bounds [2, K, N] on the scaled matrix or None, output error
    round-to-nearest, output error with the scale and bound)`` (errors relative, in
    the matrix's own scheme ``sub``).
  """
  wm, _ = gptq_mod.sub_matrix(w, k_axes, index)
  sm, bound, before, after = _matrix_scale(
    w if n_in > 1 else wm, wm, st, sub=sub, grid=grid, n_in=n_in, clip=clip
  )
  return sm, bound, float(before), float(after)


# One compilation per matrix shape and spec (the layers of a stack share it), not one
# per eager op.
@functools.partial(jax.jit, static_argnames=("sub", "grid", "n_in", "clip"))
def _matrix_scale(w, wm, st, *, sub, grid, n_in, clip):
  act = st["abs_sum"] / jnp.maximum(st["count"], 1.0)
  sm, errors = search(w, st["xtx"], act, spec=sub, n_in=n_in, grid=grid)
  den = jnp.maximum(jnp.sum(jnp.matmul(st["xtx"], wm, precision=lax.Precision.HIGHEST) * wm), 1e-30)
  cs = clip_spec(sub, n_in) if clip else None
  if cs is None:
    return sm, None, errors[0] / den, jnp.min(errors) / den
  ws = wm * sm[:, None]
  bound = clip_search(ws, _scaled_xtx(st["xtx"], sm), spec=cs)
  q = schemes.quantize_leaf(clipped(ws, bound), cs).dequantize(jnp.float32)
  return sm, bound, errors[0] / den, relative_error(wm, q / sm[:, None], st["xtx"])


def scale_tensor(
  shape: Sequence[int], k_axes: tuple[int, ...], scales: Sequence[tuple[tuple, jax.Array]]
) -> jax.Array:
  """Per-matrix input-channel scales ``[(fixed (axis, position)s, scale [K]), ...]`` of one
  leaf as one array broadcasting against it (1 where no matrix was measured)."""
  fixed = {a for index, _ in scales for a, _ in index}
  bshape = tuple(d if a in k_axes or a in fixed else 1 for a, d in enumerate(shape))
  scale = jnp.ones(bshape, jnp.float32)
  for index, sm in scales:
    at = dict(index)
    sel = tuple(at.get(a, slice(None)) for a in range(len(shape)))
    scale = scale.at[sel].set(sm.reshape(scale[sel].shape))
  return scale


def with_scales(
  w: jax.Array,
  qa: QArray,
  k_axes: tuple[int, ...],
  scales: Sequence[tuple[tuple, jax.Array, jax.Array | None]],
  xtx: Sequence[tuple[tuple, jax.Array]] = (),
) -> QArray:
  """``w`` quantized once as ``qa`` was, times its per-matrix AWQ scales and clipped to their
  bounds, with ``1 / scale`` as the input scale (1 where no matrix was measured); rounded
  by GPTQ where ``xtx`` gives matrices' ``(index, X^T X of the scaled inputs)``."""
  indices = tuple(index for index, _, _ in scales)
  ws, scale, new = _scaled_leaf(
    w,
    [sm for _, sm, _ in scales],
    [bound for _, _, bound in scales],
    k_axes=k_axes,
    indices=indices,
    spec=_leaf_spec(qa),
  )
  if xtx:
    new = _gptq_rounded(ws, new, [(k_axes, index, h) for index, h in xtx])
  return dataclasses.replace(new, input_scale=1.0 / scale, dtype=qa.dtype)


@functools.partial(jax.jit, static_argnames=("k_axes", "indices", "spec"))
def _scaled_leaf(w, sms, bounds, *, k_axes, indices, spec):
  """:func:`with_scales`' scaled, clipped leaf, its scale tensor and its rounding (one
  compilation per leaf)."""
  scale = scale_tensor(w.shape, k_axes, list(zip(indices, sms, strict=True)))
  ws = w * scale
  if any(bound is not None for bound in bounds):
    limits = [jnp.full(w.shape, -jnp.inf, jnp.float32), jnp.full(w.shape, jnp.inf, jnp.float32)]
    for index, bound in zip(indices, bounds, strict=True):
      if bound is not None:
        for end in (0, 1):
          _, put = gptq_mod.sub_matrix(limits[end], k_axes, index)
          limits[end] = put(limits[end], bound[end])
    ws = clipped(ws, jnp.stack(limits))
  return ws, scale, schemes.quantize_leaf(ws, spec)


def entry_spec(
  qa: QArray, k_axes: tuple[int, ...], index: tuple
) -> tuple[schemes.Spec, int] | None:
  """The spec AWQ searches one matrix of ``qa`` with, and its number of input axes:
  the ``[K, N]`` view's (:func:`matrix_spec`, 1), else, for a whole leaf whose
  leading axes are contracted (a DenseGeneral over heads and head size with
  groups along one of them), the leaf's own; ``None`` when neither holds."""
  sub = matrix_spec(qa, k_axes)
  if sub is not None:
    return sub, 1
  if not index and k_axes == tuple(range(len(k_axes))):
    return _leaf_spec(qa), len(k_axes)
  return None


def awq_entries(
  w: jax.Array,
  qa: QArray,
  entries: Sequence[tuple],
  sub: schemes.Spec,
  grid: int = 20,
  n_in: int = 1,
  clip: bool = True,
  rounding: Rounding = "nearest",
) -> tuple[QArray, float, float]:
  """AWQ of one leaf found at the op: a scale (and clipping) search per matrix, then the
  leaf quantized once as ``qa`` was, with its scales and bounds.

  Args:
    w: the float leaf.
    qa: its round-to-nearest quantization (the scheme and axes kept).
    entries: ``(contracted leaf axes, fixed (axis, position)s, stats)`` per matrix,
      stats with ``xtx``, ``abs_sum`` and ``count``.
    sub: the scheme of one ``[K, N]`` matrix (:func:`entry_spec`).
    grid: ratios tried.
    n_in: as :func:`entry_spec` gives it (then a single matrix, the whole leaf).
    clip: search the clipping bounds.
    rounding: ``"gptq"``: GPTQ on the scaled, clipped leaf (``n_in == 1``).

  Returns:
    ``(new QArray, mean output error before, after)``.
  """
  k_axes = entries[0][0]
  scales, xtx = [], []
  for _, index, st in entries:
    sm, bound, _, _ = matrix_scale(w, k_axes, index, st, sub, grid, n_in, clip)
    scales.append((index, sm, bound))
    if rounding == "gptq" and n_in == 1:
      xtx.append((index, _scaled_xtx(st["xtx"], sm)))
  new = with_scales(w, qa, k_axes, scales, xtx)
  before = after = 0.0
  for _, index, st in entries:
    wm, _ = gptq_mod.sub_matrix(w, k_axes, index)
    a, _ = gptq_mod.sub_matrix(qa.dequantize(jnp.float32), k_axes, index)
    b, _ = gptq_mod.sub_matrix(new.dequantize(jnp.float32), k_axes, index)
    before += output_error(wm, a, st["xtx"]) / len(entries)
    after += output_error(wm, b, st["xtx"]) / len(entries)
  return new, before, after


def _blockwise(
  model, params, iterate, current, where, floats, grid, clip, rounding, progress
) -> list[str]:
  """AWQ block by block on the float model: each matrix's scale searched at its cut (its
  statistics dropped then), each leaf quantized once its last matrix is measured."""
  leaves = {p for p, i in where.items() if is_qarray(current[i])}
  scales: dict[str, list[tuple[tuple, jax.Array, jax.Array | None]]] = {}
  kept: dict[str, list[tuple[tuple, jax.Array]]] = {}  # GPTQ rounding: scaled X^T X
  k_of: dict[str, set] = {}
  skipped: dict[str, str] = {}
  done: set[str] = set()
  whole: set[str] = set()

  def finalize(group, rows_of, complete):
    for m, st in group:
      qa: QArray = current[where[m.leaf]]
      sub = matrix_spec(qa, m.k_axes)
      k_of.setdefault(m.leaf, set()).add(m.k_axes)
      got = entry_spec(qa, m.k_axes, m.index)
      if got is None:
        skipped[m.leaf] = "its blocks do not run along one contracted axis"
        continue
      sub, n_in = got
      if n_in > 1:
        whole.add(m.leaf)
      start = time.perf_counter()
      w = jnp.asarray(floats[m.leaf], jnp.float32)
      sm, bound, before, after = matrix_scale(w, m.k_axes, m.index, st, sub, grid, n_in, clip)
      scales.setdefault(m.leaf, []).append((m.index, sm, bound))
      if rounding == "gptq" and n_in == 1:
        kept.setdefault(m.leaf, []).append((m.index, _scaled_xtx(st["xtx"], sm)))
      if progress:
        where_in = ",".join(f"{a}:{i}" for a, i in m.index)
        print(
          f"awq {m.leaf}{' ' + where_in if where_in else ''}: output error {before:.3g} -> "
          f"{after:.3g} ({time.perf_counter() - start:.1f} s)",
          file=sys.stderr,
        )
    for leaf in complete:
      done.add(leaf)
      got = scales.pop(leaf, None)
      if len(k_of[leaf]) != 1:
        skipped[leaf] = "read by matmuls contracting different axes"
      elif got and leaf not in skipped:
        i = where[leaf]
        current[i] = with_scales(
          jnp.asarray(floats[leaf], jnp.float32),
          current[i],
          next(iter(k_of[leaf])),
          got,
          kept.pop(leaf, ()),
        )

  passes = blockwise.run(
    gptq_mod.as_function(model),
    params,
    iterate(),
    leaves,
    moments,
    finalize,
    label="awq",
    progress=progress,
  )
  gptq_mod.note_passes("awq", passes)
  _note_whole(whole, clip, rounding)
  if skipped:
    warnings.warn(
      "awq: round-to-nearest kept for "
      + "; ".join(f"{leaf} ({why})" for leaf, why in sorted(skipped.items())),
      stacklevel=3,
    )
  return sorted(leaves - done)


def _op_level(
  model, params, iterate, leaves, floats, current, where, grid, clip, rounding, progress
):
  """AWQ of the kernels found at the op: one scale search per matrix (layer of a stack,
  block of a block-diagonal layer), the leaf quantized once with its scales."""

  stats, skipped = gptq_mod.op_level_stats(model, params, iterate, leaves, moments)
  by_leaf = gptq_mod.by_leaf_of(stats)
  for leaf in leaves:
    entries = by_leaf.get(leaf)
    i = where[leaf]
    qa: QArray = current[i]
    if leaf in skipped or not entries:
      skipped.setdefault(leaf, "no matmul reads it as a whole")
      continue
    k_axes = entries[0][0]
    sub = matrix_spec(qa, k_axes)
    if sub is None or len({k for k, _, _ in entries}) != 1:
      skipped[leaf] = "its blocks do not run along one contracted axis"
      continue
    start = time.perf_counter()
    w = jnp.asarray(floats[leaf], jnp.float32)
    current[i], before, after = awq_entries(w, qa, entries, sub, grid, clip=clip, rounding=rounding)
    if progress:
      print(
        f"awq {leaf} ({len(entries)} matrices): output error {before:.3g} -> {after:.3g} "
        f"({time.perf_counter() - start:.1f} s)",
        file=sys.stderr,
      )
  if skipped:
    warnings.warn(
      "awq: round-to-nearest kept for "
      + "; ".join(f"{leaf} ({why})" for leaf, why in sorted(skipped.items())),
      stacklevel=3,
    )
