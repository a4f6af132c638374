"""Mixed precision: the cheapest scheme per layer that meets an error budget."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sensorquant_jax._src import schemes
from sensorquant_jax._src.batching import as_args
from sensorquant_jax._src.quantize import MIN_SIZE, Rule, dequantize, is_float_array, quantize
from sensorquant_jax._src.report import error_stats
from sensorquant_jax._src.tree_paths import path_str

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
  """

  min_sqnr_db: float | None = None
  max_output_error: float | None = None
  max_accuracy_drop: float | None = None


@dataclasses.dataclass(frozen=True)
class Policy:
  """Per-leaf choices: ``rules`` for :func:`sensorquant_jax.quantize`, and why."""

  rules: tuple[Rule, ...]
  reasons: dict[str, str]
  choices: dict[str, str | None]


def auto_policy(
  params: Any,
  *,
  budget: Budget | float,
  model: Any = None,
  batches: Sequence[Any] | None = None,
  labels: Sequence[Any] | None = None,
  min_size: int = MIN_SIZE,
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
    model: Linen model (for the output-error budget).
    batches: model inputs (for the output budgets).
    labels: integer labels per batch (for the accuracy budget).
    min_size: as in ``quantize``.

  Returns:
    A :class:`Policy`; ``quantize(params, rules=policy.rules)`` applies it.
  """
  if not isinstance(budget, Budget):
    budget = Budget(min_sqnr_db=float(budget))
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
    w = np.asarray(x)
    opts: list[tuple[str | None, int, float]] = []
    for scheme in CANDIDATES:
      q = quantize({"w": w}, rules=[("^w$", scheme)])["w"]
      opts.append(
        (scheme, q.nbytes, error_stats(w, np.asarray(q.dequantize(jnp.float32)))["sqnr_db"])
      )
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
    ref_fn = jax.jit(lambda v, *a: model.apply(v, *a))
    refs = [np.asarray(ref_fn(params, *as_args(b))) for b in batches]
    base_acc = _accuracy(refs, labels) if labels is not None else None

    def misses():
      q = dequantize(quantize(params, rules=_rules(options, level), min_size=min_size))
      outs = [np.asarray(ref_fn(q, *as_args(b))) for b in batches]
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
    int(np.sum(o.argmax(-1) == np.asarray(lab))) for o, lab in zip(outputs, labels, strict=True)
  )
  return correct / max(sum(np.asarray(lab).size for lab in labels), 1)


def _rules(options, level) -> tuple[Rule, ...]:
  import re

  return tuple(Rule("^" + re.escape(p) + "$", options[p][level[p]][0]) for p in options)
