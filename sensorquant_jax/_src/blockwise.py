"""Calibration block by block: the model run once over the batches, one stage at a time.

The model is traced once per batch shape to a flat jaxpr (``jit`` / ``remat``
bodies inlined, scans over stacked layers unrolled) in which every matmul that
reads a measured leaf is tagged with its activation operand. The jaxpr is cut
before the first matmul of each group of kernels whose inputs are ready (q, k
and v together; gate and up together), so that the stage between two cuts runs
on the activations kept at the first cut (for every batch) and hands on those
live at the next. At each cut the kernels' input statistics are reduced over
all batches and handed to the method (GPTQ, AWQ, SmoothQuant, the bits
budget), which may replace the kernels before the next stage reads them (the
paper's sequential mode): one forward pass in all, whatever the depth.

Values that do not depend on the batch (the weights, after transposes,
reshapes or the slice of a stacked layer; masks and rotary tables) are
computed outside the stages and passed in, so the stages of identical blocks
are the same program: each distinct stage is compiled once.

Memory: the activations live at one cut, for every batch (the residual
stream, plus the attention output or MLP hidden state inside a block), one
batch's intermediates inside one stage, and the statistics of one group.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from sensorquant_jax._src import transform
from sensorquant_jax._src.batching import as_args
from sensorquant_jax._src.tree_paths import path_str

_MARK = jcore.Primitive("sensorquant_calibration_mark")
_MARK.def_impl(lambda x, **_: x)
_MARK.def_abstract_eval(lambda x, **_: x)


@dataclasses.dataclass(frozen=True)
class Matrix:
  """One ``[K, N]`` matrix of a leaf that a matmul reads, and how its input becomes rows.

  Attributes:
    key: ``"leaf|k_axes|index"`` (see :func:`sensorquant_jax._src.transform.parse_key`).
    leaf: the leaf's path.
    k_axes: the leaf axes the matmul contracts, in leaf order.
    index: ``(leaf axis, position)`` fixed (the layer of a stack).
    perm: the activation operand's permutation putting the contracted axes last.
    n_k: number of contracted axes.
  """

  key: str
  leaf: str
  k_axes: tuple[int, ...]
  index: tuple[tuple[int, int], ...]
  perm: tuple[int, ...]
  n_k: int


Stats = dict[str, jax.Array]
Finalize = Callable[
  [Sequence[tuple[Matrix, Stats]], Callable[[Matrix], Iterator[jax.Array]], list[str]], Any
]


@dataclasses.dataclass
class _Plan:
  """The flat jaxpr of one batch shape, cut into stages."""

  jaxpr: Any
  consts: Sequence[Any]
  n_params: int
  matrices: list[Matrix]  # by mark tag
  x_of: dict[int, Any]  # mark tag -> its activation operand (a jaxpr var)
  cuts: list[tuple[int, list[int]]]  # (eqn position, mark tags measured there)
  stages: list[tuple[list[Any], list[Any], list[Any], list[Any]]]  # (eqns, in, params, out)
  defs: dict[Any, Any]  # var -> defining eqn (batch-independent vars)
  resolve: Callable[[Any], Any]
  batch_vars: list[Any]


def _is_literal(v: Any) -> bool:
  return isinstance(v, jcore.Literal)


def plan(fn: Callable, params: Any, batch: Any, leaves: set[str]) -> tuple[_Plan, dict[str, str]]:
  """Traces ``fn(params, *batch)`` and cuts it before each group of measured matmuls.

  Returns:
    ``(plan, {leaf: why it cannot be measured block by block})``; leaves read
    where no matmul's input can be measured (inside a ``cond`` or
    ``while``, through a merged contracted axis) are left out of both.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  values = [x for _, x in flat]
  skipped: dict[str, str] = {}
  hidden: set[str] = set()  # read where no pass can measure it either
  matrices: list[Matrix] = []
  keys_seen: dict[str, int] = {}

  def mark(view, x, cw, cx, bw, bx):
    if view.leaf not in leaves:
      return x
    if bw:
      skipped[view.leaf] = "a matmul with batch axes reads it"
      return x
    layout = transform.rows_layout(view, cw, cx, x.ndim)
    if isinstance(layout, str):
      hidden.add(view.leaf)
      return x
    k_axes, perm = layout
    key = transform.key_of(view.leaf, k_axes, view.index)
    keys_seen[key] = keys_seen.get(key, 0) + 1
    matrices.append(Matrix(key, view.leaf, k_axes, tuple(view.index), perm, len(cw)))
    return _MARK.bind(x, tag=len(matrices) - 1)

  args = as_args(batch)
  b_leaves, b_tree = jax.tree_util.tree_flatten(args)
  dynamic = [x for x in b_leaves if transform.is_array(x)]

  def traced(pvals, dyn):
    full = list(b_leaves)
    it = iter(dyn)
    for i, x in enumerate(full):
      if transform.is_array(x):
        full[i] = next(it)
    a = jax.tree_util.tree_unflatten(b_tree, full)
    p = jax.tree_util.tree_unflatten(treedef, pvals)
    _, why = transform.with_marks(fn, p, a, leaves, mark)
    hidden.update(why)
    return []

  closed = jax.make_jaxpr(traced)(values, dynamic)
  for key, n in keys_seen.items():
    if n > 1:
      skipped.setdefault(key.split("|")[0], "several matmuls read the same matrix")
  p = _cut(closed, len(values), matrices, skipped, hidden)
  return p, {leaf: why for leaf, why in skipped.items() if leaf not in hidden}


def _cut(closed, n_params, matrices, skipped, hidden) -> _Plan:
  jaxpr = closed.jaxpr
  alias: dict[Any, Any] = {}

  def resolve(v):
    while not _is_literal(v) and v in alias:
      v = alias[v]
    return v

  batch_vars = list(jaxpr.invars[n_params:])
  dep = set(batch_vars)  # batch-dependent vars
  defpos: dict[Any, int] = {v: -1 for v in batch_vars}
  defs: dict[Any, Any] = {}
  mark_pos: dict[int, int] = {}
  x_of: dict[int, Any] = {}
  uses: dict[Any, list[int]] = {}
  for i, e in enumerate(jaxpr.eqns):
    ins = [resolve(v) for v in e.invars if not _is_literal(v)]
    if e.primitive is _MARK:
      alias[e.outvars[0]] = ins[0]
      tag = e.params["tag"]
      mark_pos[tag] = i
      x_of[tag] = ins[0]
    for v in ins:
      uses.setdefault(v, []).append(i)
    if e.primitive is _MARK:
      continue
    if any(v in dep for v in ins):
      dep.update(e.outvars)
      for v in e.outvars:
        defpos[v] = i
    else:
      for v in e.outvars:
        defs[v] = e
  staged = [
    t for t, m in enumerate(matrices) if m.leaf not in skipped and t in mark_pos and x_of[t] in dep
  ]
  for t, m in enumerate(matrices):
    if t not in staged:
      skipped.setdefault(m.leaf, "its matmul's other operand is not an activation")
  staged = [t for t in staged if matrices[t].leaf not in skipped]
  pending = sorted(staged, key=lambda t: mark_pos[t])
  cuts: list[tuple[int, list[int]]] = []
  while pending:
    c = mark_pos[pending[0]]
    group = [t for t in pending if defpos[x_of[t]] < c]
    pending = [t for t in pending if t not in group]
    cuts.append((c, group))
  last = cuts[-1][0] if cuts else 0
  # The activations each cut keeps: defined before it and read by a stage after it, or
  # measured at it or a later cut.
  measured_at = {x_of[t]: c for c, group in cuts for t in group}

  def boundary(c: int) -> list[Any]:
    out = []
    for v in dep:
      if defpos[v] >= c:
        continue
      if any(c <= u < last for u in uses.get(v, ())) or measured_at.get(v, -1) >= c:
        out.append(v)
    return sorted(out, key=lambda v: (defpos[v], batch_vars.index(v) if defpos[v] < 0 else 0))

  stages = []
  prev = 0
  b_in = boundary(0)
  for c, _ in cuts:
    eqns = [
      e
      for e in jaxpr.eqns[prev:c]
      if e.primitive is not _MARK and any(resolve(v) in dep for v in e.invars if not _is_literal(v))
    ]
    p_in: list[Any] = []
    for e in eqns:
      for v in e.invars:
        v = resolve(v)
        if not _is_literal(v) and v not in dep and v not in p_in:
          p_in.append(v)
    b_out = boundary(c)
    stages.append((eqns, b_in, p_in, b_out))
    b_in, prev = b_out, c
  return _Plan(
    jaxpr,
    closed.consts,
    n_params,
    matrices,
    x_of,
    cuts,
    stages,
    defs,
    resolve,
    batch_vars,
  )


class Compiled:
  """Each distinct stage jitted once (stages of identical blocks share it)."""

  def __init__(self) -> None:
    self.cache: dict[str, Callable] = {}

  def get(self, eqns, b_in, p_in, b_out, resolve) -> Callable:
    new = [e.replace(invars=[resolve(v) for v in e.invars]) for e in eqns]
    effects = frozenset().union(*(e.effects for e in new))
    n_in, n_out = len(b_in) + len(p_in), len(b_out)
    debug = jcore.DebugInfo(
      "sensorquant_jax stage", "blockwise", tuple(f"x{i}" for i in range(n_in)), ("",) * n_out
    )
    jaxpr = jcore.Jaxpr((), [*b_in, *p_in], list(b_out), new, effects, debug)
    sig = str(jaxpr) + repr([v.aval for v in (*b_in, *p_in)])
    if sig not in self.cache:
      self.cache[sig] = jax.jit(jcore.jaxpr_as_fun(jcore.ClosedJaxpr(jaxpr, ())))
    return self.cache[sig]


def _bind_param_eqn(e: Any, invals: Sequence[Any]) -> list[Any]:
  """One batch-independent equation, eagerly; a static slice as a dynamic one, so that
  every layer of a stack shares one compiled slice."""
  if e.primitive is lax.slice_p and not any(s != 1 for s in (e.params["strides"] or ())):
    (x,) = invals
    start = [jnp.int32(s) for s in e.params["start_indices"]]
    sizes = [
      hi - lo for lo, hi in zip(e.params["start_indices"], e.params["limit_indices"], strict=True)
    ]
    return [lax.dynamic_slice(x, start, sizes)]
  out = transform.bind(e, invals)
  return list(out) if e.primitive.multiple_results else [out]


def _param_values(p: _Plan, values: Sequence[Any], wanted: Sequence[Any]) -> list[Any]:
  """The batch-independent values a stage reads, from the current params."""
  invars = p.jaxpr.invars
  index = {v: i for i, v in enumerate(invars[: p.n_params])}
  consts = dict(zip(p.jaxpr.constvars, p.consts, strict=True))
  memo: dict[Any, Any] = {}

  def get(v):
    if _is_literal(v):
      return v.val
    if v in memo:
      return memo[v]
    if v in index:
      return values[index[v]]
    if v in consts:
      return consts[v]
    e = p.defs[v]
    outs = _bind_param_eqn(e, [get(p.resolve(u)) for u in e.invars])
    for o, x in zip(e.outvars, outs, strict=True):
      memo[o] = x
    return memo[v]

  return [get(v) for v in wanted]


def run(
  fn: Callable,
  params: Any,
  batches: Iterable[Any],
  leaves: set[str],
  reduce: Callable[[jax.Array], Stats],
  finalize: Finalize,
  *,
  label: str = "",
  progress: bool = False,
  compiled: Compiled | None = None,
  kept_bytes: list[int] | None = None,
) -> dict[str, str]:
  """Runs ``fn(params, *batch)`` over ``batches`` block by block, measuring ``leaves``.

  At each cut, every matrix of the group gets ``reduce(rows)`` summed over the
  batches (:func:`sensorquant_jax._src.transform.combine`), and
  ``finalize(group, rows_of, complete)`` is called with ``[(matrix, stats), ...]``,
  a function yielding a matrix's rows batch by batch (for a second reduction)
  and the leaves whose last matrix is in this group (sorted). It returns
  ``{leaf path: new float value}`` for the stages after it to read (the
  sequential mode), or ``None``.

  Args:
    fn: ``f(params, *batch)``.
    params: the float params.
    batches: model inputs (read once).
    leaves: the leaf paths to measure.
    reduce: rows ``[tokens, K]`` to statistics (jitted).
    finalize: see above.
    label: the method's name, for progress lines.
    progress: print one line per cut with the time left (stderr).
    compiled: the stage cache (a fresh one if ``None``).
    kept_bytes: if given, the bytes of activations kept at each cut are appended.

  Returns:
    ``{leaf: why it was not measured block by block}`` for the leaves that
    whole-model passes can still measure (the caller does so).
  """
  compiled = compiled if compiled is not None else Compiled()
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [path_str(p) for p, _ in flat]
  values = [x for _, x in flat]
  where = {p: i for i, p in enumerate(paths)}
  # One plan per batch shape; all of them are cut alike and run in lockstep.
  plans: list[_Plan] = []
  kept: list[list[list[Any]]] = []  # per plan, per batch: the activations at the last cut
  shapes: dict[Any, int] = {}
  skipped: dict[str, str] = {}
  for batch in batches:
    b_leaves = jax.tree_util.tree_leaves(as_args(batch))
    # arrays by shape and dtype; static values (flags) by value: they are baked into the trace
    sig = tuple(
      (np.shape(x), str(x.dtype)) if transform.is_array(x) else ("static", repr(x))
      for x in b_leaves
    )
    if sig not in shapes:
      p, why = plan(fn, params, batch, leaves)
      skipped.update(why)
      shapes[sig] = len(plans)
      plans.append(p)
      kept.append([])
    p = plans[shapes[sig]]
    dyn = [x for x in b_leaves if transform.is_array(x)]
    by_var = dict(zip(p.batch_vars, dyn, strict=True))
    kept[shapes[sig]].append([by_var[v] for v in p.stages[0][1]] if p.stages else [])
  if not plans:
    raise ValueError("no batches")
  groups = [[p.matrices[t].key for t in g] for _, g in plans[0].cuts]
  if any([[p.matrices[t].key for t in g] for _, g in p.cuts] != groups for p in plans[1:]):
    for m in plans[0].matrices:
      skipped.setdefault(m.leaf, "batches of different shapes cut the model differently")
    return skipped
  reduce_jit = jax.jit(
    lambda x, perm, n_k: reduce(transform.as_rows(x, perm, n_k)), static_argnums=(1, 2)
  )
  last_cut = {
    p0m.leaf: s
    for s, (_, g) in enumerate(plans[0].cuts)
    for p0m in (plans[0].matrices[t] for t in g)
  }
  start = time.perf_counter()
  n_cuts = len(groups)
  for s in range(n_cuts):
    for pi, p in enumerate(plans):
      eqns, b_in, p_in, b_out = p.stages[s]
      f = compiled.get(eqns, b_in, p_in, b_out, p.resolve)
      pv = _param_values(p, values, p_in)
      old, kept[pi] = kept[pi], []
      while old:  # each batch's inputs freed as its outputs arrive
        kept[pi].append(f(*old.pop(0), *pv))
    if kept_bytes is not None:
      kept_bytes.append(sum(int(x.nbytes) for per in kept for xs in per for x in xs))
    p0 = plans[0]
    tags = p0.cuts[s][1]

    def rows_of(m: Matrix, s=s) -> Iterator[jax.Array]:
      for pi, p in enumerate(plans):
        t = next(t for t in p.cuts[s][1] if p.matrices[t].key == m.key)
        at = p.stages[s][3].index(p.x_of[t])
        for xs in kept[pi]:
          yield transform.as_rows(xs[at], m.perm, m.n_k)

    group: list[tuple[Matrix, Stats]] = []
    shared: dict[tuple, Stats] = {}
    for t in tags:
      m = p0.matrices[t]
      total: Stats | None = None
      for pi, p in enumerate(plans):
        tp = next(u for u in p.cuts[s][1] if p.matrices[u].key == m.key)
        x = p.x_of[tp]
        key = (pi, x, m.perm, m.n_k)
        if key not in shared:
          at = p.stages[s][3].index(x)
          acc: Stats | None = None
          for xs in kept[pi]:
            got = reduce_jit(xs[at], m.perm, m.n_k)
            acc = (
              got if acc is None else {k: transform.combine(k, acc[k], v) for k, v in got.items()}
            )
          assert acc is not None
          shared[key] = acc
        got = shared[key]
        total = (
          got if total is None else {k: transform.combine(k, total[k], v) for k, v in got.items()}
        )
      assert total is not None
      group.append((m, total))
    # Sorted, not a set: every process must take the same steps in the same order (a
    # set of strings iterates in an order that differs between processes), or their
    # collectives pair up across different leaves.
    complete = sorted(leaf for leaf, c in last_cut.items() if c == s)
    new = finalize(group, rows_of, complete) or {}
    for leaf, value in new.items():
      values[where[leaf]] = value
    if progress:
      spent = time.perf_counter() - start
      left = spent / (s + 1) * (n_cuts - s - 1)
      print(
        f"{label}: block {s + 1}/{n_cuts} ({len(group)} matri{'ces' if len(group) > 1 else 'x'}) "
        f"{spent:.1f} s, about {left:.0f} s left",
        file=sys.stderr,
      )
  return skipped
