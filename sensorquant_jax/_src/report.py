"""What quantization costs: per-layer errors and output fidelity, printed, saved and plotted."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sensorquant_jax._src import distributed, fileio
from sensorquant_jax._src.batching import as_args
from sensorquant_jax._src.convert import default_layer_name
from sensorquant_jax._src.distributed import to_host
from sensorquant_jax._src.options import Mode
from sensorquant_jax._src.qarray import is_qarray
from sensorquant_jax._src.quantize import nbytes
from sensorquant_jax._src.tree_paths import path_str


def error_stats(w: np.ndarray, dq: np.ndarray) -> dict[str, float]:
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
  mode: Mode = "weight_only",
  show: bool = True,
  json_path: str | os.PathLike | None = None,
  png_path: str | os.PathLike | None = None,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Per-layer quantization error and, given a model and batches, output fidelity.

  Args:
    params: the float tree.
    qparams: ``quantize(params, ...)``.
    model: optional Linen model, run float and via ``sq.apply(..., mode)``.
    batches: model inputs for the fidelity check (across processes, each
      process's own: batch i of every process forms one global batch).
    labels: integer labels per batch: adds accuracy (argmax) and its change.
    mode: inference mode for the quantized model.
    show: print the table (rich).
    json_path: also save the report as JSON.
    png_path: also save a bar plot of per-layer SQNR (needs matplotlib).
    overwrite: allow replacing an earlier report JSON or PNG at those paths
      (never another kind of file). Both are checked before any work.

  Returns:
    ``{"layers": [...], "totals": {...}, "output": {...} or None}``, on every
    process (only process 0 prints and writes the files).

  Raises:
    DestinationError: a path holds something we must not replace.
  """
  targets = {
    kind: fileio.check_file_destination(
      os.fspath(path), overwrite=overwrite, is_ours=is_ours, kind=kind
    )
    for kind, path, is_ours in (
      ("report JSON", json_path, _is_report_json),
      ("PNG image", png_path, _is_png),
    )
    if path is not None
  }
  floats = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  layers = []
  for p, q in jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_qarray)[0]:
    path = path_str(p)
    if not is_qarray(q) or path not in floats:
      continue
    w = to_host(floats[path])
    row = {
      "name": default_layer_name(path),
      "path": path,
      "shape": list(q.shape),
      "scheme": q.scheme,
      "bytes_before": int(w.size * w.dtype.itemsize),
      "bytes_after": int(q.nbytes),
    }
    row.update(error_stats(w, to_host(q.dequantize(jnp.float32))))
    layers.append(row)
  totals = {"bytes_before": nbytes(params), "bytes_after": nbytes(qparams)}
  output = None
  if model is not None and batches is not None:
    output = _fidelity(model, params, qparams, batches, labels, mode)
  result = {"layers": layers, "totals": totals, "output": output}
  if jax.process_index():  # across processes, process 0 prints and writes for all
    return result
  if show:
    _print(result)
  if "report JSON" in targets:
    text = json.dumps(result, indent=1).encode()
    fileio.write_file_atomic(targets["report JSON"], lambda f: f.write(text))
  if "PNG image" in targets:
    fig = _plot(result)
    fileio.write_file_atomic(targets["PNG image"], lambda f: fig.savefig(f, format="png", dpi=110))
  return result


def _is_report_json(path: str) -> bool:
  return fileio.file_starts_with(path, b"{", (b'"layers"',))


def _is_png(path: str) -> bool:
  return fileio.file_starts_with(path, b"\x89", (b"PNG\r\n",), limit=8)


def _fidelity(model, params, qparams, batches, labels, mode) -> dict[str, float]:
  from sensorquant_jax._src.linen import apply

  f_fn = jax.jit(lambda p, *a: model.apply(p, *a))
  q_fn = jax.jit(lambda q, *a: apply(model, q, *a, mode=mode))
  dot = nf = nq = 0.0
  max_err = 0.0
  correct_f = correct_q = n = 0
  for i, batch in enumerate(batches):
    args = as_args(distributed.process_local_batch(batch, params))
    yf = to_host(f_fn(params, *args)).astype(np.float64)
    yq = to_host(q_fn(qparams, *args)).astype(np.float64)
    dot += float(np.sum(yf * yq))
    nf += float(np.sum(yf * yf))
    nq += float(np.sum(yq * yq))
    max_err = max(max_err, float(np.max(np.abs(yf - yq))))
    if labels is not None:
      lab = to_host(distributed.process_local_batch(np.asarray(labels[i]), params))
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
  for col in (
    "layer",
    "shape",
    "scheme",
    "bytes",
    "quantized bytes",
    "SQNR dB",
    "max |err|",
    "rel L2",
  ):
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


def _plot(result) -> Any:
  """The per-layer SQNR bar plot as a matplotlib ``Figure``."""
  try:
    # A Figure with its own Agg canvas: no pyplot, no change to the user's backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError:
    raise ImportError(
      "the PNG plot needs matplotlib (pip install 'sensorquant_jax[plot]')"
    ) from None
  rows = result["layers"]
  fig = Figure(figsize=(max(6, 0.45 * len(rows) + 2), 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  names = [r["name"] for r in rows]
  values = [min(r["sqnr_db"], 120) for r in rows]
  ax.bar(range(len(rows)), values, color="#3b7dd8")
  ax.set_xticks(range(len(rows)), names, rotation=70, ha="right", fontsize=8)
  ax.set_ylabel("SQNR (dB)")
  ax.set_title("per-layer SQNR: " + ", ".join(sorted({r["scheme"] for r in rows})))
  fig.tight_layout()
  return fig
