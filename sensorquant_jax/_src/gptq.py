"""GPTQ: error-compensating rounding with each layer's input Hessian (Frantar et al., 2022)."""

from __future__ import annotations

import functools
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sensorquant_jax._src import blockwise, capture, distributed, schemes, transform
from sensorquant_jax._src.batching import as_args
from sensorquant_jax._src.options import FP8_SCHEMES, Scheme
from sensorquant_jax._src.qarray import QArray, grid, is_qarray
from sensorquant_jax._src.quantize import MIN_SIZE, RulesLike, dequantize, quantize
from sensorquant_jax._src.scaled import is_input_scaled
from sensorquant_jax._src.tree_paths import path_str

Batches = Sequence[Any] | Callable[[], Iterable[Any]]


@functools.partial(jax.jit, static_argnames=("qmin", "qmax", "block", "act_order", "fp8"))
def gptq_matrix(
  w: jax.Array,
  h: jax.Array,
  scale: jax.Array,
  zero: jax.Array,
  *,
  qmin: int,
  qmax: int,
  damp: float = 0.01,
  block: int = 128,
  act_order: bool = False,
  fp8: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """GPTQ codes for ``w`` ``[K, N]`` (rows are inputs) on a fixed grid.

  Quantizes the rows one at a time, each as ``clip(round(w / scale) + zero)``,
  and spreads its rounding error over the rows not yet quantized through the
  Cholesky factor of the inverse Hessian (Algorithm 1 of the paper, with lazy
  batch updates of ``block`` rows). The grid (``scale``, ``zero``, full
  ``[K, N]``) is fixed beforehand, so any scheme's layout is kept.

  Args:
    w: float32 weights ``[K, N]``.
    h: ``X^T X`` ``[K, K]`` of the layer's inputs (any positive multiple).
    scale: float32 ``[K, N]``.
    zero: float32 ``[K, N]`` zero points in code units.
    qmin: smallest code.
    qmax: largest code.
    damp: added to the diagonal, as a fraction of its mean.
    block: rows per lazy batch update.
    act_order: quantize rows by decreasing Hessian diagonal (the order is
      undone in the result).
    fp8: round onto the fp8 E4M3 grid, ``fp8(w / scale)`` as the fp8 schemes do
      (``zero``, ``qmin`` and ``qmax`` unused).

  Returns:
    ``(codes, ok)``: int32 codes ``[K, N]`` (fp8: the float32 E4M3 values) in the
    original row order, and whether the Hessian factorised (``False``: raise ``damp``).
  """
  k, n = w.shape
  w = w.astype(jnp.float32)
  h = h.astype(jnp.float32)
  diag = jnp.diag(h)
  dead = diag == 0
  # An input never seen in calibration constrains nothing: plain rounding.
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
  if act_order:
    perm = jnp.argsort(-jnp.diag(h), stable=True)
    w, scale, zero = w[perm], scale[perm], zero[perm]
    h = h[perm][:, perm]
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=jnp.float32)
  pad = -k % block
  kp = k + pad
  if pad:  # padded rows are uncoupled (identity Hessian) and weigh nothing
    w = jnp.pad(w, ((0, pad), (0, 0)))
    scale = jnp.pad(scale, ((0, pad), (0, 0)), constant_values=1.0)
    zero = jnp.pad(zero, ((0, pad), (0, 0)))
    h = jnp.pad(h, ((0, pad), (0, pad))) + jnp.diag(
      jnp.concatenate([jnp.zeros(k), jnp.ones(pad)]).astype(jnp.float32)
    )
  # Upper Cholesky factor U of H^-1 (H^-1 = U^T U): row i holds the updates of step i.
  lower = jnp.linalg.cholesky(h)
  eye = jnp.eye(kp, dtype=jnp.float32)
  hinv = jax.scipy.linalg.cho_solve((lower, True), eye)
  u = jnp.linalg.cholesky(hinv).T
  ok = jnp.all(jnp.isfinite(u))
  u = jnp.where(ok, u, eye)
  hp = lax.Precision.HIGHEST

  def quant(x, s, z):
    if fp8:
      q = schemes.fp8_round(schemes.exact_div(x, s)).astype(jnp.float32)
      return q, q * s
    q = jnp.clip(lax.round(x / s, lax.RoundingMethod.AWAY_FROM_ZERO) + z, qmin, qmax)
    return q, (q - z) * s

  def one_block(b, carry):
    w, q_all = carry
    i1 = b * block
    w1 = lax.dynamic_slice(w, (i1, 0), (block, n))
    s1 = lax.dynamic_slice(scale, (i1, 0), (block, n))
    z1 = lax.dynamic_slice(zero, (i1, 0), (block, n))
    u1 = lax.dynamic_slice(u, (i1, i1), (block, block))
    rows = jnp.arange(block)

    def one_row(i, c):
      w1, q1, e1 = c
      q, deq = quant(w1[i], s1[i], z1[i])
      err = (w1[i] - deq) / u1[i, i]
      coef = jnp.where(rows > i, u1[i], 0.0)
      w1 = w1 - coef[:, None] * err[None, :]
      return w1, q1.at[i].set(q), e1.at[i].set(err)

    zeros = jnp.zeros((block, n), jnp.float32)
    _, q1, e1 = lax.fori_loop(0, block, one_row, (w1, zeros, zeros))
    u_rows = lax.dynamic_slice(u, (i1, 0), (block, kp))
    u_rows = jnp.where(jnp.arange(kp)[None, :] >= i1 + block, u_rows, 0.0)
    w = w - jnp.matmul(u_rows.T, e1, precision=hp)
    return w, lax.dynamic_update_slice(q_all, q1, (i1, 0))

  _, q = lax.fori_loop(0, kp // block, one_block, (w, jnp.zeros((kp, n), jnp.float32)))
  q = q[:k]
  if act_order:
    q = q[jnp.argsort(perm)]
  return (q if fp8 else q.astype(jnp.int32)), ok


def output_error(w: jax.Array, approx: jax.Array, h: jax.Array) -> float:
  """``tr(D^T H D) / tr(W^T H W)`` for ``D = W - approx``: the layer's relative output error."""
  return float(relative_error(w, approx, h))


def relative_error(w: jax.Array, approx: jax.Array, h: jax.Array) -> jax.Array:
  """:func:`output_error` as a traceable scalar."""
  d = (w - approx).astype(jnp.float32)
  hp = lax.Precision.HIGHEST
  num = jnp.sum(jnp.matmul(h, d, precision=hp) * d)
  den = jnp.sum(jnp.matmul(h, w, precision=hp) * w)
  return num / jnp.maximum(den, 1e-30)


def matrix(x: Any, k: int) -> jax.Array:
  """A kernel (float or QArray, dequantized) as float32 ``[K, N]``."""
  a = x.dequantize(jnp.float32) if is_qarray(x) else jnp.asarray(x, jnp.float32)
  return a.reshape(k, -1)


def quantize_layer(
  w: jax.Array, qa: QArray, h: jax.Array, k: int, *, damp: float, block: int, act_order: bool
) -> QArray:
  """GPTQ of one kernel ``w`` on the grid of its round-to-nearest quantization ``qa``."""
  if qa.input_scale is not None:
    raise ValueError("GPTQ takes float kernels, not input-scaled (AWQ/SmoothQuant) ones")
  scale, zero = grid(qa)
  codes = damped_codes(
    matrix(w, k), h, scale.reshape(k, -1), zero.reshape(k, -1), qa.scheme, damp, block, act_order
  )
  return schemes.with_codes(qa, codes.reshape(qa.shape))


def damped_codes(
  w: jax.Array,
  h: jax.Array,
  scale: jax.Array,
  zero: jax.Array,
  scheme: str,
  damp: float,
  block: int,
  act_order: bool,
) -> jax.Array:
  """:func:`gptq_matrix` codes of ``w`` ``[K, N]``, dampening more while ``h`` does not factorise.

  Raises:
    ValueError: not positive definite even with 1000 times ``damp``.
  """
  qmin, qmax = schemes.code_range(scheme)
  k = w.shape[0]
  for attempt in range(4):  # a singular Hessian needs more dampening
    codes, ok = gptq_matrix(
      w,
      h,
      scale,
      zero,
      qmin=qmin,
      qmax=qmax,
      damp=damp * 10**attempt,
      block=min(block, max(k, 1)),
      act_order=act_order,
      fp8=scheme in FP8_SCHEMES,
    )
    if bool(ok):
      return codes
  raise ValueError(f"the input Hessian is not positive definite even with damp={damp * 1000:g}")


def gptq(
  model: nn.Module | Callable[..., Any],
  params: Any,
  batches: Batches,
  scheme: Scheme = schemes.PER_TENSOR,
  rules: RulesLike = None,
  *,
  min_size: int = MIN_SIZE,
  like: tuple | None = None,
  damp: float = 0.01,
  block: int = 128,
  act_order: bool = False,
  sequential: bool = True,
  blockwise: bool = True,
  progress: bool = True,
) -> Any:
  """Quantizes ``params`` like :func:`sensorquant_jax.quantize`, rounding matmul kernels with GPTQ.

  Every leaf is selected and given its scale exactly as ``quantize(params,
  scheme, rules, like=like)`` does; every quantized kernel that a matmul of
  the model reads then gets its codes from GPTQ, which rounds one input row
  at a time and compensates the error on the rows left, using ``X^T X`` of
  the kernel's real inputs. Every kernel a ``dot_general`` reads is found at
  the op by the transform of :func:`sensorquant_jax.quantized` (``Dense``,
  ``Einsum``, ``@`` in custom code; scanned stacks: one Hessian per layer).

  Block by block (the default): the model runs once over the batches, one
  stage at a time (:mod:`sensorquant_jax._src.blockwise`): the activations
  at each cut are kept for every batch, the next group of kernels (q, k and v
  together) is measured on them and rounded, and the stage after it runs with
  the rounded kernels. Time is linear in depth, stages of identical blocks
  are compiled once. ``blockwise=False`` measures each group in its own pass
  from the input (time quadratic in depth), as earlier versions did; kernels
  the stages cannot measure (read by several matmuls, by a matmul with batch
  axes) take such passes too, with a note. Leaves that no matmul reads as a
  whole (embedding lookups, convolutions) stay round-to-nearest, with a
  warning naming them. The result holds plain
  :class:`~sensorquant_jax.QArray` leaves.

  Memory (block by block): the activations live at one cut for every batch,
  one batch's intermediates inside one stage and one group's ``[K, K]`` sums.

  Args:
    model: a Linen module, or any function ``f(params, *batch)``.
    params: its float variables (``{"params": ...}``).
    batches: model inputs (a tuple per batch for several arguments), as a
      sequence or a zero-argument callable returning an iterable; read once
      per group of layers.
    scheme: default scheme (as in ``quantize``; the int4 schemes included).
    rules: per-leaf rules (as in ``quantize``).
    min_size: as in ``quantize``.
    like: as in ``quantize``: axes read from ``(fn, *example_args)``.
    damp: Hessian dampening, a fraction of its mean diagonal (the paper's 1%).
    block: rows per lazy batch update.
    act_order: quantize inputs by decreasing ``X^T X`` diagonal (the result
      is permuted back: still a plain QArray).
    sequential: measure each layer's inputs with the layers before it
      already quantized (the paper's sequential mode), else on the float model.
    blockwise: run the model once, block by block (see above); ``False``: a
      pass from the input per group of layers.
    progress: print one line per layer (output error RTN -> GPTQ) to stderr.

  Returns:
    The quantized tree.

  Raises:
    NonFiniteError: NaN or Inf weights (as ``quantize``).
    ValueError: ``batches`` is a one-shot iterator, empty, or a layer is
      never called.

  Example:
    >>> qparams = sq.gptq(model, variables, batches, sq.INT4)
    >>> logits = sq.apply(model, qparams, x)
  """
  iterate, treedef, current, where, floats, found = begin(
    model, params, batches, scheme, rules, min_size, like, layers=not blockwise
  )

  def variables():
    if not sequential:
      return params
    return dequantize(jax.tree_util.tree_unflatten(treedef, current))

  if blockwise:
    rest = _blockwise(
      model,
      variables(),
      iterate,
      current,
      where,
      floats,
      damp,
      block,
      act_order,
      sequential,
      progress,
    )
    if rest:
      _op_level(
        model, variables, iterate, rest, floats, current, where, damp, block, act_order, progress
      )
    return jax.tree_util.tree_unflatten(treedef, current)
  done = 0
  # Sequential: each group is measured after the ones before it are quantized.
  batched = capture.groups(found) if sequential else capture.passes(found, capture.xtx_bytes)
  for group in batched:
    assert isinstance(model, nn.Module)  # found is empty for functions
    stats = capture.input_stats(model, variables, iterate(), group)
    for layer in group:
      start = time.perf_counter()
      i = where[layer.kernel]
      qa = current[i]
      h = stats[layer.path].xtx
      assert h is not None
      w = floats[layer.kernel]
      try:
        new = quantize_layer(w, qa, h, layer.k, damp=damp, block=block, act_order=act_order)
      except ValueError as e:
        raise ValueError(f"{layer.kernel}: {e}") from None
      current[i] = new
      done += 1
      if progress:
        wm = matrix(w, layer.k)
        before = output_error(wm, matrix(qa, layer.k), h)
        after = output_error(wm, matrix(new, layer.k), h)
        print(
          f"gptq {done}/{len(found)} {layer.kernel}: output error {before:.3g} -> {after:.3g} "
          f"({time.perf_counter() - start:.1f} s)",
          file=sys.stderr,
        )
  covered = {layer.kernel for layer in found}
  rest = [p for p, i in where.items() if is_qarray(current[i]) and p not in covered]
  if rest:
    _op_level(
      model, variables, iterate, rest, floats, current, where, damp, block, act_order, progress
    )
  return jax.tree_util.tree_unflatten(treedef, current)


def _blockwise(
  model, params, iterate, current, where, floats, damp, block, act_order, sequential, progress
) -> list[str]:
  """GPTQ block by block from ``params`` (sequential: the round-to-nearest model, so that
  lookups and unmeasured kernels read as they will run); returns the quantized leaves it
  did not measure."""
  leaves = {p for p, i in where.items() if is_qarray(current[i])}
  done: set[str] = set()

  def finalize(group, rows_of, complete):
    by_leaf: dict[str, list] = {}
    for m, st in group:
      by_leaf.setdefault(m.leaf, []).append((m.k_axes, m.index, st["xtx"]))
    new = {}
    for leaf, entries in by_leaf.items():
      _gptq_leaf(leaf, entries, floats, current, where, damp, block, act_order, progress)
      done.add(leaf)
      if sequential:
        new[leaf] = current[where[leaf]].dequantize()
    return new

  passes = blockwise.run(
    as_function(model), params, iterate(), leaves, _xtx, finalize, label="gptq", progress=progress
  )
  note_passes("gptq", passes)
  return sorted(leaves - done)


def note_passes(method: str, passes: dict[str, str]) -> None:
  """The one-line note for kernels measured by whole-model passes instead of block by block."""
  if passes:
    warnings.warn(
      f"{method}: measured in whole-model passes, not block by block: "
      + "; ".join(f"{leaf} ({why})" for leaf, why in sorted(passes.items())),
      stacklevel=4,
    )


def as_function(model: Any) -> Callable[..., Any]:
  """``f(params, *batch)`` for a Linen module or a function."""
  if isinstance(model, nn.Module):
    return lambda v, *a: model.apply(v, *a)
  if not callable(model):
    raise ValueError(f"model must be a Linen module or a function, got {type(model).__name__}")
  return model


def op_level_stats(
  model: Any,
  variables: Any,
  iterate: Callable[[], Iterable[Any]],
  leaves: Sequence[str],
  reduce: Callable[[jax.Array], dict[str, jax.Array]],
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
  """Reduced inputs of every matmul reading ``leaves``, summed over the batches.

  Returns:
    ``({dot_inputs key: sums}, {leaf: why not captured})``.
  """
  fn = as_function(model)
  skipped: dict[str, str] = {}

  def stats(v, *a):
    out, why = transform.dot_inputs(fn, v, a, set(leaves), reduce)
    skipped.update(why)
    return out

  jitted = jax.jit(stats)
  total: dict[str, dict[str, Any]] = {}
  for batch in iterate():
    got = jitted(variables, *as_args(batch))
    for key, s in got.items():
      if key not in total:
        total[key] = dict(s)
      else:
        t = total[key]
        for k, val in s.items():
          t[k] = transform.combine(k, t[k], val)
  return total, skipped


def by_leaf_of(stats: dict[str, Any]) -> dict[str, list[tuple]]:
  """:func:`op_level_stats` by leaf: ``[(contracted axes, fixed positions, stats), ...]``."""
  out: dict[str, list[tuple]] = {}
  for key, st in stats.items():
    leaf, k_axes, index = transform.parse_key(key)
    out.setdefault(leaf, []).append((k_axes, index, st))
  return out


def _xtx(rows: jax.Array) -> dict[str, jax.Array]:
  hp = lax.Precision.HIGHEST
  return {"xtx": lax.dot_general(rows, rows, (((0,), (0,)), ((), ())), precision=hp)}


def sub_matrix(a: jax.Array, k_axes: Sequence[int], index: Sequence[tuple[int, int]]):
  """``a`` at the fixed ``index`` positions, as ``[K, N]`` with ``k_axes`` (leaf axes) first.

  Returns:
    ``(matrix, put)``: ``put(m)`` writes a ``[K, N]`` matrix back into an array
    shaped like ``a``.
  """
  fixed = dict(index)
  where = tuple(fixed.get(ax, slice(None)) for ax in range(a.ndim))
  rest = [ax for ax in range(a.ndim) if ax not in fixed]
  perm = [rest.index(ax) for ax in k_axes] + [i for i, ax in enumerate(rest) if ax not in k_axes]
  sub = jnp.transpose(a[where], perm)
  k = math.prod(sub.shape[: len(k_axes)])

  def put(into: jax.Array, m: jax.Array) -> jax.Array:
    back = jnp.transpose(m.reshape(sub.shape), [int(a) for a in np.argsort(perm)])
    return into.at[where].set(back.astype(into.dtype))

  return sub.reshape(k, -1), put


def _op_level(
  model, variables, iterate, leaves, floats, current, where, damp, block, act_order, progress
):
  """GPTQ of the kernels found at the op, measured in passes of bounded ``[K, K]`` sums."""
  first = next(iter(iterate()))
  uses = transform.consumers(as_function(model), variables(), *as_args(first))
  k_of = {
    leaf: max(
      (
        math.prod(floats[leaf].shape[a] for a in axes)
        for kind, axes in uses.get(leaf, ())
        if kind == "dot"
      ),
      default=0,
    )
    for leaf in leaves
  }
  unread = [leaf for leaf in leaves if not k_of[leaf]]
  passes: list[list[str]] = [[]]
  size = 0
  for leaf in (x for x in leaves if k_of[x]):
    shape = floats[leaf].shape
    # one [K, K] sum per layer of a stacked kernel (its leading axis), else one
    b = 4 * k_of[leaf] ** 2 * (shape[0] if len(shape) > 2 else 1)
    if passes[-1] and size + b > capture.PASS_BYTES:
      passes.append([])
      size = 0
    passes[-1].append(leaf)
    size += b
  skipped: dict[str, str] = {leaf: "no matmul reads it as a whole" for leaf in unread}
  for group in (g for g in passes if g):
    stats, why = op_level_stats(model, variables(), iterate, group, _xtx)
    skipped.update(why)
    by_leaf = {
      leaf: [(k, ix, st["xtx"]) for k, ix, st in got] for leaf, got in by_leaf_of(stats).items()
    }
    for leaf in group:
      if leaf in skipped or leaf not in by_leaf:
        skipped.setdefault(leaf, "no batch reached it")
        continue
      _gptq_leaf(leaf, by_leaf[leaf], floats, current, where, damp, block, act_order, progress)
  if skipped:
    warnings.warn(
      "gptq: round-to-nearest kept for "
      + "; ".join(f"{leaf} ({why})" for leaf, why in sorted(skipped.items())),
      stacklevel=3,
    )


def _gptq_leaf(leaf, entries, floats, current, where, damp, block, act_order, progress):
  start = time.perf_counter()
  i = where[leaf]
  try:
    current[i], before, after = gptq_entries(
      jnp.asarray(floats[leaf], jnp.float32), current[i], entries, damp, block, act_order
    )
  except ValueError as e:
    raise ValueError(f"{leaf}: {e}") from None
  if progress:
    n = len(entries)
    which = (
      f"{n} matrices" if n > 1 else ",".join(f"{a}:{i}" for a, i in entries[0][1]) or "1 matrix"
    )
    print(
      f"gptq {leaf} ({which}): output error {before:.3g} -> "
      f"{after:.3g} ({time.perf_counter() - start:.1f} s)",
      file=sys.stderr,
    )


def gptq_entries(
  w: jax.Array,
  qa: QArray,
  entries: Sequence[tuple[tuple[int, ...], tuple[tuple[int, int], ...], jax.Array]],
  damp: float = 0.01,
  block: int = 128,
  act_order: bool = False,
) -> tuple[QArray, float, float]:
  """GPTQ of the matrices of one leaf found at the op, on ``qa``'s grid.

  Args:
    w: the float leaf.
    qa: its round-to-nearest quantization.
    entries: ``(contracted leaf axes, fixed (axis, position)s, X^T X)`` per matrix.

  Returns:
    ``(new QArray, mean output error before, after)``.
  """
  scale, zero, codes = _grid_codes(qa)
  if len({k for k, _, _ in entries}) != 1:
    raise ValueError("read by matmuls contracting different axes")
  before = after = jnp.float32(0)
  for k_axes, index, h in entries:
    axes, positions = tuple(a for a, _ in index), tuple(i for _, i in index)
    wm, sm, zm, cm = _entry_matrices(w, scale, zero, codes, positions, k_axes=k_axes, axes=axes)
    c = damped_codes(wm, h, sm, zm, qa.scheme, damp, block, act_order)
    codes, b, a = _entry_result(codes, c, wm, cm, sm, zm, h, positions, k_axes=k_axes, axes=axes)
    before, after = before + b / len(entries), after + a / len(entries)
  return _with_codes(qa, codes), float(before), float(after)


# The helpers below are jitted so that GPTQ at the op compiles once per matrix shape
# (the positions of a stack's layers are traced), not once per eager op.
@jax.jit
def _grid_codes(qa: QArray) -> tuple[jax.Array, jax.Array, jax.Array]:
  fp8 = qa.scheme in FP8_SCHEMES
  return (*grid(qa), qa.codes().astype(jnp.float32 if fp8 else jnp.int32))


_with_codes = jax.jit(schemes.with_codes)


@functools.partial(jax.jit, static_argnames=("k_axes", "axes"))
def _entry_matrices(w, scale, zero, codes, positions, *, k_axes, axes):
  index = tuple(zip(axes, positions, strict=True))
  return tuple(sub_matrix(a, k_axes, index)[0] for a in (w, scale, zero, codes))


@functools.partial(jax.jit, static_argnames=("k_axes", "axes"))
def _entry_result(codes, c, wm, cm, sm, zm, h, positions, *, k_axes, axes):
  index = tuple(zip(axes, positions, strict=True))
  _, put = sub_matrix(codes, k_axes, index)
  before = relative_error(wm, (cm - zm) * sm, h)
  return put(codes, c), before, relative_error(wm, (c - zm) * sm, h)


def begin(model, params, batches, scheme, rules, min_size, like=None, layers=True):
  """What GPTQ and AWQ begin with: the round-to-nearest tree (flat), and the layers to redo.

  Returns:
    ``(iterate, treedef, current, where, floats, layers)``: a re-readable
    batches callable, the RTN tree's structure and leaves (``current``, by
    index; ``where`` maps leaf paths to indices), the float leaves by path,
    and the model's Dense/DenseGeneral layers whose kernel is quantized (none
    unless ``layers``: block by block finds every kernel at the op).
  """
  iterate = reader(batches, params)
  rtn = quantize(params, scheme, rules, min_size=min_size, like=like)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(rtn, is_leaf=is_qarray)
  current = [x for _, x in leaves]
  where = {path_str(p): i for i, (p, _) in enumerate(leaves)}
  floats = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  return (
    iterate,
    treedef,
    current,
    where,
    floats,
    weight_layers(model, params, iterate, where, current, layers),
  )


def weight_layers(model, params, iterate, where, current, layers=True) -> list[capture.Layer]:
  """The model's Dense/DenseGeneral layers whose kernel is quantized in ``current``.

  Raises:
    ValueError: ``params`` holds smoothed (``InputScaled``) kernels, or no batches.
  """
  if any(is_input_scaled(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_input_scaled)):
    raise ValueError("GPTQ and AWQ take the float params; SmoothQuant's output goes to sq.quantize")
  first = next(iter(iterate()), None)
  if first is None:
    raise ValueError("no batches")
  if not isinstance(model, nn.Module) or not layers:
    return []  # every kernel is found at the op
  return [
    layer
    for layer in capture.layers(model, params, first)
    if layer.kernel in where and is_qarray(current[where[layer.kernel]])
  ]


def reader(batches: Batches, like: Any = None) -> Callable[[], Iterable[Any]]:
  """``batches`` as a callable returning a fresh iterable (they are read more than once)."""
  if callable(batches):
    read = batches
  elif not isinstance(batches, Sequence):
    raise ValueError(
      "batches are read once per layer group: pass a sequence or a zero-argument callable"
    )
  else:
    read = lambda: iter(batches)  # noqa: E731
  if not distributed.is_multiprocess():
    return read
  # Each process passes its own batches: batch i of every process forms one global batch.
  return lambda: (distributed.process_local_batch(b, like) for b in read())
