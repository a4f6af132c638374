"""Mixed precision: per layer, the scheme that meets an error budget or best fits a bits budget."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sensorquant_jax._src import awq as awq_mod
from sensorquant_jax._src import blockwise as blockwise_mod
from sensorquant_jax._src import capture, distributed, options, schemes, transform
from sensorquant_jax._src import gptq as gptq_mod
from sensorquant_jax._src.batching import as_args
from sensorquant_jax._src.distributed import to_host
from sensorquant_jax._src.options import Scheme
from sensorquant_jax._src.quantize import (
  MIN_SIZE,
  Rule,
  axes_from_uses,
  dequantize,
  is_float_array,
  quantize,
)
from sensorquant_jax._src.report import error_stats
from sensorquant_jax._src.tree_paths import path_str

Method = Literal["rtn", "gptq", "awq"]
METHODS: tuple[str, ...] = ("rtn", "gptq", "awq")

CANDIDATES = (schemes.INT4, schemes.PER_TENSOR, schemes.PER_CHANNEL, schemes.PER_BLOCK)
"""What :func:`auto_policy` weighs per layer (ordered by size when used): int4
per-group is the cheapest."""


@dataclasses.dataclass(frozen=True)
class Budget:
  """What a policy must meet.

  Attributes:
    min_sqnr_db: minimum SQNR of every quantized layer.
    max_output_error: maximum relative L2 error of the model output over the
      batches (needs a model and batches).
    max_accuracy_drop: maximum top-1 accuracy drop, as a fraction (0.005 is
      half a point), over the batches and ``labels`` (needs all three).
    max_bits_per_weight: average stored bits per weight (``8 * nbytes /
      values``, scales and zero points included) over the leaves the policy
      weighs; the policy then maximises fidelity within it (exclusive with
      the other fields).
  """

  min_sqnr_db: float | None = None
  max_output_error: float | None = None
  max_accuracy_drop: float | None = None
  max_bits_per_weight: float | None = None


@dataclasses.dataclass(frozen=True)
class Policy:
  """Per-leaf choices: ``rules`` for :func:`sensorquant_jax.quantize`, and why.

  ``method`` says how to apply the rules: ``"rtn"`` with ``quantize``,
  ``"gptq"``/``"awq"`` with :func:`sensorquant_jax.gptq` /
  :func:`sensorquant_jax.awq` on the same batches (their errors were
  weighed). ``bits_per_weight`` is the average the choices store (bits
  budgets only).
  """

  rules: tuple[Rule, ...]
  reasons: dict[str, str]
  choices: dict[str, str | None]
  method: Method = "rtn"
  bits_per_weight: float | None = None


def auto_policy(
  params: Any,
  *,
  budget: Budget | float,
  model: Any = None,
  batches: Sequence[Any] | None = None,
  labels: Sequence[Any] | None = None,
  min_size: int = MIN_SIZE,
  method: Method = "rtn",
  blockwise: bool = True,
) -> Policy:
  """Chooses per layer among int4 per-group, per-tensor, per-channel, per-block int8 and float.

  Each eligible leaf (the ones ``quantize`` selects by default) takes the
  smallest option whose SQNR meets ``budget.min_sqnr_db`` (float when none
  does). With ``budget.max_output_error`` or ``budget.max_accuracy_drop`` (and
  a model, batches, and for accuracy labels), layers are then upgraded one
  step at a time, lowest SQNR first, until the model meets them.

  Args:
    params: the float tree.
    budget: a :class:`Budget`, or a number meaning ``min_sqnr_db``.
    model: a Linen model or a function ``f(params, *batch)`` (for the output budgets;
      kernels are found at the op).
    batches: model inputs (for the output budgets).
    labels: integer labels per batch (for the accuracy budget).
    min_size: as in ``quantize``.
    method: with ``budget.max_bits_per_weight``: weigh the errors of
      ``"rtn"``, ``"gptq"`` or ``"awq"`` (these two need a model and batches).
    blockwise: with ``budget.max_bits_per_weight`` and a model, measure the
      matmuls' inputs in one run, block by block (see
      :func:`sensorquant_jax.gptq`); ``False``: in passes from the input.

  With ``budget.max_bits_per_weight``, every eligible leaf instead chooses
  among float, the int8 schemes and int4 groups of 32, 64 and 128 (both
  int4 schemes), so that the total error is least while the stored bits stay
  within the budget (a greedy walk up each leaf's error/size frontier, best
  error saved per byte first). A Dense kernel's error is its relative output
  error over the batches' real inputs (``tr(D^T X^T X D) / tr(W^T X^T X W)``)
  when a model and batches are given, else the weight's relative error.

  Returns:
    A :class:`Policy`; ``quantize(params, rules=policy.rules)`` applies it.
  """
  if not isinstance(budget, Budget):
    budget = Budget(min_sqnr_db=float(budget))
  if distributed.is_multiprocess():  # batch i of every process forms one global batch
    if batches is not None:
      batches = [distributed.process_local_batch(b, params) for b in batches]
    if labels is not None:
      labels = [distributed.process_local_batch(np.asarray(lab), params) for lab in labels]
  if budget.max_bits_per_weight is not None:
    others = (budget.min_sqnr_db, budget.max_output_error, budget.max_accuracy_drop)
    if any(x is not None for x in others):
      raise ValueError("max_bits_per_weight cannot be combined with the other budget fields")
    return bits_policy(
      params,
      budget.max_bits_per_weight,
      model=model,
      batches=batches,
      min_size=min_size,
      method=method,
      blockwise=blockwise,
    )
  if method != "rtn":
    raise ValueError("method is for bits-per-weight budgets")
  needs_model = budget.max_output_error is not None or budget.max_accuracy_drop is not None
  if needs_model and (model is None or batches is None):
    raise ValueError("an output-error or accuracy budget needs a model and batches")
  if budget.max_accuracy_drop is not None and labels is None:
    raise ValueError("an accuracy budget needs labels")
  options: dict[str, list[tuple[str | None, int, float]]] = {}
  for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = path_str(p)
    if not is_float_array(x) or x.ndim < 2 or x.size < min_size:
      continue
    w = to_host(x)
    opts: list[tuple[str | None, int, float]] = []
    for scheme in CANDIDATES:
      q = quantize({"w": w}, rules=[("^w$", scheme)])["w"]
      opts.append((scheme, q.nbytes, error_stats(w, to_host(q.dequantize(jnp.float32)))["sqnr_db"]))
    opts.sort(key=lambda o: o[1])
    opts.append((None, int(w.nbytes), float("inf")))
    options[path] = opts
  level: dict[str, int] = {}
  reasons: dict[str, str] = {}
  for path, opts in options.items():
    level[path] = len(opts) - 1
    for i, (_scheme, _, sqnr) in enumerate(opts):
      if budget.min_sqnr_db is None or sqnr >= budget.min_sqnr_db:
        level[path] = i
        break
    tried = "; ".join(
      f"{s or 'float'} {q:.1f} dB" for s, _, q in opts[: level[path] + 1] if s is not None
    )
    chosen = opts[level[path]][0] or "float"
    reasons[path] = (
      f"{chosen}: smallest meeting {budget.min_sqnr_db} dB ({tried})"
      if budget.min_sqnr_db is not None
      else f"{chosen}: smallest"
    )
  if needs_model:
    assert batches is not None  # checked above
    ref_fn = jax.jit(gptq_mod.as_function(model))
    refs = [to_host(ref_fn(params, *as_args(b))) for b in batches]
    base_acc = _accuracy(refs, labels) if labels is not None else None

    def misses():
      q = dequantize(quantize(params, rules=_rules(options, level), min_size=min_size))
      outs = [to_host(ref_fn(q, *as_args(b))) for b in batches]
      why = []
      if budget.max_output_error is not None:
        num = sum(float(np.sum((y - r) ** 2)) for y, r in zip(outs, refs, strict=True))
        den = sum(float(np.sum(r**2)) for r in refs)
        err = float(np.sqrt(num / max(den, 1e-300)))
        if err > budget.max_output_error:
          why.append(f"output error {err:.3g} > {budget.max_output_error}")
      if budget.max_accuracy_drop is not None:
        drop = base_acc - _accuracy(outs, labels)
        if drop > budget.max_accuracy_drop:
          why.append(f"accuracy drop {drop:.4f} > {budget.max_accuracy_drop}")
      return "; ".join(why)

    why = misses()
    while why:
      upgradable = [p for p in options if level[p] < len(options[p]) - 1]
      if not upgradable:
        break
      worst = min(upgradable, key=lambda p: options[p][level[p]][2])
      level[worst] += 1
      reasons[worst] += f"; upgraded to {options[worst][level[worst]][0] or 'float'} ({why})"
      why = misses()
  choices = {p: options[p][level[p]][0] for p in options}
  return Policy(_rules(options, level), reasons, choices)


def _accuracy(outputs, labels) -> float:
  correct = sum(
    int(np.sum(o.argmax(-1) == to_host(lab))) for o, lab in zip(outputs, labels, strict=True)
  )
  return correct / max(sum(int(np.size(lab)) for lab in labels), 1)


def _rules(options, level) -> tuple[Rule, ...]:
  return tuple(Rule("^" + re.escape(p) + "$", options[p][level[p]][0]) for p in options)


BITS_CANDIDATES: tuple[tuple[Scheme, int | None], ...] = (
  (schemes.INT4, 32),
  (schemes.INT4, 64),
  (schemes.INT4, 128),
  (schemes.ASYMMETRIC_INT4, 32),
  (schemes.ASYMMETRIC_INT4, 64),
  (schemes.ASYMMETRIC_INT4, 128),
  (schemes.PER_TENSOR, None),
  (schemes.PER_CHANNEL, None),
  (schemes.ASYMMETRIC_PER_CHANNEL, None),
  (schemes.PER_BLOCK, None),
)
"""What a bits-per-weight budget weighs per leaf, besides float."""


@dataclasses.dataclass(frozen=True)
class _Option:
  scheme: Scheme | None  # None: float
  block_size: int | None
  axes: tuple[int, ...] | None
  nbytes: int
  error: float

  @property
  def label(self) -> str:
    if self.scheme is None:
      return "float"
    group = f" g{self.block_size}" if self.block_size else ""
    axis = f" axis {self.axes[0]}" if self.block_size is not None and self.axes else ""
    return self.scheme + group + axis


def _candidates(ndim: int, leaf: str):
  """``(scheme, block_size, axes)`` per candidate; block schemes also try each
  other input axis of a kernel of rank 3 or more (a DenseGeneral out-projection
  ``[heads, head_dim, out]`` groups best along ``head_dim``)."""
  for scheme, block in BITS_CANDIDATES:
    yield scheme, block, None
    if scheme in options.BLOCK_SCHEMES and ndim >= 3 and leaf != "embedding":
      default = schemes.default_axes(scheme, ndim, leaf)
      for a in range(ndim - 1):
        if default is None or (a,) != default:
          yield scheme, block, (a,)


def _op_level_error(w, qa, entries, method) -> tuple[Any, float] | None:
  """``qa`` after GPTQ or AWQ, and its mean output error over the matrices found at the op."""
  wf = w.astype(jnp.float32)
  if method == "gptq":
    new, _, err = gptq_mod.gptq_entries(wf, qa, [(k, ix, st["xtx"]) for k, ix, st in entries])
    return new, float(err)
  if method == "awq":
    got = awq_mod.entry_spec(qa, entries[0][0], entries[0][1])
    if got is None or (got[1] > 1 and len(entries) > 1):
      return None
    new, _, err = awq_mod.awq_entries(wf, qa, entries, got[0], n_in=got[1])
    return new, float(err)
  total = 0.0
  for k_axes, index, st in entries:
    wm, _ = gptq_mod.sub_matrix(wf, k_axes, index)
    qm, _ = gptq_mod.sub_matrix(qa.dequantize(jnp.float32), k_axes, index)
    total += gptq_mod.output_error(wm, qm, st["xtx"])
  return qa, total / len(entries)


def _leaf_options(path, x, entries, h_layer, uses, method) -> list[_Option]:
  """Every candidate for one leaf: its stored bytes and error (output error over the
  matrices' inputs when measured, else the weight's)."""
  w = jnp.asarray(x)
  opts = [_Option(None, None, None, int(x.nbytes), 0.0)]
  leaf = path.rsplit("/", 1)[-1]
  candidates = list(_candidates(w.ndim, leaf))
  if entries is not None:  # and the axes read from the computation, as quantize(like=...) does
    candidates += [
      (sch, blk, axes_from_uses(sch, tuple(w.shape), uses.get(path, ())))
      for sch, blk, _ in dict.fromkeys((c[0], c[1], None) for c in candidates)
    ]
  seen = set()
  for scheme, block, axes in candidates:
    # Rules get the axes resolved for this leaf's real name (embeddings differ).
    try:
      axes = schemes.resolve(schemes.Spec(scheme, axes, block), w.ndim, leaf).axes
      if (scheme, block, axes) in seen:
        continue
      seen.add((scheme, block, axes))
      qa = quantize({"w": w}, rules=[Rule("^w$", scheme, axes, block)])["w"]
    except ValueError:  # e.g. a group size that does not fit this leaf
      continue
    if entries is not None:
      got = _op_level_error(w, qa, entries, method)
      if got is None:
        continue
      qa, err = got
    elif h_layer is None:
      dq = to_host(qa.dequantize(jnp.float32))
      err = error_stats(to_host(x), dq)["rel_l2_error"] ** 2
    else:
      h, act, layer = h_layer
      if method == "gptq":
        qa = gptq_mod.quantize_layer(w, qa, h, layer.k, damp=0.01, block=128, act_order=False)
      elif method == "awq":
        spec = schemes.resolve(schemes.Spec(scheme, axes, block), w.ndim, leaf)
        qa, _ = awq_mod.quantize_layer(w, h, act, spec, len(layer.axis), grid=20)
      err = gptq_mod.output_error(gptq_mod.matrix(w, layer.k), gptq_mod.matrix(qa, layer.k), h)
    opts.append(_Option(scheme, block, axes, int(qa.nbytes), float(err)))
  return opts


def bits_policy(
  params: Any,
  max_bits: float,
  *,
  model: Any = None,
  batches: Sequence[Any] | None = None,
  min_size: int = MIN_SIZE,
  method: Method = "rtn",
  blockwise: bool = True,
) -> Policy:
  """The least-error choice per leaf within ``max_bits`` stored bits per weight (the
  matmuls' inputs measured block by block, or in passes with ``blockwise=False``)."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
  if method != "rtn" and (model is None or batches is None):
    raise ValueError(f"method {method!r} needs a model and batches")
  if not max_bits > 0:
    raise ValueError(f"max_bits_per_weight must be positive, got {max_bits}")
  flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  eligible = {
    p: x for p, x in flat.items() if is_float_array(x) and x.ndim >= 2 and x.size >= min_size
  }
  if not eligible:
    raise ValueError("no leaf to quantize (all are small, 1-D or not floating)")
  hessians: dict[str, tuple[Any, Any, capture.Layer]] = {}
  op_entries: dict[str, list[tuple]] = {}
  uses: dict[str, list] = {}
  options: dict[str, list[_Option]] = {}
  measured: set[str] = set()
  if model is not None and batches is not None:
    fn = gptq_mod.as_function(model)
    uses = transform.consumers(fn, params, *as_args(batches[0]))
    if blockwise:
      pending: dict[str, list[tuple]] = {}

      def finalize(group, rows_of, complete):
        for m, st in group:
          pending.setdefault(m.leaf, []).append((m.k_axes, m.index, st))
        for leaf in complete:
          got = pending.pop(leaf, [])
          if len({k for k, _, _ in got}) == 1:
            options[leaf] = _leaf_options(leaf, eligible[leaf], got, None, uses, method)
            measured.add(leaf)

      passes = blockwise_mod.run(fn, params, batches, set(eligible), awq_mod.moments, finalize)
      gptq_mod.note_passes("auto_policy", passes)
      rest = sorted(set(eligible) - measured)
    else:
      modules = capture.layers(model, params, batches[0]) if isinstance(model, nn.Module) else []
      found = [layer for layer in modules if layer.kernel in eligible]
      for group in capture.passes(found, capture.xtx_bytes):
        stats = capture.input_stats(model, lambda: params, iter(batches), group)
        for layer in group:
          st = stats[layer.path]
          hessians[layer.kernel] = (st.xtx, st.abs_mean, layer)
      rest = sorted(set(eligible) - set(hessians))
    if rest:  # kernels found at the op, in whole-model passes: one set of statistics per matrix
      op_stats, _ = gptq_mod.op_level_stats(
        model, params, lambda: iter(batches), rest, awq_mod.moments
      )
      op_entries = {
        leaf: got
        for leaf, got in gptq_mod.by_leaf_of(op_stats).items()
        if len({k for k, _, _ in got}) == 1
      }
    measured |= set(hessians) | set(op_entries)
    unmeasured = sorted(set(eligible) - measured)
    if unmeasured:
      warnings.warn(
        "auto_policy: no matmul reads these as a whole; weight error (and round-to-nearest) "
        f"for {', '.join(unmeasured)}",
        stacklevel=3,
      )
  for path, x in eligible.items():
    if path not in options:
      options[path] = _leaf_options(path, x, op_entries.get(path), hessians.get(path), uses, method)
  options = {p: options[p] for p in eligible}  # the tree's order, however measured
  total_values = sum(int(x.size) for x in eligible.values())
  limit = max_bits * total_values / 8  # bytes
  chosen = {p: min(opts, key=lambda o: (o.nbytes, o.error)) for p, opts in options.items()}
  used = sum(o.nbytes for o in chosen.values())
  if used > limit:
    raise ValueError(
      f"max_bits_per_weight={max_bits} is below the smallest choice, "
      f"{8 * used / total_values:.3f} bits per weight"
    )
  while True:  # best error saved per extra byte first, while it fits
    best, best_gain = None, 0.0
    for p, opts in options.items():
      cur = chosen[p]
      for o in opts:
        extra = o.nbytes - cur.nbytes
        saved = cur.error - o.error
        if saved <= 0 or used + extra > limit:
          continue
        gain = saved / max(extra, 1e-9) if extra > 0 else float("inf")
        if gain > best_gain:
          best, best_gain = (p, o), gain
    if best is None:
      break
    p, o = best
    used += o.nbytes - chosen[p].nbytes
    chosen[p] = o
  bits = 8 * used / total_values
  reasons = {}
  for p, o in chosen.items():
    kind = "output error" if p in measured else "weight error"
    tried = ", ".join(
      f"{x.label} {8 * x.nbytes / eligible[p].size:.2f}b {x.error:.2g}"
      for x in sorted(options[p], key=lambda x: x.nbytes)
    )
    reasons[p] = (
      f"{o.label}: {8 * o.nbytes / eligible[p].size:.2f} bits/weight, {kind} {o.error:.3g} "
      f"({method}; within {max_bits} bits/weight overall, {bits:.3f} used; options: {tried})"
    )
  rules = tuple(
    Rule("^" + re.escape(p) + "$", o.scheme, o.axes, o.block_size) for p, o in chosen.items()
  )
  return Policy(
    rules, reasons, {p: o.scheme for p, o in chosen.items()}, method=method, bits_per_weight=bits
  )
