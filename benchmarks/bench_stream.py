"""Streaming quantization of a large float checkpoint: size, time and peak RSS.

Writes a synthetic float32 ``.npz`` checkpoint leaf by leaf (default 64 leaves
of 8192x4096, 8.6 GB; never all in memory), then quantizes it disk to disk
with :func:`sensorquant_jax.stream.quantize_file` in a fresh process and
reports that process's peak RSS. Target: >= 8 GB on a 24 GB, 2-core machine
with peak RSS <= 3 GB.

Usage: ``python benchmarks/bench_stream.py [--leaves 64] [--rows 8192] [--cols 4096] [--dir D]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

_CHILD = r"""
import json, resource, sys, time
from sensorquant_jax import stream
t = time.perf_counter()
summary = stream.quantize_file(sys.argv[1], sys.argv[2], sys.argv[3])
summary["seconds"] = time.perf_counter() - t
summary["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(summary))
"""


def write_checkpoint(path: str, leaves: int, rows: int, cols: int) -> int:
  rng = np.random.default_rng(0)
  total = 0
  with zipfile.ZipFile(path, "w", allowZip64=True) as zf:
    for i in range(leaves):
      w = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
      with zf.open(f"params/layers_{i:03d}/kernel.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, w)
      with zf.open(f"params/layers_{i:03d}/bias.npy", "w") as f:
        np.lib.format.write_array(f, np.zeros(cols, np.float32))
      total += w.nbytes + cols * 4
      del w
  return total


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--leaves", type=int, default=64)
  ap.add_argument("--rows", type=int, default=8192)
  ap.add_argument("--cols", type=int, default=4096)
  ap.add_argument("--scheme", default="symmetric_per_channel_int8")
  ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
  args = ap.parse_args()
  scratch = args.dir or tempfile.mkdtemp(prefix="sq-stream-")
  os.makedirs(scratch, exist_ok=True)
  src = os.path.join(scratch, "float.npz")
  dst = os.path.join(scratch, "int8")
  try:
    t = time.perf_counter()
    size = write_checkpoint(src, args.leaves, args.rows, args.cols)
    print(f"wrote {src}: {size / 1e9:.2f} GB of float32 in {time.perf_counter() - t:.0f} s")
    proc = subprocess.run(
      [sys.executable, "-c", _CHILD, src, dst, args.scheme],
      capture_output=True,
      text=True,
      check=True,
    )
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    out_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs)
    print(
      f"quantized {s['quantized']} of {s['leaves']} leaves ({args.scheme}) in "
      f"{s['seconds']:.0f} s ({s['float_bytes'] / s['seconds'] / 1e6:.0f} MB/s of float input)"
    )
    print(f"float input {s['float_bytes'] / 1e9:.2f} GB -> checkpoint {out_bytes / 1e9:.2f} GB")
    print(f"peak RSS {s['peak_rss'] / 1e9:.2f} GB (target <= 3 GB)")
  finally:
    if args.dir is None:
      shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
  main()
