"""Any JAX function on quantized params: quantized matmuls found at the op.

:func:`quantized` traces the user's function to a jaxpr with every quantized
leaf standing in as an abstract float array, then evaluates that jaxpr with an
interpreter that follows each quantized leaf through layout-only ops
(:mod:`sensorquant_jax._src.qlayout`) and inside ``jit``, ``remat``,
``custom_jvp`` / ``custom_vjp``, ``scan``, ``cond`` and ``while`` bodies. A
``dot_general`` with a quantized operand runs on the int8 / int4 ops
(:func:`sensorquant_jax.dense_general` and its measured dispatcher); a
``gather`` from a quantized table reads int8 rows; any other use gets the
dequantized value, and is recorded (see :func:`explain`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from sensorquant_jax._src import ops, options, qlayout, tuning
from sensorquant_jax._src.options import Mode
from sensorquant_jax._src.packed import PackedQArray, as_matrix, is_quantized
from sensorquant_jax._src.qarray import QArray
from sensorquant_jax._src.scaled import is_input_scaled
from sensorquant_jax._src.tree_paths import path_str


class DequantizedWarning(UserWarning):
  """A quantized leaf was dequantized in full because no quantized op consumes it."""


@dataclasses.dataclass(frozen=True)
class Use:
  """One use of a quantized leaf in a traced computation.

  Attributes:
    leaf: the leaf's path, e.g. ``"params/layer_0/attn/q_einsum/w"``.
    kind: ``"dot"`` (an int8 / int4 op), ``"gather"`` (int8 rows read),
      ``"dequantized"`` (the whole leaf converted to float) or ``"slice
      dequantized"`` (a slice of it, e.g. one layer of a stack).
    detail: the dot's equation (``"btd,ndh->btnh"``), or why the leaf was
      dequantized.
    impl: the implementation that runs the dot (``"native"``, ``"xla"``,
      ``"pallas"``...), when known.
    shape: the leaf's logical shape.
    nbytes: bytes the leaf occupies as stored.
    float_nbytes: bytes of its float copy.
  """

  leaf: str
  kind: str
  detail: str
  impl: str
  shape: tuple[int, ...]
  nbytes: int
  float_nbytes: int


class Explanation(tuple):
  """The uses of every quantized leaf (a tuple of :class:`Use`), printable as a table."""

  @property
  def dequantized(self) -> tuple[str, ...]:
    """Leaves that are dequantized in full somewhere."""
    return tuple(sorted({u.leaf for u in self if u.kind == "dequantized"}))

  def __str__(self) -> str:
    rows = [("leaf", "use", "detail", "impl", "bytes", "float bytes")]
    for u in self:
      rows.append((u.leaf, u.kind, u.detail, u.impl, str(u.nbytes), str(u.float_nbytes)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


@dataclasses.dataclass(frozen=True)
class _View:
  """A quantized leaf (after layout-only ops) standing in for a float array."""

  q: QArray | PackedQArray
  leaf: str
  source: QArray | PackedQArray  # the leaf as given, for its sizes
  part: str = ""  # "slice" or "gather": dequantizing it is not a full copy
  origin: tuple[tuple[int, ...], ...] = ()  # the leaf's axes each axis came from
  index: tuple[tuple[int, int], ...] = ()  # (leaf axis, position) fixed by static slices


class _Context:
  def __init__(self, mode: Mode, act_scales: Mapping[str, Any] | None, analyze: bool = False):
    self.mode = mode
    self.act_scales = act_scales or {}
    self.uses: list[Use] = []
    self.analyze = analyze  # only find the consumers' axes (see `consumers`)
    # capture(view, rows, k_axes): a dot's input rows, in capture mode (see `dot_inputs`)
    self.capture: Callable[[_View, jax.Array, tuple[int, ...]], None] | None = None
    # mark(view, x, cw, cx, bw, bx) -> x: the dot's activation operand, tagged (see blockwise)
    self.mark: Callable[..., jax.Array] | None = None
    self.skipped: dict[str, str] = {}  # leaf -> why its inputs could not be captured
    self.axes: dict[str, list[tuple[str, tuple[int, ...]]]] = {}

  def consumed(self, view: _View, kind: str, axes: Sequence[int]) -> None:
    """Notes that ``kind`` ("dot", "gather") reads ``view`` along its ``axes``."""
    leaf_axes = tuple(sorted({o for a in axes for o in view.origin[a]}))
    self.axes.setdefault(view.leaf, []).append((kind, leaf_axes))

  def record(self, view: _View, kind: str, detail: str, impl: str = "") -> None:
    src = view.source
    float_nbytes = math.prod(src.shape) * np.dtype(src.dtype).itemsize
    self.uses.append(
      Use(view.leaf, kind, detail, impl, tuple(src.shape), int(src.nbytes), float_nbytes)
    )

  def act_scale(self, leaf: str) -> Any:
    if leaf in self.act_scales:
      return self.act_scales[leaf]
    module = leaf.rsplit("/", 1)[0]  # Linen-style keys name the module
    return self.act_scales.get(module)

  def materialize(self, x: Any, why: str) -> Any:
    if not isinstance(x, _View):
      return x
    if x.part != "gather":  # the gather's row says it: its rows come out in float
      self.record(x, "slice dequantized" if x.part else "dequantized", why)
    return x.q.dequantize()


_STATE = threading.local()  # .seen: warning texts already given in this thread


def _is_special(x: Any) -> bool:
  return is_quantized(x) or is_input_scaled(x)


def is_array(x: Any) -> bool:
  """An array argument (traced), as opposed to a static Python value."""
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _leaf_name(path: tuple) -> str:
  """``"params/Dense_0/kernel"`` for the first argument, ``"argN/..."`` / ``"name/..."`` else."""
  (where, *rest) = path
  if getattr(where, "idx", None) == 0 and rest:  # args, first positional
    (first, *rest) = rest
    if getattr(first, "idx", None) == 0:
      return path_str(rest) or "arg0"
    return "/".join(x for x in (f"arg{first.idx}", path_str(rest)) if x)
  return path_str(rest)


def _abstract(q: QArray | PackedQArray) -> Any:
  """What ``q`` stands for while tracing: its float shape and dtype (inside ``shard_map``,
  a zero array varying over the manual axes its values vary over, never materialized)."""
  values = q.tiles if isinstance(q, PackedQArray) else q.values
  manual = getattr(jax.typeof(values), "manual_axis_type", None) if hasattr(jax, "typeof") else None
  varying = tuple(sorted(getattr(manual, "varying", ()) or ()))
  if not varying:
    return jax.ShapeDtypeStruct(tuple(q.shape), np.dtype(q.dtype))
  zeros = jnp.zeros(tuple(q.shape), np.dtype(q.dtype))
  if hasattr(lax, "pcast"):
    return lax.pcast(zeros, varying, to="varying")
  return getattr(lax, "pvary")(zeros, varying)  # noqa: B009 (jax < 0.8.2 only)


def _origin(ndim: int) -> tuple[tuple[int, ...], ...]:
  return tuple((a,) for a in range(ndim))


def _run(fn: Callable, args: tuple, kwargs: dict, ctx: _Context) -> Any:
  leaves, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=_is_special)
  static: list[Any] = []
  dynamic: list[Any] = []
  abstract: list[Any] = []
  where: list[int] = []
  for i, (path, x) in enumerate(leaves):
    if is_input_scaled(x):  # a smoothed float kernel: the folded one computes the same
      x = x.fold()
    if is_quantized(x):
      dynamic.append(_View(x, _leaf_name(path), x, "", _origin(len(x.shape))))
      abstract.append(_abstract(x))
    elif is_array(x):
      dynamic.append(x)
      abstract.append(x)
    else:  # Python scalars, strings, flags: static, as the function's code expects
      static.append((i, x))
      continue
    where.append(i)
  out_tree: list[Any] = []

  def flat(*dyn):
    full: list[Any] = [None] * len(leaves)
    for i, x in static:
      full[i] = x
    for i, x in zip(where, dyn, strict=True):
      full[i] = x
    a, k = jax.tree_util.tree_unflatten(treedef, full)
    out = fn(*a, **k)
    outs, tree = jax.tree_util.tree_flatten(out)
    out_tree.append(tree)
    return outs

  closed = jax.make_jaxpr(flat)(*abstract)
  outs = _eval(closed.jaxpr, closed.consts, dynamic, ctx)
  return jax.tree_util.tree_unflatten(out_tree[0], outs)


def quantized(
  fn: Callable,
  *,
  mode: Mode = "weight_only",
  act_scales: Mapping[str, Any] | None = None,
  warn: bool = True,
) -> Callable:
  """Transforms ``fn`` to run on quantized params, with quantized matmuls found at the op.

  The returned function has ``fn``'s signature and accepts
  :class:`~sensorquant_jax.QArray` (or packed) leaves wherever ``fn`` took
  float arrays. Every ``dot_general`` (``@``, ``jnp.einsum``, ``jnp.dot``,
  Flax's Dense / DenseGeneral / Einsum / Embed.attend...) whose operand comes
  from a quantized leaf, directly or through transposes, reshapes, squeezes,
  dtype conversions, slices of a stacked layer axis, ``scan`` over stacked
  layers and ``jit`` / ``remat`` / ``cond`` / ``while`` bodies, runs on the
  int8 / int4 ops without a float copy of the kernel; a lookup (``gather``)
  in a quantized table reads int8 rows. Any other use of a quantized leaf gets
  its dequantized value (correct, not lean) and is reported by
  :func:`explain`. Python scalars, strings and flags among the arguments stay
  static. Composes with ``jax.jit``, ``jax.vmap``, ``jax.grad`` with respect
  to the activations and shardings.

  Args:
    fn: any function of arrays and pytrees, e.g. ``model.apply``.
    mode: ``"weight_only"`` or ``"w8a8"`` (int8 activations, dynamic
      per-token scales unless ``act_scales`` gives a static one).
    act_scales: static activation scales for ``w8a8``, keyed by leaf path
      (``"params/Dense_0/kernel"``) or its module (``"params/Dense_0"``).
    warn: warn (once per message) with :class:`DequantizedWarning`, naming the
      leaves, when a quantized leaf is dequantized in full.

  Returns:
    The transformed function.

  Raises:
    ValueError: an unknown ``mode``.

  Example:
    >>> qparams = sq.quantize(params, "symmetric_per_channel_int8", like=(model.apply, x))
    >>> logits = jax.jit(sq.quantized(model.apply))(qparams, x)
  """
  options.check("mode", mode, options.MODES)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    ctx = _Context(mode, act_scales)
    out = _run(fn, args, kwargs, ctx)
    if warn:
      _warn(ctx.uses)
    return out

  return wrapped


def _warn(uses: Sequence[Use]) -> None:
  full = Explanation(uses).dequantized
  if not full:
    return
  text = (
    f"{len(full)} quantized {'leaf is' if len(full) == 1 else 'leaves are'} dequantized in full "
    "(no quantized op consumes them): "
    + ", ".join(full)
    + "; sq.explain says why (quantized(..., warn=False) silences this)"
  )
  seen = getattr(_STATE, "seen", None)
  if seen is None:
    seen = _STATE.seen = set()
  if text not in seen:
    seen.add(text)
    warnings.warn(text, DequantizedWarning, stacklevel=3)


def explain(
  fn: Callable,
  *args: Any,
  mode: Mode = "weight_only",
  act_scales: Mapping[str, Any] | None = None,
  **kwargs: Any,
) -> Explanation:
  """How :func:`quantized` runs ``fn(*args, **kwargs)``: one row per use of a quantized leaf.

  Traces only (nothing runs, except timing the dispatcher's candidates once
  per machine as a first real call would).

  Args:
    fn: the function, as given to :func:`quantized`.
    *args: its arguments, with quantized leaves (arrays or ``jax.ShapeDtypeStruct``).
    mode, act_scales: as for :func:`quantized`.
    **kwargs: its keyword arguments.

  Returns:
    An :class:`Explanation`: a tuple of :class:`Use` rows (``str()`` prints a
    table); ``.dequantized`` lists the leaves converted to float in full.

  Example:
    >>> print(sq.explain(model.apply, qparams, x))
  """
  options.check("mode", mode, options.MODES)
  ctx = _Context(mode, act_scales)
  with tuning.recording():
    jax.eval_shape(lambda a, k: _run(fn, a, k, ctx), args, kwargs)
  seen: dict[tuple, Use] = {}
  for u in ctx.uses:
    seen.setdefault((u.leaf, u.kind, u.detail, u.impl), u)
  return Explanation(seen.values())


# The interpreter.


def _read(env: dict, v: Any) -> Any:
  return v.val if isinstance(v, jcore.Literal) else env[v]


def _sub(j: Any) -> tuple[Any, Sequence[Any]]:
  """``(jaxpr, consts)`` of a ClosedJaxpr or an open Jaxpr."""
  if isinstance(j, jcore.ClosedJaxpr):
    return j.jaxpr, j.consts
  return j, ()


def _last_uses(jaxpr: Any) -> list[list[Any]]:
  """Per equation, the variables read for the last time there (freed after it)."""
  last: dict[Any, int] = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for v in eqn.invars:
      if not isinstance(v, jcore.Literal):
        last[v] = i
  for v in jaxpr.outvars:
    if not isinstance(v, jcore.Literal):
      last[v] = len(jaxpr.eqns)
  out: list[list[Any]] = [[] for _ in jaxpr.eqns]
  for v, i in last.items():
    if i < len(jaxpr.eqns):
      out[i].append(v)
  return out


def _eval(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], ctx: _Context) -> list[Any]:
  env: dict = {}
  for v, x in zip(jaxpr.constvars, consts, strict=True):
    env[v] = x
  for v, x in zip(jaxpr.invars, args, strict=True):
    env[v] = x
  # Eager calls free each value after its last use, as jax.core.eval_jaxpr does.
  for eqn, dead in zip(jaxpr.eqns, _last_uses(jaxpr), strict=True):
    invals = [_read(env, v) for v in eqn.invars]
    if any(isinstance(x, _View) for x in invals):
      handler = _HANDLERS.get(eqn.primitive.name, _materialize_all)
      outvals = handler(eqn, invals, ctx)
    else:
      outvals = bind(eqn, invals)
    if not eqn.primitive.multiple_results:
      outvals = [outvals]
    for v, x in zip(eqn.outvars, outvals, strict=True):
      env[v] = x
    for v in dead:
      env.pop(v, None)
  return [ctx.materialize(_read(env, v), "returned by the function") for v in jaxpr.outvars]


def bind(eqn: Any, invals: Sequence[Any]) -> Any:
  """Applies ``eqn``'s primitive to ``invals`` (under its context, e.g. a mesh)."""
  with eqn.ctx.manager:
    return eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))


def _materialize_all(eqn: Any, invals: Sequence[Any], ctx: _Context, why: str = "") -> Any:
  """Binds ``eqn`` on the dequantized values of its quantized operands, recording ``why``."""
  why = why or f"used by {eqn.primitive.name}"
  return bind(eqn, [ctx.materialize(x, why) for x in invals])


def _layout(
  op: Callable[..., QArray], origin: Callable[..., tuple] | None = None, part: str = ""
) -> Callable:
  """A handler applying a layout-only ``op`` to the quantized operand (first input).

  ``origin(view.origin, eqn)`` maps the leaf axes each axis came from
  (default: unchanged); ``part``: ``"slice"`` when the op keeps only part of
  the leaf.
  """

  def handle(eqn, invals, ctx):
    view, *rest = invals
    if not isinstance(view, _View) or any(isinstance(x, _View) for x in rest):
      return _materialize_all(eqn, invals, ctx)
    try:
      q = op(qlayout.canonical(view.q), eqn, rest)
    except qlayout.Unsupported as e:
      return _materialize_all(eqn, invals, ctx, f"{eqn.primitive.name}: {e}")
    new = view.origin if origin is None else origin(view.origin, eqn)
    return dataclasses.replace(view, q=q, part=view.part or part, origin=tuple(new))

  return handle


def _origin_transpose(o, eqn):
  return [o[p] for p in eqn.params["permutation"]]


def _origin_squeeze(o, eqn):
  dims = {d % len(o) for d in eqn.params["dimensions"]}
  return [x for a, x in enumerate(o) if a not in dims]


def _origin_broadcast(o, eqn):
  out: list[tuple[int, ...]] = [()] * len(eqn.params["shape"])
  for i, d in enumerate(eqn.params["broadcast_dimensions"]):
    out[d] = o[i]
  return out


def _origin_reshape(o, eqn):
  old = eqn.invars[0].aval.shape
  new = tuple(eqn.params["new_sizes"])
  keep_old = [a for a, d in enumerate(old) if d != 1]
  keep_new = [a for a, d in enumerate(new) if d != 1]
  out: list[tuple[int, ...]] = [()] * len(new)
  for gi, gj in qlayout.groups([old[a] for a in keep_old], [new[a] for a in keep_new]):
    merged = tuple(sorted({x for i in gi for x in o[keep_old[i]]}))
    for j in gj:
      out[keep_new[j]] = merged
  return out


def _origin_gather(o, eqn):
  dnums = eqn.params["dimension_numbers"]
  out: list[tuple[int, ...]] = [()] * len(eqn.outvars[0].aval.shape)
  kept = [a for a in range(len(o)) if a not in dnums.collapsed_slice_dims]
  for k, a in enumerate(kept):
    out[dnums.offset_dims[k]] = o[a]
  return out


def _convert(q: QArray, eqn: Any, rest: Sequence[Any]) -> QArray:
  new = np.dtype(eqn.params["new_dtype"])
  if not jnp.issubdtype(new, jnp.floating):
    raise qlayout.Unsupported(f"converts to {new.name}")
  return dataclasses.replace(q, dtype=new)


def _broadcast(q: QArray, eqn: Any, rest: Sequence[Any]) -> QArray:
  shape = tuple(eqn.params["shape"])
  dims = tuple(eqn.params["broadcast_dimensions"])
  if any(q.shape[i] != shape[d] for i, d in enumerate(dims)):
    raise qlayout.Unsupported("broadcasts a quantized axis")
  new = [d for d in range(len(shape)) if d not in dims]
  if any(shape[d] != 1 for d in new) or list(dims) != sorted(dims):
    raise qlayout.Unsupported("broadcasts to a larger array")
  return qlayout.expand(q, new, len(shape))


def _reshape(q: QArray, eqn: Any, rest: Sequence[Any]) -> QArray:
  if eqn.params.get("dimensions") is not None:
    raise qlayout.Unsupported("reshape with a dimension order")
  return qlayout.reshape(q, eqn.params["new_sizes"])


def _slice(q: QArray, eqn: Any, rest: Sequence[Any]) -> QArray:
  p = eqn.params
  strides = p["strides"] or (1,) * q.ndim
  sizes = [
    -(-(hi - lo) // s)
    for lo, hi, s in zip(p["start_indices"], p["limit_indices"], strides, strict=True)
  ]
  return qlayout.slice_axes(q, p["start_indices"], sizes, strides)


def _slice_handler(eqn, invals, ctx):
  out = _layout(_slice, part="slice")(eqn, invals, ctx)
  if isinstance(out, _View):
    view = invals[0]
    p = eqn.params
    fixed = [
      (view.origin[a][0], int(lo))
      for a, (lo, hi) in enumerate(zip(p["start_indices"], p["limit_indices"], strict=True))
      if hi - lo == 1 and view.q.shape[a] > 1 and len(view.origin[a]) == 1
    ]
    out = dataclasses.replace(out, index=out.index + tuple(fixed))
  return out


def _dynamic_slice(q: QArray, eqn: Any, rest: Sequence[Any]) -> QArray:
  return qlayout.slice_axes(q, rest, eqn.params["slice_sizes"], dynamic=True)


def _gather(q: QArray, eqn: Any, rest: Sequence[Any]) -> QArray:
  (indices,) = rest
  return qlayout.gather(q, indices, eqn.params["dimension_numbers"], eqn.params["slice_sizes"])


def _identity(q: QArray, eqn: Any, rest: Sequence[Any]) -> QArray:
  return q


def _each_array(eqn, invals, ctx):
  """A type-only op (``pvary`` / ``pcast`` inside ``shard_map``) applied to each of the
  quantized operand's arrays."""
  view, *rest = invals
  if not isinstance(view, _View) or rest:
    return _materialize_all(eqn, invals, ctx)
  q = qlayout.canonical(view.q)

  multi = eqn.primitive.multiple_results

  def one(a):
    if a is None:
      return None
    out = bind(eqn, [a])
    return out[0] if multi else out

  q = dataclasses.replace(
    q,
    values=one(q.values),
    scale=one(q.scale),
    zero_point=one(q.zero_point),
    input_scale=one(q.input_scale),
    offset=one(q.offset),
    perm=one(q.perm),
  )
  out = dataclasses.replace(view, q=q)
  return [out] if multi else out


def _gather_handler(eqn, invals, ctx):
  out = _layout(_gather, _origin_gather)(eqn, invals, ctx)
  if isinstance(out, _View):
    view = invals[0]
    ctx.consumed(view, "gather", eqn.params["dimension_numbers"].start_index_map)
    ctx.record(out, "gather", f"rows read as int{out.q.bits}")
    out = dataclasses.replace(out, part="gather")
  return out


def _letters(n: int, start: int = 0) -> list[str]:
  return list(string.ascii_lowercase[start : start + n])


def _equation(lhs_ndim: int, rhs_ndim: int, dnums: Any) -> str:
  """The einsum spelling of a ``dot_general``."""
  (lc, rc), (lb, rb) = dnums
  lhs = _letters(lhs_ndim)
  rhs = _letters(rhs_ndim, lhs_ndim)
  for a, b in zip(list(lc) + list(lb), list(rc) + list(rb), strict=True):
    rhs[b] = lhs[a]
  out = [lhs[a] for a in lb]
  out += [lhs[a] for a in range(lhs_ndim) if a not in lc and a not in lb]
  out += [rhs[a] for a in range(rhs_ndim) if a not in rc and a not in rb]
  return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"


def _rank(x: Any) -> int:
  return len(x.q.shape) if isinstance(x, _View) else x.ndim


def _dot(eqn, invals, ctx):
  lhs, rhs = invals
  dnums = eqn.params["dimension_numbers"]
  eq = _equation(_rank(lhs), _rank(rhs), dnums)
  if isinstance(lhs, _View) and isinstance(rhs, _View):
    return _materialize_all(eqn, invals, ctx, f"dot {eq} of two quantized operands")
  (lc, rc), (lb, rb) = dnums
  w_is_rhs = isinstance(rhs, _View)
  view, x = (rhs, lhs) if w_is_rhs else (lhs, rhs)
  cw, cx = (rc, lc) if w_is_rhs else (lc, rc)
  bw, bx = (rb, lb) if w_is_rhs else (lb, rb)
  if not cw:
    return _materialize_all(eqn, invals, ctx, f"dot {eq} contracts nothing")
  out_dtype = eqn.outvars[0].aval.dtype
  ctx.consumed(view, "dot", cw)
  if ctx.mark is not None:
    x = ctx.mark(view, x, tuple(cw), tuple(cx), tuple(bw), tuple(bx))
    invals = [x, view] if w_is_rhs else [view, x]
  elif ctx.capture is not None:
    _capture_rows(x, view, tuple(cw), tuple(cx), tuple(bw), tuple(bx), ctx)
  if ctx.capture is not None or ctx.mark is not None:
    return bind(eqn, [v.q.dequantize() if isinstance(v, _View) else v for v in invals])
  if ctx.analyze:
    return jnp.zeros(eqn.outvars[0].aval.shape, out_dtype)
  try:
    if bw:
      y, impl = _batched_dot(x, view, tuple(cw), tuple(cx), tuple(bw), tuple(bx), ctx, out_dtype)
    else:
      y, impl = _quantized_dot(x, view, tuple(cw), tuple(cx), ctx, out_dtype)
  except qlayout.Unsupported as e:
    return _materialize_all(eqn, invals, ctx, f"dot {eq}: {e}")
  ctx.record(view, "dot", eq, impl)
  if not w_is_rhs:  # y is [batch..., x free..., w free...]; dot_general puts lhs (w) free first
    nb, nfx = len(bw), x.ndim - len(cx) - len(bx)
    free_x = tuple(range(nb, nb + nfx))
    y = jnp.transpose(y, tuple(range(nb)) + tuple(range(nb + nfx, y.ndim)) + free_x)
  return y


def _capture_rows(x, view: _View, cw, cx, bw, bx, ctx: _Context) -> None:
  """Hands ``x``'s rows ``[tokens, K]`` to ``ctx.capture``, K in the leaf's axis order.

  A batch axis (a block-diagonal layer) is split: each of its positions is
  captured as its own matrix, like a layer of a stack.
  """
  if bw:
    if len(bw) > 1 or len(view.origin[bw[0]]) != 1:
      ctx.skipped[view.leaf] = "a dot with several batch axes reads it"
      return
    (a_w,), (a_x,) = bw, bx
    keep = [a for a in range(len(view.origin)) if a != a_w]
    for b in range(x.shape[a_x]):
      part = dataclasses.replace(
        view,
        origin=tuple(view.origin[a] for a in keep),
        index=view.index + ((view.origin[a_w][0], b),),
      )
      cw_b = tuple(a - (a > a_w) for a in cw)
      cx_b = tuple(a - (a > a_x) for a in cx)
      _capture_rows(jnp.take(x, b, axis=a_x), part, cw_b, cx_b, (), (), ctx)
    return
  layout = rows_layout(view, cw, cx, x.ndim)
  if isinstance(layout, str):
    ctx.skipped[view.leaf] = layout
    return
  k_axes, perm = layout
  assert ctx.capture is not None
  ctx.capture(view, as_rows(x, perm, len(cw)), k_axes)


def rows_layout(
  view: _View, cw: Sequence[int], cx: Sequence[int], ndim: int
) -> tuple[tuple[int, ...], tuple[int, ...]] | str:
  """How a dot's activation operand becomes rows ``[tokens, K]`` with K in the leaf's order.

  Returns:
    ``(contracted leaf axes, permutation of the operand)``, or why it cannot.
  """
  if any(len(view.origin[a]) != 1 for a in cw):
    return "its contracted axes were merged by a reshape"
  pairs = sorted(zip(cw, cx, strict=True), key=lambda p: view.origin[p[0]][0])
  k_axes = tuple(view.origin[a][0] for a, _ in pairs)
  free = tuple(a for a in range(ndim) if a not in cx)
  return k_axes, free + tuple(b for _, b in pairs)


def as_rows(x: jax.Array, perm: Sequence[int], n_k: int) -> jax.Array:
  """``x`` transposed by ``perm`` (its ``n_k`` contracted axes last) as float32 ``[tokens, K]``."""
  x = jnp.transpose(x, tuple(perm))
  k = math.prod(x.shape[x.ndim - n_k :])
  return x.reshape(-1, k).astype(jnp.float32)


def key_of(leaf: str, k_axes: Sequence[int], index: Sequence[tuple[int, int]]) -> str:
  """The key of one matrix of ``leaf`` (see :func:`parse_key`)."""
  return f"{leaf}|{','.join(map(str, k_axes))}|" + ",".join(f"{a}:{i}" for a, i in sorted(index))


def _batched_dot(x, view: _View, cw, cx, bw, bx, ctx, out_dtype) -> tuple[jax.Array, str]:
  """A dot with batch axes (e.g. block-diagonal layers): the quantized dot vmapped over them."""
  q = qlayout.canonical(view.q)
  if qlayout.block_axis(q) in bw:
    raise qlayout.Unsupported("a batch axis is the block axis")
  nb = len(bw)
  rest_w = [a for a in range(q.ndim) if a not in bw]
  rest_x = [a for a in range(x.ndim) if a not in bx]
  q = qlayout.transpose(q, tuple(bw) + tuple(rest_w))
  x = jnp.transpose(x, tuple(bx) + tuple(rest_x))
  lead = q.shape[:nb]

  def full(a):  # scales shared along a batch axis, repeated so that vmap can slice them
    return None if a is None else jnp.broadcast_to(a, lead + a.shape[nb:])

  if q.perm is not None:
    raise qlayout.Unsupported("a kernel with permuted inputs under a batch or scan axis")
  q = dataclasses.replace(
    q,
    scale=full(q.scale),
    zero_point=full(q.zero_point),
    input_scale=full(q.input_scale),
    offset=full(q.offset),
  )
  cw2 = tuple(rest_w.index(a) for a in cw)
  cx2 = tuple(rest_x.index(a) for a in cx)
  impls: list[str] = []

  def one(xs, qs):
    axes = tuple(a for a in qs.axes if a >= -qs.values.ndim)  # drops the batch axes
    inner = dataclasses.replace(view, q=dataclasses.replace(qs, axes=axes))
    y, impl = _quantized_dot(xs, inner, cw2, cx2, ctx, out_dtype)
    impls.append(impl)
    return y

  fn = one
  for _ in range(nb):
    fn = jax.vmap(fn)
  y = fn(x, q)
  return y, ",".join(sorted(set(impls)))


def _quantized_dot(x, view: _View, cw, cx, ctx: _Context, out_dtype) -> tuple[jax.Array, str]:
  w = view.q
  nw = len(w.shape)
  fw = tuple(a for a in range(nw) if a not in cw)
  fx = tuple(a for a in range(x.ndim) if a not in cx)
  n_in = len(cw)
  kernel: QArray | PackedQArray = w
  if not (isinstance(w, PackedQArray) and cw == (0,)):  # packed: its fast layout as it is
    q = qlayout.canonical(w)
    blk = qlayout.block_axis(q)
    if blk in cw and n_in > 1:  # contract the block axis last: blocks stay whole in K
      i = cw.index(blk)
      cw = cw[:i] + cw[i + 1 :] + (blk,)
      cx = cx[:i] + cx[i + 1 :] + (cx[i],)
    q = qlayout.transpose(q, cw + fw)
    if q.block_size is not None and n_in > 1:
      q = qlayout.merge_leading(q, n_in)
    if q.input_scale is not None and any(
      q.input_scale.shape[a] != 1 for a in range(q.ndim - len(fw), q.ndim)
    ):
      raise qlayout.Unsupported("its input scale varies along output axes")
    if as_matrix(dataclasses.replace(q, input_scale=None), q.ndim - len(fw)) is None:
      raise qlayout.Unsupported("its scales vary along the contracted axes")
    kernel = q
  if fx + cx != tuple(range(x.ndim)):
    x = jnp.transpose(x, fx + cx)
  k_axes = len(kernel.shape) - len(fw)
  if k_axes != n_in:  # contracted axes merged into one
    x = x.reshape(x.shape[: x.ndim - n_in] + (math.prod(x.shape[x.ndim - n_in :]),))
    n_in = k_axes
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise qlayout.Unsupported(f"the other operand is {np.dtype(x.dtype).name}")
  dt = jnp.result_type(x.dtype, kernel.dtype)
  act = ctx.act_scale(view.leaf) if ctx.mode == "w8a8" else None
  with tuning.recording() as picks:
    y = ops.dense_general(
      x.astype(dt), kernel, n_in=n_in, mode=ctx.mode, act_scale=act, dtype=out_dtype
    )
  impl = ",".join(sorted(set(picks.values()))) if picks else ""
  return y, impl


def _pack_views(vals: Sequence[Any]) -> tuple[list[Any], list[Any]]:
  """Views as their QArray pytrees (to cross a JAX transform) plus what rebuilds them."""
  meta = [
    (v.leaf, v.source, v.part, v.origin, v.index) if isinstance(v, _View) else None for v in vals
  ]
  return [v.q if isinstance(v, _View) else v for v in vals], meta


def _unpack_views(vals: Sequence[Any], meta: Sequence[Any]) -> list[Any]:
  return [x if m is None else _View(x, *m) for x, m in zip(vals, meta, strict=True)]


def _inline(key: str) -> Callable:
  """A handler that evaluates a call-like primitive's body in place."""

  def handle(eqn, invals, ctx):
    jaxpr, consts = _sub(eqn.params[key])
    n = len(jaxpr.invars)
    return _eval(jaxpr, consts, invals[len(invals) - n :], ctx)

  return handle


def _remat(eqn, invals, ctx):
  jaxpr, consts = _sub(eqn.params["jaxpr"])
  if ctx.capture is not None:  # captured values must not be the body's tracers
    return _eval(jaxpr, consts, invals, ctx)
  packed, meta = _pack_views(invals)

  def body(*xs):
    return _eval(jaxpr, consts, _unpack_views(xs, meta), ctx)

  p = eqn.params
  return jax.checkpoint(body, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))(
    *packed
  )


def _scan(eqn, invals, ctx):
  p = eqn.params
  jaxpr, consts = _sub(p["jaxpr"])
  nc, ncar, length = p["num_consts"], p["num_carry"], p["length"]
  const_vals = invals[:nc]
  carry = [ctx.materialize(x, "carried through a scan") for x in invals[nc : nc + ncar]]
  xs = list(invals[nc + ncar :])
  if ctx.capture is not None:  # unrolled: each layer's inputs are captured as its own
    order = range(length - 1, -1, -1) if p["reverse"] else range(length)
    ys: dict[int, list[Any]] = {}
    for i in order:
      step = [_view_at(x, i) if isinstance(x, _View) else x[i] for x in xs]
      outs = _eval(jaxpr, consts, [*const_vals, *carry, *step], ctx)
      carry, ys[i] = outs[:ncar], outs[ncar:]
    stacked = [jnp.stack([ys[i][j] for i in range(length)]) for j in range(len(eqn.outvars) - ncar)]
    return [*carry, *stacked]
  for i, x in enumerate(xs):
    if isinstance(x, _View):
      try:
        xs[i] = _stackable(x, length)
      except qlayout.Unsupported as e:
        xs[i] = ctx.materialize(x, f"scanned over: {e}")
  packed_xs, meta = _pack_views(xs)

  def body(c, sl):
    per_layer = [_layer_view(s, m) if m is not None else s for s, m in zip(sl, meta, strict=True)]
    outs = _eval(jaxpr, consts, [*const_vals, *c, *per_layer], ctx)
    return outs[:ncar], outs[ncar:]

  c, ys = lax.scan(body, carry, packed_xs, length=length, reverse=p["reverse"], unroll=p["unroll"])
  return [*c, *ys]


def _view_at(view: _View, i: int) -> _View:
  """Layer ``i`` of a view stacked along its first axis (a static slice)."""
  q = qlayout.canonical(view.q)
  sizes = (1, *q.shape[1:])
  q = qlayout.squeeze(qlayout.slice_axes(q, (i,) + (0,) * (q.ndim - 1), sizes), [0])
  index = view.index + ((view.origin[0][0], i),) if len(view.origin[0]) == 1 else view.index
  return dataclasses.replace(view, q=q, part="slice", origin=view.origin[1:], index=index)


def _stackable(view: _View, length: int) -> _View:
  """The view with every array's leading axis of size ``length`` (scan slices it)."""
  q = qlayout.canonical(view.q)
  if qlayout.block_axis(q) == 0:
    raise qlayout.Unsupported("the stacked axis is the block axis")

  def full(a):
    return None if a is None else jnp.broadcast_to(a, (length, *a.shape[1:]))

  if q.perm is not None:
    raise qlayout.Unsupported("a kernel with permuted inputs under a batch or scan axis")
  q = dataclasses.replace(
    q,
    scale=full(q.scale),
    zero_point=full(q.zero_point),
    input_scale=full(q.input_scale),
    offset=full(q.offset),
  )
  return dataclasses.replace(view, q=q)


def _layer_view(q: QArray, meta: tuple[str, Any, str, tuple, tuple]) -> _View:
  """One layer of a stacked QArray (its leading axis sliced away by scan)."""
  ndim = q.values.ndim
  axes = tuple(a for a in q.axes if a >= -ndim)  # drops the stacked axis
  return _View(dataclasses.replace(q, axes=axes), meta[0], meta[1], "slice", meta[3][1:], meta[4])


def _uncapturable(eqn, invals, ctx) -> list[Any]:
  """Capture mode: a branch or loop body cannot hand out its values; its leaves are noted."""
  for x in invals:
    if isinstance(x, _View):
      ctx.skipped[x.leaf] = f"read inside a {eqn.primitive.name}"
  return [x.q.dequantize() if isinstance(x, _View) else x for x in invals]


def _cond(eqn, invals, ctx):
  if ctx.capture is not None:
    return bind(eqn, _uncapturable(eqn, invals, ctx))
  index, *operands = invals
  packed, meta = _pack_views(operands)

  def branch(closed):
    jaxpr, consts = _sub(closed)
    return lambda *xs: _eval(jaxpr, consts, _unpack_views(xs, meta), ctx)

  return lax.switch(index, [branch(b) for b in eqn.params["branches"]], *packed)


def _while(eqn, invals, ctx):
  if ctx.capture is not None:
    return bind(eqn, _uncapturable(eqn, invals, ctx))
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts = invals[:cn], invals[cn : cn + bn]
  init = [ctx.materialize(x, "carried through a while loop") for x in invals[cn + bn :]]
  cj, cc = _sub(p["cond_jaxpr"])
  bj, bc = _sub(p["body_jaxpr"])
  out = lax.while_loop(
    lambda c: _eval(cj, cc, [*cconsts, *c], ctx)[0],
    lambda c: _eval(bj, bc, [*bconsts, *c], ctx),
    init,
  )
  return list(out)


_HANDLERS: dict[str, Callable] = {
  "dot_general": _dot,
  "transpose": _layout(
    lambda q, eqn, rest: qlayout.transpose(q, eqn.params["permutation"]), _origin_transpose
  ),
  "squeeze": _layout(
    lambda q, eqn, rest: qlayout.squeeze(q, eqn.params["dimensions"]), _origin_squeeze
  ),
  "reshape": _layout(_reshape, _origin_reshape),
  "broadcast_in_dim": _layout(_broadcast, _origin_broadcast),
  "convert_element_type": _layout(_convert),
  "slice": _slice_handler,
  "dynamic_slice": _layout(_dynamic_slice, part="slice"),
  "gather": _gather_handler,
  "copy": _layout(_identity),
  "copy_p": _layout(_identity),
  "sharding_constraint": _layout(_identity),
  "optimization_barrier": _materialize_all,
  "pvary": _each_array,
  "pcast": _each_array,
  "pjit": _inline("jaxpr"),
  "jit": _inline("jaxpr"),
  "closed_call": _inline("call_jaxpr"),
  "core_call": _inline("call_jaxpr"),
  "custom_jvp_call": _inline("call_jaxpr"),
  "custom_vjp_call": _inline("call_jaxpr"),
  "custom_vjp_call_jaxpr": _inline("fun_jaxpr"),
  "remat2": _remat,
  "checkpoint": _remat,
  "scan": _scan,
  "cond": _cond,
  "while": _while,
}


def consumers(fn: Callable, params: Any, *args: Any, **kwargs: Any) -> dict[str, list]:
  """Which ops read each floating leaf of ``params`` in ``fn(params, *args, **kwargs)``.

  Traces only. Every floating array leaf stands in as a quantized leaf, so
  it is followed through the same layout-only ops and bodies as in
  :func:`quantized`.

  Returns:
    ``{leaf path: [(kind, axes), ...]}`` with ``kind`` ``"dot"`` (``axes``:
    the leaf's contracted axes) or ``"gather"`` (its indexed axes); leaves
    that no dot or gather reads are absent.
  """
  ctx = _Context("weight_only", None, analyze=True)

  def probe(x):
    if not (hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and np.ndim(x) >= 1):
      return x
    nd = len(x.shape)
    return QArray(
      jnp.zeros(x.shape, jnp.int8),
      jnp.ones((1,) * nd, jnp.float32),
      scheme=options.PER_TENSOR,
      axes=tuple(range(-nd, 0)),
      dtype=np.dtype(x.dtype),
    )

  def run(p, a, k):
    _run(fn, (jax.tree_util.tree_map(probe, p), *a), k, ctx)

  jax.eval_shape(run, params, args, kwargs)
  return ctx.axes


def _carrier(x: Any) -> QArray:
  """A float array dressed as a QArray (float values, unit scale): followed like a quantized
  leaf, and dequantized exactly."""
  nd = len(x.shape)
  return QArray(
    jnp.asarray(x),
    jnp.ones((1,) * nd, jnp.float32),
    scheme=options.PER_TENSOR,
    axes=tuple(range(-nd, 0)),
    dtype=np.dtype(x.dtype),
  )


def dot_inputs(
  fn: Callable,
  params: Any,
  args: Sequence[Any],
  leaves: set[str],
  reduce: Callable[[jax.Array], dict[str, jax.Array]],
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
  """Reduces the inputs of every matmul that reads one of ``leaves`` in ``fn(params, *args)``.

  Runs ``fn`` on the float ``params`` (traced by the caller's ``jit``); each
  ``dot_general`` reading a leaf in ``leaves`` hands its other operand's rows
  ``[tokens, K]`` (K in the leaf's axis order) to ``reduce``, whose outputs are
  combined over calls (:func:`combine`). Scans over
  stacked layers are unrolled so that each layer's inputs are its own.

  Returns:
    ``({key: reduced}, {leaf: why it was not captured})``; ``key`` is
    ``"leaf|k_axes|index"`` (see :func:`parse_key`).
  """
  ctx = _Context("weight_only", None)
  out: dict[str, dict[str, Any]] = {}

  def capture(view: _View, rows: jax.Array, k_axes: tuple[int, ...]) -> None:
    if view.leaf not in leaves:
      return
    key = key_of(view.leaf, k_axes, view.index)
    got = reduce(rows)
    if key in out:
      prev = out[key]
      got = {k: combine(k, prev[k], v) for k, v in got.items()}
    out[key] = got

  ctx.capture = capture

  def dress(path, x):
    return _carrier(x) if path_str(path) in leaves else x

  carried = jax.tree_util.tree_map_with_path(dress, params)
  _run(fn, (carried, *args), {}, ctx)
  return out, ctx.skipped


def with_marks(
  fn: Callable, params: Any, args: Sequence[Any], leaves: set[str], mark: Callable[..., Any]
) -> tuple[list[Any], dict[str, str]]:
  """Runs ``fn(params, *args)`` on the float ``params``, handing every matmul that reads one
  of ``leaves`` to ``mark(view, x, cw, cx, bw, bx)``, whose result replaces its activation
  operand ``x``; scans over stacked layers unrolled (as in :func:`dot_inputs`).

  Returns:
    ``(flat outputs, {leaf: why it is read where it cannot be marked})``.
  """
  ctx = _Context("weight_only", None)
  ctx.capture = lambda *a: None  # capture mode: bodies inlined, stacks unrolled
  ctx.mark = mark

  def dress(path, x):
    return _carrier(x) if path_str(path) in leaves else x

  carried = jax.tree_util.tree_map_with_path(dress, params)
  out = _run(fn, (carried, *args), {}, ctx)
  return jax.tree_util.tree_leaves(out), ctx.skipped


def run_marked(
  fn: Callable,
  params: Any,
  args: Sequence[Any],
  kwargs: Mapping[str, Any],
  leaves: set[str],
  mark: Callable[..., Any],
) -> Any:
  """``fn(params, *args, **kwargs)`` with every matmul that reads one of ``leaves`` handing
  its activation operand to ``mark(view, x, cw, cx, bw, bx)`` (its result replaces ``x``).

  Unlike :func:`with_marks`, bodies keep their form (a scan over stacked layers
  stays a scan; ``view.index`` does not name the layer), and the output keeps
  ``fn``'s structure. Differentiable: the leaves are followed as float arrays.
  """
  ctx = _Context("weight_only", None)
  ctx.mark = mark

  def dress(path, x):
    return _carrier(x) if path_str(path) in leaves else x

  carried = jax.tree_util.tree_map_with_path(dress, params)
  return _run(fn, (carried, *args), dict(kwargs), ctx)


def combine(key: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """Two calls' (or batches') statistic ``key``: maxima (``*max``), minima (``min``) or sums."""
  if key.endswith("max"):
    return jnp.maximum(a, b)
  return jnp.minimum(a, b) if key == "min" else a + b


def parse_key(key: str) -> tuple[str, tuple[int, ...], tuple[tuple[int, int], ...]]:
  """``(leaf, contracted leaf axes, ((leaf axis, position), ...))`` of a :func:`dot_inputs` key."""
  leaf, k_axes, index = key.split("|")
  ks = tuple(int(a) for a in k_axes.split(",") if a)
  ix = tuple(tuple(int(v) for v in p.split(":")) for p in index.split(",") if p)
  return leaf, ks, ix  # type: ignore[return-value]
