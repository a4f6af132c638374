"""Quantize and dequantize whole parameter pytrees."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any, Union, cast

import jax
import jax.numpy as jnp
import numpy as np

from sensorquant_jax._src import schemes, transform
from sensorquant_jax._src.options import Scheme
from sensorquant_jax._src.qarray import QArray, is_qarray
from sensorquant_jax._src.scaled import is_input_scaled
from sensorquant_jax._src.tree_paths import path_str

MIN_SIZE = 1024
"""Default: leaves with fewer elements stay in float."""


class NonFiniteError(ValueError):
  """Raised by :func:`quantize` for leaves holding NaN or Inf values."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """Chooses how leaves whose path matches ``pattern`` are quantized.

  Attributes:
    pattern: regular expression, matched with ``re.search`` against the leaf's
      '/'-joined path (e.g. ``"params/Dense_0/kernel"``).
    scheme: a scheme name, or ``None`` to keep matching leaves in float.
    axes: channel axes (per-channel) or block axis (per-block); ``None`` for
      the default (see :func:`sensorquant_jax.schemes.default_axes`).
    block_size: values per block (per-block int8) or group (int4 schemes);
      ``None``: the scheme's default (32 and 128).

  A rule that matches quantizes any floating array leaf, whatever its size or
  rank; unmatched leaves follow the defaults of :func:`quantize`.
  """

  pattern: str
  scheme: Scheme | None
  axes: tuple[int, ...] | None = None
  block_size: int | None = None

  def __post_init__(self):
    if not isinstance(self.pattern, str):
      raise ValueError(f"rule pattern must be a string, got {self.pattern!r}")
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(
        f"rule pattern {self.pattern!r} is not a valid regular expression: {e}"
      ) from None
    if self.scheme is not None and not isinstance(self.scheme, str):
      raise ValueError(
        f"rule {self.pattern!r}: scheme must be a string or None, got {self.scheme!r}"
      )
    if self.axes is not None:
      if isinstance(self.axes, (str, bytes)) or not all(
        isinstance(a, int) and not isinstance(a, bool) for a in _iterable(self.axes)
      ):
        raise ValueError(f"rule {self.pattern!r}: axes must be integers, got {self.axes!r}")
      object.__setattr__(self, "axes", tuple(self.axes))
    if self.block_size is not None and (
      isinstance(self.block_size, bool) or not isinstance(self.block_size, int)
    ):
      raise ValueError(f"rule {self.pattern!r}: block_size must be an integer")
    if self.scheme is not None:
      try:
        schemes.Spec(self.scheme, self.axes, self.block_size)  # validates
      except ValueError as e:
        raise ValueError(f"rule {self.pattern!r}: {e}") from None


def _iterable(x: Any) -> tuple:
  try:
    return tuple(x)
  except TypeError:
    return (x,)


RulesLike = Union[Sequence[Union[Rule, tuple]], Mapping[str, Union[str, None]], None]


def as_rules(rules: RulesLike) -> tuple[Rule, ...]:
  if rules is None:
    return ()
  if isinstance(rules, Mapping):
    return tuple(Rule(p, cast(Any, s)) for p, s in rules.items())
  out = []
  for i, r in enumerate(rules):
    if isinstance(r, Rule):
      out.append(r)
      continue
    try:
      if isinstance(r, Mapping):
        out.append(Rule(**r))
      elif isinstance(r, (tuple, list)) and 2 <= len(r) <= 4:
        out.append(Rule(*r))
      else:
        raise ValueError(f"expected (pattern, scheme[, axes[, block_size]]), got {r!r}")
    except TypeError as e:  # unknown or missing keyword in a mapping
      raise ValueError(f"rule {i}: {e}") from None
  return tuple(out)


def is_float_array(x: Any) -> bool:
  return hasattr(x, "dtype") and hasattr(x, "shape") and jnp.issubdtype(x.dtype, jnp.floating)


Uses = Mapping[str, Sequence[tuple[str, tuple[int, ...]]]]
"""``{leaf path: [(kind, axes), ...]}``: how a traced computation reads each
leaf (see :func:`sensorquant_jax._src.transform.consumers`)."""


def select_spec(
  path: str,
  x: Any,
  default: schemes.Spec,
  rules: tuple[Rule, ...],
  min_size: int,
  uses: Uses | None = None,
):
  """Returns the resolved Spec for a leaf, or None to leave it as it is.

  With ``uses`` (from ``like=``), default axes come from how the leaf is
  read, and leaves that no matmul or lookup reads stay float unless a rule
  names them.
  """
  if not is_float_array(x) or int(np.prod(x.shape)) == 0:
    return None  # nothing to quantize in an empty array: it stays as it is
  leaf = path.rsplit("/", 1)[-1]
  mine = None if uses is None else uses.get(path)
  ruled = False
  for rule in rules:
    if re.search(rule.pattern, path):
      if rule.scheme is None:
        return None
      spec = schemes.Spec(rule.scheme, rule.axes, rule.block_size, default.division_fix)
      ruled = True
      break
  else:
    if x.ndim < 2 or int(np.prod(x.shape)) < min_size:
      return None
    if uses is not None and not mine:
      return None
    spec = default
  if spec.axes is None and mine:
    spec = dataclasses.replace(spec, axes=axes_from_uses(spec.scheme, tuple(x.shape), mine))
  try:
    resolved = schemes.resolve(spec, x.ndim, leaf)
  except ValueError as e:
    raise ValueError(f"{path or '<root>'}: {e} (shape {tuple(x.shape)})") from None
  guessed = not ruled and spec.axes is None
  if guessed and resolved.scheme in schemes.INT4_SCHEMES and x.ndim >= 3:
    # A 2-D kernel's axis 0 is Flax's contraction axis (a short one is a small
    # layer); for higher ranks the default is a guess (heads or features): a
    # short axis beside one that holds whole blocks is most likely the wrong one.
    (axis,) = resolved.axes or (0,)
    block = int(resolved.block_size or 0)
    if x.shape[axis] < block <= max(x.shape):
      raise ValueError(
        f"{path or '<root>'}: the default group axis {axis} of shape {tuple(x.shape)} holds "
        f"{x.shape[axis]} values, fewer than one group of {resolved.block_size}: pass "
        "like=(fn, *example_args) to read the contracted axes from the model, or a Rule "
        "with axes"
      )
  return resolved


def axes_from_uses(
  scheme: str, shape: tuple[int, ...], uses: Sequence[tuple[str, tuple[int, ...]]]
) -> tuple[int, ...] | None:
  """Channel axes (per-channel) or block axis (per-block, int4) for a leaf read by ``uses``.

  Per-channel scales go over the axes no matmul contracts (for a lookup
  table, its rows); blocks and groups along the largest contracted axis (for a
  table only looked up, its largest other axis).
  """
  ndim = len(shape)
  contracted = {a for kind, axes in uses if kind == "dot" for a in axes}
  indexed = {a for kind, axes in uses if kind == "gather" for a in axes}
  if scheme in schemes.BLOCK_SCHEMES:
    pool = contracted - indexed if contracted else set(range(ndim)) - indexed
    if not pool:
      return None
    return (max(sorted(pool), key=lambda a: shape[a]),)
  if scheme == schemes.PER_TENSOR:
    return None
  keep = [a for a in range(ndim) if a not in contracted]
  if indexed:
    keep = [a for a in keep if a in indexed]
  return tuple(keep) if keep else None


@functools.partial(jax.jit, static_argnames=("spec",))
def quantize_leaf_counted(w: jax.Array, spec: schemes.Spec, scale: jax.Array | None = None):
  """:func:`schemes.quantize_leaf` (jitted) and the leaf's NaN and Inf counts."""
  wf = w.astype(jnp.float32)
  n_nan = jnp.sum(jnp.isnan(wf), dtype=jnp.int32)
  n_inf = jnp.sum(jnp.isinf(wf), dtype=jnp.int32)
  return schemes.quantize_leaf(w, spec, scale), n_nan, n_inf


def uses_of(params: Any, like: tuple | None) -> Uses | None:
  """How ``like``'s computation reads each leaf (``None`` without ``like``)."""
  if like is None:
    return None
  if not isinstance(like, (tuple, list)) or not like or not callable(like[0]):
    raise ValueError("like must be a tuple (fn, *example_args) with fn(params, *example_args)")
  return transform.consumers(like[0], _floats(params), *like[1:])


def message(path: str, n_nan: int, n_inf: int, size: int) -> str:
  what = ", ".join(f"{n} {k}" for n, k in ((n_nan, "NaN"), (n_inf, "Inf")) if n)
  return f"{path or '<root>'}: {what} of {size} values"


def _raise_in_callback(path: str, size: int, n_nan, n_inf):
  if int(n_nan) or int(n_inf):
    raise NonFiniteError("non-finite weights: " + message(path, int(n_nan), int(n_inf), size))


def quantize_array(
  w: jax.Array,
  scheme: Scheme = schemes.PER_TENSOR,
  *,
  axes: Sequence[int] | None = None,
  block_size: int | None = None,
  check_finite: bool = True,
  division_fix: bool | None = None,
) -> QArray:
  """Quantizes a single floating array.

  Args:
    w: the array (any floating dtype; arithmetic is float32).
    scheme: one of :data:`sensorquant_jax.SCHEMES`.
    axes: channel axes (per-channel) or the block axis (per-block).
    block_size: values per block or group (block and int4 schemes);
      ``None`` for the scheme's default.
    check_finite: raise :class:`NonFiniteError` on NaN/Inf input.
    division_fix: see :func:`quantize`.

  Returns:
    A :class:`QArray`.

  Example:
    >>> qa = quantize_array(jnp.ones((4, 4)), "symmetric_per_channel_int8")
  """
  spec = schemes.Spec(scheme, None if axes is None else tuple(axes), block_size)
  if not is_float_array(w):
    raise ValueError(f"quantize_array takes a floating array, got {type(w).__name__}")
  if int(np.prod(w.shape)) == 0:
    raise ValueError(f"cannot quantize an empty array (shape {tuple(w.shape)})")
  out = quantize(
    {"w": w},
    rules=[Rule("^w$", spec.scheme, spec.axes, spec.block_size)],
    check_finite=check_finite,
    division_fix=division_fix,
  )
  return out["w"]


def quantize(
  params: Any,
  scheme: Scheme = schemes.PER_TENSOR,
  rules: RulesLike = None,
  *,
  min_size: int = MIN_SIZE,
  check_finite: bool = True,
  division_fix: bool | None = None,
  like: tuple | None = None,
) -> Any:
  """Quantizes the floating kernels and embedding tables of a param pytree.

  Pure: returns a tree of the same structure with :class:`QArray` leaves where
  quantized and the original leaves elsewhere. By default every floating array
  with at least 2 dimensions and ``min_size`` elements is quantized with
  ``scheme``; biases, norm scales, small tensors, integer arrays and non-array
  leaves are kept as they are. ``rules`` override this per leaf. An
  :class:`InputScaled` kernel (SmoothQuant) is quantized with its input scale
  kept on the QArray.

  Exactness: ``symmetric_per_tensor_int8`` matches the Rust ``sensorlm``
  module bit for bit (values and scales) for every finite input, both when
  called eagerly and when traced inside an outer ``jax.jit``: on CPU the
  division is written so that XLA keeps it a true division, and on GPU
  (whose float32 division is approximate) scale and rounding decisions are
  corrected with exact residuals (see ``division_fix``).
  Sharded leaves are quantized where they live; values keep the input's
  sharding and scales follow it.

  Args:
    params: any pytree, e.g. ``{"params": {...}}`` from ``model.init``.
    scheme: default scheme for selected leaves.
    rules: :class:`Rule` objects, ``(pattern, scheme)`` tuples or a
      ``{pattern: scheme}`` mapping; the first rule whose pattern matches the
      leaf's '/'-joined path decides (``scheme=None`` keeps it in float).
    min_size: default minimum number of elements for quantization.
    check_finite: raise :class:`NonFiniteError` for NaN/Inf leaves. Eagerly,
      the error is raised before returning and lists every bad leaf with its
      NaN and Inf counts. Under an outer ``jit`` it is raised from a host
      callback when the computation runs (JAX wraps it in a
      ``JaxRuntimeError`` that carries the same message).
    division_fix: correct float32 divisions with exact residuals. ``None``
      (default): on every backend but XLA:CPU, whose division is IEEE;
      ``True``/``False`` force it (e.g. to check the correction on CPU).
    like: ``(fn, *example_args)``: read each leaf's axes from the
      computation ``fn(params, *example_args)`` (traced, not run): per-channel
      scales over the axes that no matmul contracts (per row for lookup
      tables), int8 blocks and int4 groups along the contracted axis; leaves
      that no matmul or lookup reads (biases, norm scales, convolution
      filters) stay float unless a rule names them. Without it, axes follow
      :func:`sensorquant_jax.schemes.default_axes`, and an int4 default
      group axis shorter than one group (on a kernel of rank >= 3 with an axis
      that holds one) is refused.

  Returns:
    The quantized pytree.

  Raises:
    NonFiniteError: a selected leaf holds NaN or Inf values.
    ValueError: an unknown scheme or axes that do not fit a leaf.

  Example:
    >>> qparams = quantize(params, "symmetric_per_channel_int8",
    ...                    rules=[("embedding", None)])
    >>> logits = model.apply(dequantize(qparams), x)
  """
  default = schemes.Spec(scheme, division_fix=division_fix)
  rule_list = as_rules(rules)
  uses = uses_of(params, like)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_special)
  out, pending = [], []
  for path, x in leaves:
    if is_qarray(x):
      out.append(x)
      continue
    name = path_str(path)
    scaled = x if is_input_scaled(x) else None
    if scaled is not None:
      x = scaled.kernel
    spec = select_spec(name, x, default, rule_list, min_size, uses)
    if spec is None:
      out.append(x if scaled is None else scaled)
      continue
    qa, n_nan, n_inf = quantize_leaf_counted(x, spec)
    if scaled is not None:
      qa = dataclasses.replace(qa, input_scale=scaled.input_scale.astype(jnp.float32))
    out.append(qa)
    if check_finite:
      if isinstance(n_nan, jax.core.Tracer):
        jax.debug.callback(
          functools.partial(_raise_in_callback, name, int(np.prod(x.shape))), n_nan, n_inf
        )
      else:
        pending.append((name, int(np.prod(x.shape)), n_nan, n_inf))
  if pending:
    counts = jax.device_get([(a, b) for _, _, a, b in pending])
    bad = [
      message(p, int(a), int(b), size)
      for (p, size, _, _), (a, b) in zip(pending, counts, strict=True)
      if int(a) or int(b)
    ]
    if bad:
      raise NonFiniteError("non-finite weights: " + "; ".join(bad))
  return jax.tree_util.tree_unflatten(treedef, out)


def _floats(params: Any) -> Any:
  """The float tree ``like`` traces: quantized and smoothed leaves as their float shapes."""

  def one(x):
    if is_qarray(x) or is_input_scaled(x):
      return jax.ShapeDtypeStruct(tuple(x.shape), np.dtype(x.dtype))
    return x

  return jax.tree_util.tree_map(one, params, is_leaf=_is_special)


def _is_special(x: Any) -> bool:
  return is_qarray(x) or is_input_scaled(x)


def dequantize(qparams: Any, dtype: Any = None) -> Any:
  """Replaces every :class:`QArray` leaf by its float array (usable under jit).

  An :class:`InputScaled` kernel (SmoothQuant) becomes its folded float kernel.

  Args:
    qparams: a pytree from :func:`quantize`.
    dtype: output dtype; defaults to each leaf's original dtype.

  Returns:
    A pytree of the same structure with plain arrays.
  """

  def one(x):
    if is_qarray(x):
      return x.dequantize(dtype)
    if is_input_scaled(x):
      return x.fold(dtype)
    return x

  return jax.tree_util.tree_map(one, qparams, is_leaf=_is_special)


def nbytes(tree: Any) -> int:
  """Total bytes of the arrays in a pytree, counting QArrays as stored."""
  total = 0
  for x in jax.tree_util.tree_leaves(tree, is_leaf=is_qarray):
    if is_qarray(x):
      total += x.nbytes
    elif hasattr(x, "nbytes"):
      total += int(x.nbytes)
  return total
