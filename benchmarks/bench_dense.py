"""Int8 dense layers vs float on CPU: float32, bf16, naive dequantize-then-dot, ours.

For each layer size and batch, a stack of ``--layers`` distinct layers (so the
weights stream from memory, not cache) is applied to one input; the printed
ratio is float32 time / variant time (higher is faster), medians of
``--repeats`` runs measured in the same process.

Variants: ``f32`` (x @ W), ``bf16`` (bf16 weights and activations), ``naive``
(x @ (q.astype(f32) * s), what a literal port does), ``w-only`` (our
weight-only op, native kernel, on a :func:`sensorquant_jax.pack`-ed kernel),
``w-only/unpacked`` (the same on the canonical QArray), ``w-only/xla`` (our
XLA-only path, 512-column tiles: what runs without a C++ compiler), ``w8a8``
(int8 x int8 -> int32 with per-token dynamic activation scales, native VNNI
kernel, packed), ``w8a8/xla`` (XLA's int8 dot), ``int4`` (``--int4-scheme``,
group 128, weight-only, ``--impl``: the native int4 kernel up to 16 rows) and
``int4/xla``. ``int4/int8`` is ``w-only`` time / ``int4`` time, and the last
column the GB/s of int4 weights (values and scales) streamed by ``int4``. Timing: two alternating
rounds over all variants, each a warm-up and consecutive timed calls
(``_timing.median_times``); medians.

Targets on a 2-core CPU: weight-only >= 3x float32 at batch 1 and 4, >= 1.5x
at 16-64; W8A8 >= 1.5x at 64-256; int4 >= 5x float32 at batch 1 and >= 1.3x
int8 weight-only at 1-4.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _timing import machine, median_times

import sensorquant_jax as sq
from sensorquant_jax._src.packed import DEFAULT_TILE  # the XLA path's tile (internal)


def _stack(layer_fn):
  @jax.jit
  def run(x, weights):
    return sum(jnp.tanh(layer_fn(x, w))[:, :8].sum() for w in weights)

  return run


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default="4096x4096,4096x16384")
  ap.add_argument("--batches", default="1,4,16,64,256")
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--scheme", default="symmetric_per_channel_int8")
  ap.add_argument("--impl", default="auto", choices=sq.IMPLS)
  ap.add_argument("--int4-scheme", default="symmetric_per_group_int4", choices=sq.INT4_SCHEMES)
  args = ap.parse_args()
  print(machine())
  print(
    f"jax {jax.__version__} on {jax.devices()[0].platform}, {args.layers} layers per stack, "
    f"scheme {args.scheme}, median of {args.repeats}; ratio = f32 time / variant time"
  )
  rng = np.random.default_rng(0)
  variants = {
    "f32": _stack(lambda x, w: x @ w),
    "bf16": _stack(lambda x, w: (x.astype(jnp.bfloat16) @ w).astype(jnp.float32)),
    "naive": _stack(lambda x, w: x @ (w.values.astype(jnp.float32) * w.scale)),
    "w-only": _stack(lambda x, w: sq.dense(x, w, impl=args.impl)),
    "w-only/unpacked": _stack(lambda x, w: sq.dense(x, w, impl=args.impl)),
    "w-only/xla": _stack(lambda x, w: sq.dense(x, w, impl="xla")),
    "w8a8": _stack(lambda x, w: sq.dense(x, w, mode="w8a8", impl=args.impl)),
    "w8a8/xla": _stack(lambda x, w: sq.dense(x, w, mode="w8a8", impl="xla")),
    "int4": _stack(lambda x, w: sq.dense(x, w, impl=args.impl)),
    "int4/xla": _stack(lambda x, w: sq.dense(x, w, impl="xla")),
  }
  for size in args.sizes.split(","):
    k, n = (int(v) for v in size.split("x"))
    floats = [
      jnp.asarray(rng.standard_normal((k, n), np.float32) * 0.02) for _ in range(args.layers)
    ]
    q = [sq.quantize_array(w, args.scheme) for w in floats]
    weights = {
      "f32": floats,
      "bf16": [w.astype(jnp.bfloat16) for w in floats],
      "naive": q,
      "w-only": [sq.pack(w) for w in q],
      "w-only/unpacked": q,
      "w-only/xla": [sq.pack(w, tile=DEFAULT_TILE) for w in q],
      "w8a8": [sq.pack(w) for w in q],
      "w8a8/xla": q,
      "int4": [sq.quantize_array(w, args.int4_scheme) for w in floats],
    }
    weights["int4/xla"] = weights["int4"]
    mb = {name: sum(sq.nbytes(w) for w in ws) / 2**20 for name, ws in weights.items()}
    print(
      f"\n{size}: weights per stack "
      + ", ".join(f"{k} {v:.0f} MiB" for k, v in mb.items() if k in ("f32", "bf16", "w-only"))
    )
    cols = " ".join(f"{name:>15s}" for name in variants)
    print(f"{'batch':>5s} {'f32 ms':>8s} {cols} {'int4/int8':>9s} {'int4 GB/s':>9s}")
    for b in (int(v) for v in args.batches.split(",")):
      x = jnp.asarray(rng.standard_normal((b, k), np.float32))
      reps = args.repeats if b <= 64 else max(3, args.repeats // 2)
      times = median_times({name: (fn, (x, weights[name])) for name, fn in variants.items()}, reps)
      base = times["f32"]
      ratios = " ".join(f"{base / t:15.2f}x" for t in times.values())
      gbs = sum(sq.nbytes(w) for w in weights["int4"]) / times["int4"] / 1e9
      print(
        f"{b:5d} {base * 1e3:8.1f} {ratios} {times['w-only'] / times['int4']:8.2f}x {gbs:9.1f}",
        flush=True,
      )


if __name__ == "__main__":
  main()
