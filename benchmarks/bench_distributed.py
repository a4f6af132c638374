"""Disk-to-disk quantization of a checkpoint larger than each process's memory, by N processes.

Writes a synthetic float32 ``.safetensors`` checkpoint leaf by leaf (default 32
kernels of 8192x4096, 4.3 GB; never all in memory), then quantizes it with
``sensorquant_jax.stream.quantize_file`` in 1 process and in 2 local processes
joined by ``jax.distributed`` (each reads, quantizes and writes its half of
every kernel), and reports for each run the wall time (process start to exit,
JAX start-up included), GB/s of float input and every process's peak RSS
against the memory cap. Both outputs are checked to be the same checkpoint.
The source was just written, so it is read from the page cache: this times
the quantization and the writes, not a disk.

Usage: ``python benchmarks/bench_distributed.py [--leaves 32] [--rows 8192] [--cols 4096]
[--cap-gb 1.0] [--dir D]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import machine  # noqa: E402

_CHILD = r"""
import json, os, resource, sys, time
from sensorquant_jax._src import distributed
if distributed.NUM_PROCESSES in os.environ:
  distributed.initialize()
import jax
from sensorquant_jax import stream
t = time.perf_counter()
summary = stream.quantize_file(sys.argv[1], sys.argv[2], sys.argv[3])
summary["seconds"] = time.perf_counter() - t
summary["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with open(os.path.join(sys.argv[4], f"rank_{jax.process_index()}.json"), "w") as f:
  json.dump(summary, f)
"""


def write_safetensors(path: str, leaves: int, rows: int, cols: int) -> int:
  """A float32 .safetensors file written one kernel at a time; returns its data bytes."""
  names = [f"layers.{i:03d}.kernel" for i in range(leaves)]
  size = rows * cols * 4
  header = {
    name: {"dtype": "F32", "shape": [rows, cols], "data_offsets": [i * size, (i + 1) * size]}
    for i, name in enumerate(names)
  }
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  rng = np.random.default_rng(0)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for _ in names:
      w = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
      f.write(w.tobytes())
      del w
  return leaves * size


def run(src: str, dst: str, scheme: str, processes: int, scratch: str) -> dict:
  from sensorquant_jax._src import distributed

  ranks = os.path.join(scratch, f"ranks_{processes}")
  os.makedirs(ranks, exist_ok=True)
  argv = ["-c", _CHILD, src, dst, scheme, ranks]
  start = time.perf_counter()
  if processes == 1:
    subprocess.run([sys.executable, *argv], check=True)
  else:
    code = distributed.launch(argv, processes, devices=1)
    if code:
      raise SystemExit(f"the {processes} processes failed (status {code})")
  wall = time.perf_counter() - start
  per = []
  for i in range(processes):
    with open(os.path.join(ranks, f"rank_{i}.json")) as f:
      per.append(json.load(f))
  return {"wall": wall, "ranks": per}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--leaves", type=int, default=32)
  ap.add_argument("--rows", type=int, default=8192)
  ap.add_argument("--cols", type=int, default=4096)
  ap.add_argument("--scheme", default="symmetric_per_channel_int8")
  ap.add_argument("--cap-gb", type=float, default=1.0, help="per-process memory cap")
  ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
  args = ap.parse_args()
  print(machine())
  scratch = args.dir or tempfile.mkdtemp(prefix="sq-distributed-")
  os.makedirs(scratch, exist_ok=True)
  src = os.path.join(scratch, "float.safetensors")
  try:
    t = time.perf_counter()
    size = write_safetensors(src, args.leaves, args.rows, args.cols)
    cap = args.cap_gb * 1e9
    print(
      f"wrote {src}: {size / 1e9:.2f} GB of float32 in {time.perf_counter() - t:.0f} s "
      f"({size / cap:.1f}x the {args.cap_gb:.2f} GB per-process cap)"
    )
    outs = {}
    for processes in (1, 2):
      dst = os.path.join(scratch, f"int8_{processes}")
      r = run(src, dst, args.scheme, processes, scratch)
      outs[processes] = dst
      rss = [p["peak_rss"] for p in r["ranks"]]
      print(
        f"{processes} process{'es' if processes > 1 else ''}: {r['wall']:.1f} s wall, "
        f"{size / r['wall'] / 1e9:.2f} GB/s of float input; peak RSS "
        + ", ".join(f"{x / 1e9:.2f} GB" for x in rss)
        + f" ({'under' if max(rss) <= cap else 'OVER'} the cap)"
      )
    import chex

    import sensorquant_jax as sq

    chex.assert_trees_all_equal(sq.restore(outs[1]), sq.restore(outs[2]))
    print("the two checkpoints are identical")
  finally:
    if args.dir is None:
      shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
  main()
