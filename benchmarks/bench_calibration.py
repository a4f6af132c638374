"""Calibration time against depth: block by block against the passes from the input.

Llama-architecture decoders written with ``nn.Dense`` (``tests/llm_models.py``:
q, k, v, o, gate, up, down; RMSNorm, rotary embeddings), width 1024, MLP
2816, 8 heads, at several depths, with the same calibration tokens. For each
method and depth: wall time of the whole call (tracing and compilation
included, as a user sees it), time per layer, and the ratio to the passes
(``blockwise=False``, the earlier code) where those are run, in the same run.
Each call starts from cleared JAX caches. Peak RSS of the process is printed
at the end.

Run from the repository root::

  python benchmarks/bench_calibration.py                       # 8/16/32 layers, 16k tokens
  python benchmarks/bench_calibration.py --layers 4 --tokens 2048 --passes 4
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import warnings

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _timing import machine  # noqa: E402

import sensorquant_jax as sq  # noqa: E402
from tests import llm_models as M  # noqa: E402


def model_and_batches(layers: int, tokens: int, seq: int, batch: int, dim: int, hidden: int):
  cfg = M.LlamaConfig(vocab=8192, dim=dim, heads=8, hidden=hidden, layers=layers)
  model = M.Llama(cfg)
  n = max(tokens // (seq * batch), 1)
  batches = [
    jax.random.randint(jax.random.key(100 + i), (batch, seq), 0, cfg.vocab) for i in range(n)
  ]
  params = jax.jit(model.init)(jax.random.key(0), batches[0])
  return model, params, batches


def call(method: str, model, params, batches, blockwise: bool):
  if method == "gptq":
    return sq.gptq(model, params, batches, sq.INT4, blockwise=blockwise, progress=False)
  if method == "awq":
    return sq.awq(model, params, batches, sq.INT4, blockwise=blockwise, progress=False)
  if method == "smoothquant":
    return sq.smoothquant(model, params, batches, 0.5, blockwise=blockwise, progress=False)
  if method == "smoothquant-auto":
    return sq.smoothquant(model, params, batches, "auto", blockwise=blockwise, progress=False)
  if method == "calibrate":
    return sq.calibrate(model, params, batches)
  raise ValueError(method)


def timed(method, model, params, batches, blockwise) -> float:
  jax.clear_caches()
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the embedding lookup stays round-to-nearest
    out = call(method, model, params, batches, blockwise)
  jax.block_until_ready(out)
  return time.perf_counter() - start


def passes_estimate(model, params, batches, layers: int, sample: list[int]) -> tuple[float, str]:
  """The passes' GPTQ time (``blockwise=False``) at a depth too slow to run whole.

  Runs exactly what that code runs for the groups of the ``sample`` layers
  (the dequantized tree, one jitted statistics pass from the input per group,
  GPTQ of its layers), each timed, fits ``a + b * layer`` and sums it over
  every layer after the first, plus the first layer and the output layer's
  group as timed.
  """
  import numpy as np

  from sensorquant_jax._src import capture
  from sensorquant_jax._src import gptq as gptq_mod
  from sensorquant_jax._src.tree_paths import path_str

  jax.clear_caches()
  found = capture.layers(model, params, batches[0])
  rtn = sq.quantize(params, sq.INT4)
  flat = {
    path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(rtn, is_leaf=sq.is_qarray)[0]
  }
  floats = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  per: dict[int, float] = {}
  for group in capture.groups(found):
    name = group[0].path.split("/")[1]
    layer = int(name.split("_")[1]) if name.startswith("layers_") else -1
    if layer >= 0 and layer not in sample:
      continue
    start = time.perf_counter()
    variables = sq.dequantize(rtn)
    stats = capture.input_stats(model, lambda v=variables: v, iter(batches), group)
    for lay in group:
      h = stats[lay.path].xtx
      q = gptq_mod.quantize_layer(
        floats[lay.kernel], flat[lay.kernel], h, lay.k, damp=0.01, block=128, act_order=False
      )
      jax.block_until_ready(q)
    per[layer] = per.get(layer, 0.0) + time.perf_counter() - start
  # layer 0 carries the one-time compilations (as in the real run): taken as measured
  fit = [i for i in sample if i > 0]
  b, a = np.polyfit(np.array(fit, float), np.array([per[i] for i in fit]), 1)
  total = float(per[0] + sum(a + b * i for i in range(1, layers)) + per.get(-1, 0.0))
  how = ", ".join(f"layer {i}: {per[i]:.1f} s" for i in sample)
  return total, f"fit {a:.1f} + {b:.2f} s x layer ({how}; output layer {per.get(-1, 0.0):.1f} s)"


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
  ap.add_argument("--passes", type=int, nargs="*", default=[8], help="depths to time the passes at")
  ap.add_argument(
    "--estimate", type=int, nargs="*", default=[8, 32], help="depths to estimate GPTQ's passes at"
  )
  ap.add_argument("--tokens", type=int, default=16384)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--dim", type=int, default=1024)
  ap.add_argument("--hidden", type=int, default=2816)
  ap.add_argument(
    "--methods", nargs="+", default=["gptq", "awq", "smoothquant", "smoothquant-auto", "calibrate"]
  )
  a = ap.parse_args()
  print(f"machine: {machine()}; jax {jax.__version__}")
  print(
    f"Llama-style nn.Dense decoder, dim {a.dim}, MLP {a.hidden}, vocab 8192; "
    f"{a.tokens} calibration tokens in batches of {a.batch} x {a.seq}"
  )
  print(
    f"{'method':18} {'layers':>6} {'blockwise s':>12} {'s/layer':>8} {'passes s':>9} {'ratio':>6}"
  )
  for method in a.methods:
    for layers in a.layers:
      model, params, batches = model_and_batches(layers, a.tokens, a.seq, a.batch, a.dim, a.hidden)
      new = timed(method, model, params, batches, True)
      old = ""
      ratio = ""
      if method != "calibrate" and layers in (a.passes or []):
        t = timed(method, model, params, batches, False)
        old, ratio = f"{t:9.1f}", f"{t / new:6.1f}"
      print(
        f"{method:18} {layers:6d} {new:12.1f} {new / layers:8.2f} {old:>9} {ratio:>6}", flush=True
      )
      if method == "gptq" and layers in (a.estimate or []):
        sample = sorted({0, layers // 4, layers // 2, 3 * layers // 4, layers - 1})
        t, how = passes_estimate(model, params, batches, layers, sample)
        print(
          f"{'  passes, estimated':18} {layers:6d} {'':12} {'':8} {t:9.1f} {t / new:6.1f}  {how}",
          flush=True,
        )
      del model, params, batches
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"peak RSS {rss:.2f} GiB")


if __name__ == "__main__":
  main()
