"""GPTQ, AWQ, QAT, SmoothQuant and bits budgets on the bundled HAPT sensor encoder.

Calibration uses the windows of subjects 22-24 of the bundled held-out split;
accuracy and logit fidelity (mean cosine and relative L2 error against the
float logits) are measured on subjects 25-30, never used for calibration.

  python benchmarks/accuracy_hapt.py
"""

from __future__ import annotations

import time

import jax
import numpy as np

import sensorquant_jax as sq
from sensorquant_jax.example_model import load_example


def main():
  model, variables, split = load_example()
  cal = split["subject"] <= 24
  batches = [split["x"][cal][i : i + 256] for i in range(0, int(cal.sum()), 256)]
  x, y = split["x"][~cal], split["y"][~cal]
  print(
    f"bundled HAPT encoder: calibration {int(cal.sum())} windows (subjects 22-24), "
    f"evaluation {len(y)} windows (subjects 25-30); jax {jax.__version__} on "
    f"{jax.default_backend()}"
  )
  ref = np.asarray(jax.jit(model.apply)(variables, x), np.float64)
  base = float(np.mean(ref.argmax(-1) == y))
  print(f"  float32 accuracy {base:.2%}")
  fns = {}

  def row(name, q, seconds, mode="weight_only", act=None):
    key = (mode, act is not None)
    if key not in fns:
      fns[key] = jax.jit(lambda v, x, a: sq.apply(model, v, x, mode=mode, act_scales=a))
    got = np.asarray(fns[key](q, x, act), np.float64)
    cos = np.sum(got * ref, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    acc = float(np.mean(got.argmax(-1) == y))
    print(
      f"  {name:44} {acc:>7.2%} {100 * (acc - base):>+6.2f} {1 - cos.mean():>9.2e} "
      f"{rel:>8.4f} {seconds:>6.1f}"
    )

  print(f"  {'variant':44} {'acc':>7} {'change':>6} {'1-cos':>9} {'rel L2':>8} {'s':>6}")
  for scheme in sq.FP8_SCHEMES:  # weight-only, and W8A8-fp8 (per-token activation scales)
    t0 = time.perf_counter()
    q = sq.quantize(variables, scheme)
    seconds = time.perf_counter() - t0
    row(scheme, q, seconds)
    row(f"{scheme} W8A8-fp8", q, seconds, "w8a8")
  for scheme in ("symmetric_per_group_int4", "asymmetric_per_group_int4"):
    for method in ("rtn", "gptq", "awq, no clipping", "awq", "awq+gptq", "gptq + qat 300 steps"):
      t0 = time.perf_counter()
      if method == "rtn":
        q = sq.quantize(variables, scheme)
      elif method == "gptq":
        q = sq.gptq(model, variables, batches, scheme, progress=False)
      elif method.startswith("awq"):
        q = sq.awq(
          model,
          variables,
          batches,
          scheme,
          clip="no clipping" not in method,
          rounding="gptq" if method == "awq+gptq" else "nearest",
          progress=False,
        )
      else:  # from GPTQ, distilled from the float model's logits on the calibration windows
        start = sq.dequantize(sq.gptq(model, variables, batches, scheme, progress=False))
        tree = sq.distill(
          model, variables, batches, scheme, steps=300, loss="kl", start=start, progress=False
        )
        q = sq.qat_export(tree)
      row(f"{scheme} g128 {method}", q, time.perf_counter() - t0)
      if method in ("rtn", "gptq"):  # the same kernels with int8 activations (per token)
        row(f"{scheme} g128 {method} W4A8", q, 0.0, "w8a8")
  plain = sq.act_scales(sq.calibrate(model, variables, batches))
  for weights in ("symmetric_per_tensor_int8", "symmetric_per_channel_int8"):
    t0 = time.perf_counter()
    row(f"W8A8 static, {weights[10:]} w", sq.quantize(variables, weights), 0.0, "w8a8", plain)
    for alpha in (0.5, "auto"):
      t0 = time.perf_counter()
      smooth = sq.smoothquant(
        model, variables, batches, alpha=alpha, scheme=weights, progress=False
      )
      scales = sq.act_scales(sq.calibrate(model, smooth, batches))
      row(
        f"  + SmoothQuant alpha={alpha}",
        sq.quantize(smooth, weights),
        time.perf_counter() - t0,
        "w8a8",
        scales,
      )
  for method in ("rtn", "gptq"):
    for bits in (4.5, 5.0, 6.0):
      t0 = time.perf_counter()
      policy = sq.auto_policy(
        variables,
        budget=sq.Budget(max_bits_per_weight=bits),
        model=model,
        batches=batches,
        method=method,
      )
      if method == "rtn":
        q = sq.quantize(variables, rules=policy.rules)
      else:
        q = sq.gptq(model, variables, batches, rules=policy.rules, progress=False)
      row(
        f"auto policy {bits} bits/w ({method}): {policy.bits_per_weight:.3f}",
        q,
        time.perf_counter() - t0,
      )


if __name__ == "__main__":
  main()
