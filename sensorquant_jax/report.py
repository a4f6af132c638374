"""What quantization costs: per-layer errors, output fidelity, mixed precision under a budget."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sensorquant_jax import schemes
from sensorquant_jax.convert import default_layer_name
from sensorquant_jax.qarray import is_qarray
from sensorquant_jax.quantize import MIN_SIZE, Rule, _is_float_array, dequantize, path_str, quantize


def _error_stats(w: np.ndarray, dq: np.ndarray) -> dict[str, float]:
  w = np.asarray(w, np.float64)
  err = np.asarray(dq, np.float64) - w
  signal, noise = float(np.sum(w * w)), float(np.sum(err * err))
  sqnr = float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-300) / noise)
  return {
    "sqnr_db": sqnr,
    "max_abs_error": float(np.max(np.abs(err), initial=0.0)),
    "rel_l2_error": float(np.sqrt(noise / max(signal, 1e-300))),
  }


def report(
  params: Any,
  qparams: Any,
  *,
  model: Any = None,
  batches: Iterable[Any] | None = None,
  labels: Sequence[Any] | None = None,
  mode: str = "weight_only",
  show: bool = True,
  json_path: str | os.PathLike | None = None,
  png_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
  """Per-layer quantization error and, given a model and batches, output fidelity.

  Args:
    params: the float tree.
    qparams: ``quantize(params, ...)``.
    model: optional Linen model, run float and via ``sq.apply(..., mode)``.
    batches: model inputs for the fidelity check.
    labels: integer labels per batch: adds accuracy (argmax) and its change.
    mode: inference mode for the quantized model.
    show: print the table (rich).
    json_path: also save the report as JSON.
    png_path: also save a bar plot of per-layer SQNR (needs matplotlib).

  Returns:
    ``{"layers": [...], "totals": {...}, "output": {...} or None}``.
  """
  floats = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  layers = []
  for p, q in jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_qarray)[0]:
    path = path_str(p)
    if not is_qarray(q) or path not in floats:
      continue
    w = np.asarray(floats[path])
    row = {
      "name": default_layer_name(path),
      "path": path,
      "shape": list(q.shape),
      "scheme": q.scheme,
      "bytes_before": int(w.size * w.dtype.itemsize),
      "bytes_after": int(q.nbytes),
    }
    row.update(_error_stats(w, np.asarray(q.dequantize(jnp.float32))))
    layers.append(row)
  totals = {"bytes_before": _tree_bytes(params), "bytes_after": _tree_bytes(qparams)}
  output = None
  if model is not None and batches is not None:
    output = _fidelity(model, params, qparams, batches, labels, mode)
  result = {"layers": layers, "totals": totals, "output": output}
  if show:
    _print(result)
  if json_path is not None:
    with open(json_path, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  if png_path is not None:
    _plot(result, png_path)
  return result


def _tree_bytes(tree: Any) -> int:
  total = 0
  for x in jax.tree_util.tree_leaves(tree, is_leaf=is_qarray):
    total += x.nbytes if is_qarray(x) else int(getattr(x, "nbytes", 0))
  return total


def _fidelity(model, params, qparams, batches, labels, mode) -> dict[str, float]:
  from sensorquant_jax.linen import apply

  f_fn = jax.jit(lambda *a: model.apply(params, *a))
  q_fn = jax.jit(lambda q, *a: apply(model, q, *a, mode=mode))
  dot = nf = nq = 0.0
  max_err = 0.0
  correct_f = correct_q = n = 0
  for i, batch in enumerate(batches):
    args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    yf = np.asarray(f_fn(*args), np.float64)
    yq = np.asarray(q_fn(qparams, *args), np.float64)
    dot += float(np.sum(yf * yq))
    nf += float(np.sum(yf * yf))
    nq += float(np.sum(yq * yq))
    max_err = max(max_err, float(np.max(np.abs(yf - yq))))
    if labels is not None:
      lab = np.asarray(labels[i])
      correct_f += int(np.sum(yf.argmax(-1) == lab))
      correct_q += int(np.sum(yq.argmax(-1) == lab))
      n += lab.size
  out = {"cosine_similarity": dot / max(np.sqrt(nf * nq), 1e-300), "max_abs_error": max_err}
  if labels is not None and n:
    out.update(
      accuracy_float=correct_f / n,
      accuracy_quantized=correct_q / n,
      accuracy_delta=(correct_q - correct_f) / n,
    )
  return out


def _print(result) -> None:
  from rich.console import Console
  from rich.table import Table

  table = Table(title="quantization report")
  for col in ("layer", "shape", "scheme", "bytes", "int8 bytes", "SQNR dB", "max |err|", "rel L2"):
    table.add_column(col)
  for r in result["layers"]:
    table.add_row(
      r["name"],
      str(tuple(r["shape"])),
      r["scheme"],
      str(r["bytes_before"]),
      str(r["bytes_after"]),
      f"{r['sqnr_db']:.1f}",
      f"{r['max_abs_error']:.2e}",
      f"{r['rel_l2_error']:.2e}",
    )
  console = Console(width=160)
  console.print(table)
  t = result["totals"]
  console.print(
    f"params: {t['bytes_before']} -> {t['bytes_after']} bytes "
    f"({t['bytes_before'] / max(t['bytes_after'], 1):.2f}x smaller)"
  )
  if result["output"]:
    console.print("output: " + ", ".join(f"{k} {v:.4g}" for k, v in result["output"].items()))


def _plot(result, path) -> None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    raise ImportError("the PNG plot needs matplotlib (pip install matplotlib)") from None
  rows = result["layers"]
  fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows) + 2), 4.5))
  names = [r["name"] for r in rows]
  values = [min(r["sqnr_db"], 120) for r in rows]
  ax.bar(range(len(rows)), values, color="#3b7dd8")
  ax.set_xticks(range(len(rows)), names, rotation=70, ha="right", fontsize=8)
  ax.set_ylabel("SQNR (dB)")
  ax.set_title("per-layer SQNR: " + ", ".join(sorted({r["scheme"] for r in rows})))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------------------
# Mixed precision under a budget.
# ---------------------------------------------------------------------------

CANDIDATES = (schemes.PER_TENSOR, schemes.PER_CHANNEL, schemes.PER_BLOCK)


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
  """Chooses per layer among per-tensor, per-channel, per-block int8 and float.

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
    if not _is_float_array(x) or x.ndim < 2 or x.size < min_size:
      continue
    w = np.asarray(x)
    opts = []
    for scheme in CANDIDATES:
      q = quantize({"w": w}, rules=[("^w$", scheme)])["w"]
      opts.append(
        (scheme, q.nbytes, _error_stats(w, np.asarray(q.dequantize(jnp.float32)))["sqnr_db"])
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
    ref_fn = jax.jit(lambda v, *a: model.apply(v, *a))
    refs = [np.asarray(ref_fn(params, *_args(b))) for b in batches]
    base_acc = _accuracy(refs, labels) if labels is not None else None

    def misses():
      q = dequantize(quantize(params, rules=_rules(options, level), min_size=min_size))
      outs = [np.asarray(ref_fn(q, *_args(b))) for b in batches]
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


def _args(batch) -> tuple:
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _rules(options, level) -> tuple[Rule, ...]:
  import re

  return tuple(Rule("^" + re.escape(p) + "$", options[p][level[p]][0]) for p in options)
