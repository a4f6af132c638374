"""Int8 dense layers: every implementation against float, and what ``impl="auto"`` picks.

For each layer size and batch, a stack of ``--layers`` distinct layers (so the
weights stream from memory, not cache) is applied to one input; each ratio is
baseline time / variant time (higher is faster), medians of ``--repeats`` runs
measured in the same process, alternating variants. The baseline is float32
on CPU and bf16 on GPU (the activation dtype there).

Columns, int8 weight-only (``wo``), W8A8 (``w8``), int4 weight-only
(``i4``, ``--int4-scheme``, group 128) and W4A8 (``w4``: the int4 kernels with
int8 activations, ``mode="w8a8"``), all on the QArrays ``sq.quantize``
makes: ``xla`` (``impl="xla"``), ``native`` (the C++ CPU kernels) or
``pallas`` (GPU; a column is left out where its kernel is not built, as
W8A8 without AVX-512 VNNI), and ``auto`` (the choice measured on this
machine, printed after the ratios: ``n`` native, ``x`` XLA, ``d`` XLA one
dot, ``t`` XLA tiles, ``g`` XLA int4 per-group products, ``q`` XLA int4
dequantized, ``p`` Pallas).
``best`` is the fastest other column of its mode over auto (time ratio; the
acceptance target is >= 0.9). ``wo/packed`` (CPU): ``auto`` on
``sq.pack``-ed kernels, the native kernel's streaming layout; ``i4/packed`` and
``w4/packed`` the same on ``sq.pack``-ed int4 kernels (64-column int4 tiles,
where the native packed int4 kernel is built). Where the CPU and OS have AMX
tiles, ``w8/native`` is the W8A8 kernel's AMX path and ``w8/vnni`` its VNNI (or
AVX2) path, and ``w4/p-vnni`` and ``w4/p-amx`` are W4A8 on packed int4 tiles on
each (auto's letter ``a``: AMX). ``GB/s`` is the
int8 weight bytes streamed per second by the fastest weight-only column at
batch 1.

Run with ``SENSORQUANT_TUNING=0`` to see the shipped fallbacks instead of the
measured choices (``auto`` then equals ``native`` on CPU, ``xla`` on GPU).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _timing import machine, median_times

import sensorquant_jax as sq
from sensorquant_jax._src import native, ops, packed, tuning

LETTERS = {
  "native": "n",
  "xla": "x",
  "xla_dot": "d",
  "xla_tiles": "t",
  "xla_groups": "g",
  "xla_dequantize": "q",
  "pallas": "p",
  "native_amx": "a",
}
TAGS = {"weight_only": "wo", "w8a8": "w8", "int4": "i4", "w4a8": "w4"}
MODES = {"weight_only": "weight_only", "w8a8": "w8a8", "int4": "weight_only", "w4a8": "w8a8"}
INT4_MODES = ("int4", "w4a8")  # on the int4 kernels


def _stack(layer_fn):
  @jax.jit
  def run(x, weights):
    return sum(jnp.tanh(layer_fn(x, w).astype(jnp.float32))[:, :8].sum() for w in weights)

  return run


def _native_isa(x, w, isa):
  """W8A8 (W4A8 on int4 kernels) on one instruction path of the native kernel."""
  m = packed.as_matrix(w, 1)
  run = ops.native_w4a8 if m.bits == 4 else ops.native_w8a8
  return run(*ops.quantize_activations(x), m, isa=isa)


def main():
  gpu = jax.default_backend() == "gpu"
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default="4096x4096,4096x14336,14336x4096")
  ap.add_argument("--batches", default="1,4,16,64,256,1024,4096" if gpu else "1,4,16,64,256")
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=6)
  ap.add_argument("--scheme", default="symmetric_per_channel_int8")
  ap.add_argument("--modes", default="weight_only,w8a8,int4,w4a8")
  ap.add_argument("--int4-scheme", default="symmetric_per_group_int4", choices=sq.INT4_SCHEMES)
  args = ap.parse_args()
  dtype = jnp.bfloat16 if gpu else jnp.float32
  kernel = "pallas" if gpu else "native"
  base = "bf16" if gpu else "f32"
  modes = args.modes.split(",")
  print(machine())
  print(
    f"jax {jax.__version__} on {jax.devices()[0].platform}, {args.layers} layers per stack, "
    f"scheme {args.scheme}, {jnp.dtype(dtype).name} activations, median of {args.repeats}; "
    f"ratio = {base} time / variant time; tuning {'on' if tuning.enabled() else 'off'}"
  )
  rng = np.random.default_rng(0)
  tag = TAGS
  variants = {"f32": _stack(lambda x, w: x.astype(jnp.float32) @ w)}
  if gpu:
    variants = {"bf16": _stack(lambda x, w: x @ w)}
  else:
    variants["bf16"] = _stack(lambda x, w: x.astype(jnp.bfloat16) @ w)
  targets = native.ffi_targets()
  have = {
    "weight_only": native.WO_TARGET,
    "w8a8": native.W8_TARGET,
    "int4": native.INT4_TARGET,
    "w4a8": native.W4A8_TARGET,
  }
  fp8 = args.scheme in sq.FP8_SCHEMES  # fp8 kernels run on XLA only
  for mode in modes:
    impls = ("xla", kernel, "auto") if gpu or have[mode] in targets else ("xla", "auto")
    if fp8 and mode not in INT4_MODES:
      impls = ("xla", "auto")
    for impl in impls:
      variants[f"{tag[mode]}/{impl}"] = _stack(
        lambda x, w, mode=mode, impl=impl: sq.dense(x, w, mode=MODES[mode], impl=impl)
      )
    if mode == "w8a8" and not gpu and not fp8 and native.w8a8_amx():
      # impl="native" runs AMX here; this column is the VNNI / AVX2 kernel it replaces
      variants["w8/vnni"] = _stack(lambda x, w: _native_isa(x, w, native.ISA_BEST))
  if not gpu and "weight_only" in modes and not fp8:  # sq.pack's layout, for the native kernel
    variants["wo/packed"] = _stack(lambda x, w: sq.dense(x, w, impl="auto"))
  if not gpu and native.INT4_PACKED_TARGET in targets:  # sq.pack's int4 tiles
    for mode in INT4_MODES:
      if mode in modes:
        variants[f"{tag[mode]}/packed"] = _stack(
          lambda x, w, mode=mode: sq.dense(x, w, mode=MODES[mode], impl="auto")
        )
    if "w4a8" in modes and native.w8a8_amx():  # packed int4 tiles on each W4A8 path
      variants["w4/p-vnni"] = _stack(lambda x, w: _native_isa(x, w, native.ISA_BEST))
      variants["w4/p-amx"] = _stack(lambda x, w: _native_isa(x, w, native.ISA_AMX))
  for size in args.sizes.split(","):
    k, n = (int(v) for v in size.split("x"))
    floats = [
      jnp.asarray(rng.standard_normal((k, n), np.float32) * 0.02) for _ in range(args.layers)
    ]
    q = [sq.quantize_array(w, args.scheme) for w in floats]
    weights = {"f32": floats, "bf16": [w.astype(jnp.bfloat16) for w in floats]}
    with_int4 = any(m in modes for m in INT4_MODES)
    int4 = [sq.quantize_array(w, args.int4_scheme) for w in floats] if with_int4 else []
    for name in variants:
      if name in ("i4/packed", "w4/packed", "w4/p-vnni", "w4/p-amx"):
        weights[name] = [sq.pack(w) for w in int4]
      elif name.startswith(("i4/", "w4/")):
        weights[name] = int4
      elif name == "wo/packed":
        weights[name] = [sq.pack(w) for w in q]
      elif "/" in name:
        weights[name] = q
    int8_bytes = sum(sq.nbytes(w) for w in q)
    print(
      f"\n{size}: weights per stack {sum(w.nbytes for w in floats) / 2**20:.0f} MiB float32, "
      f"{int8_bytes / 2**20:.0f} MiB int8"
    )
    cols = " ".join(f"{name:>10s}" for name in variants if name != base)
    best_cols = " ".join(f"{'best ' + tag[m]:>8s}" for m in modes)
    print(f"{'batch':>5s} {base + ' ms':>8s} {cols} {best_cols} {'picks':>6s} {'GB/s':>6s}")
    for b in (int(v) for v in args.batches.split(",")):
      x = jnp.asarray(rng.standard_normal((b, k), np.float32), dtype)
      reps = args.repeats if b <= 64 else max(3, args.repeats // 2)
      times = median_times({name: (fn, (x, weights[name])) for name, fn in variants.items()}, reps)
      t0 = times[base]
      ratios = " ".join(f"{t0 / t:9.2f}x" for name, t in times.items() if name != base)
      bests = []
      for m in modes:
        others = min(times.get(f"{tag[m]}/{v}", np.inf) for v in ("xla", kernel, "vnni"))
        bests.append(f"{others / times[f'{tag[m]}/auto']:7.2f}x")
      int8_modes = [MODES[m] for m in modes if m not in INT4_MODES]
      picks = list(sq.tune(q[0], batch_sizes=(b,), modes=int8_modes, dtype=dtype).values())
      if int4:
        int4_modes = [MODES[m] for m in modes if m in INT4_MODES]
        picks += list(sq.tune(int4[0], batch_sizes=(b,), modes=int4_modes, dtype=dtype).values())
      letters = "".join(LETTERS.get(v, "?") for v in picks)
      fastest_wo = min(times.get(f"wo/{v}", np.inf) for v in ("xla", kernel, "packed"))
      gbs = int8_bytes / fastest_wo / 1e9 if b == 1 and np.isfinite(fastest_wo) else float("nan")
      print(
        f"{b:5d} {t0 * 1e3:8.1f} {ratios} {' '.join(bests)} {letters:>6s} {gbs:6.1f}",
        flush=True,
      )


if __name__ == "__main__":
  main()
