"""Manifest save/load throughput and peak memory, against Python's json module.

A single-layer manifest of 16M weights (about 212 MB of JSON, as the Rust
oracle's ``time-quantize 16777216`` writes). Prints MB/s (median of
``--repeats`` runs) for our ``save``/``load`` and for ``json.dumps``/``json.loads``
of the same document, plus the peak RSS added by one ``load`` (measured in a
fresh process with the kernel's high-water mark reset just before loading).

Targets on a 2-core machine: save >= 450 MB/s, load >= 450 MB/s, load peak
<= 1.5x the file size. Usage: ``python benchmarks/bench_manifest.py [--n N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from sensorquant_jax import manifest as m


def synthetic_weights(n: int) -> np.ndarray:
  """splitmix64 values in [-1, 1), as the Rust oracle's time-quantize makes them."""
  state = np.uint64(0x9E3779B97F4A7C15)
  idx = np.arange(1, n + 1, dtype=np.uint64)
  with np.errstate(over="ignore"):
    z = state + idx * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
  u = (z >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)
  return np.float32(2) * u - np.float32(1)


def _median_time(fn, repeats, setup=None):
  times = []
  for _ in range(repeats):
    if setup is not None:
      setup()
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


_PEAK_CHILD = r"""
import sys, time
from sensorquant_jax import manifest as m
def hwm():
  for line in open("/proc/self/status"):
    if line.startswith(("VmHWM", "VmRSS")):
      yield line.split()[0], int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
  f.write("5")  # reset the peak-RSS high-water mark
base = dict(hwm())["VmRSS:"]
model = m.QuantizedModel.load(sys.argv[1])
peak = dict(hwm())["VmHWM:"]
print(peak - base)
"""


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--n", type=int, default=16_777_216)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--skip-json", action="store_true")
  args = ap.parse_args()

  w = synthetic_weights(args.n)
  t = time.perf_counter()
  model = m.quantize_model_weights("{}", [("layer", w, [args.n // 4096, 4096], None)])
  quant_s = time.perf_counter() - t
  print(f"quantize (numpy port of from_f32): {w.nbytes / quant_s / 1e9:.2f} GB/s of float32")
  print(f"scale {model.layers[0].scale}, sum_q {int(model.layers[0].weights_i8.sum())}")

  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "m.json")

    def fresh():
      if os.path.exists(path):
        os.unlink(path)

    save_s = _median_time(lambda: model.save(path), args.repeats, fresh)
    save_nofsync_s = _median_time(lambda: model.save(path, fsync=False), args.repeats, fresh)
    model.save(path, overwrite=True)
    save_over_s = _median_time(lambda: model.save(path, fsync=False, overwrite=True), args.repeats)
    size = os.path.getsize(path)
    load_s = _median_time(lambda: m.QuantizedModel.load(path), args.repeats)
    loaded = m.QuantizedModel.load(path)
    assert loaded == model
    proc = subprocess.run(
      [sys.executable, "-c", _PEAK_CHILD, path], capture_output=True, text=True, check=True
    )
    peak = int(proc.stdout.strip())
    rows = [
      ("ours: save new file (fsync)", save_s),
      ("ours: save new file (no fsync)", save_nofsync_s),
      ("ours: save over old (no fsync)", save_over_s),
      ("ours: load (validated)", load_s),
    ]
    if not args.skip_json:
      with open(path) as f:
        text = f.read()
      obj = json.loads(text)
      rows.append(("json.loads", _median_time(lambda: json.loads(text), args.repeats)))
      rows.append(
        ("json.dumps(indent=2)", _median_time(lambda: json.dumps(obj, indent=2), args.repeats))
      )
      del obj, text

  print(f"\nfile: {size / 1e6:.1f} MB, {args.n} weights, median of {args.repeats}")
  print(f"{'what':32s} {'seconds':>8s} {'MB/s':>8s}")
  for name, s in rows:
    print(f"{name:32s} {s:8.3f} {size / s / 1e6:8.0f}")
  print(
    f"\npeak RSS added by one load: {peak / 1e6:.1f} MB = {peak / size:.2f}x the file "
    "(target <= 1.5x)"
  )
  print("Rust's save does not fsync: compare with the no-fsync rows. Replacing an old file")
  print("adds the kernel's cost of dropping its cached pages (Rust's fs::write truncates: same).")
  print("targets: save >= 450 MB/s, load >= 450 MB/s (Rust module: ~450 save, ~500 load)")


if __name__ == "__main__":
  main()
