"""GPU check for the int8 ops: does XLA fuse the int8 convert into the GEMM, and timings.

Prints, for a 4096x4096 weight-only layer, the compiled temporaries against the
float32 weight size and whether a single fusion holds both the convert and the
dot; then stacks of 8 distinct layers (4096x4096, 4096x16384) at several
batches: float32, bf16, ours weight-only (bf16 activations), ours W8A8, and
int4 weight-only (group 128) through XLA and through the Pallas kernel
(``impl="pallas"``, whose results are first checked against XLA's), each as
bf16 time / variant time (higher is faster). Run on a GPU machine.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from _timing import median_time

import sensorquant_jax as sq


def fusion_report(k=4096, n=4096, rows=1):
  abstract = jax.eval_shape(
    lambda w: sq.quantize_array(w, "symmetric_per_channel_int8", check_finite=False),
    jax.ShapeDtypeStruct((k, n), jnp.float32),
  )
  for dtype in (jnp.float32, jnp.bfloat16):
    x = jax.ShapeDtypeStruct((rows, k), dtype)
    compiled = jax.jit(lambda x, q: sq.dense(x, q)).lower(x, abstract).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    text = compiled.as_text()
    fused = False
    for comp in re.split(r"\n(?=\S)", text):
      name = comp.split("(", 1)[0]
      if re.search(r"fus|triton|gemm", name) and " convert(" in comp and " dot(" in comp:
        fused = True  # one fused computation converts the int8 operand and multiplies
    kinds = sorted(set(re.findall(r"kind=(k\w+)", text)))
    custom = sorted(set(re.findall(r'"(__triton\w*|__cublas\w*)"', text)))
    print(
      f"weight-only {k}x{n}, {rows} row(s), x {np.dtype(dtype).name}: temp {temp / 2**20:.2f} MiB "
      f"= {temp / (k * n * 4):.1%} of the f32 weight; convert and dot in one computation: "
      f"{fused}; fusion kinds {kinds}; custom calls {custom}"
    )


def timings(layers=8, batches=(1, 16, 64, 256, 1024)):
  rng = np.random.default_rng(0)

  def stack(f):
    return jax.jit(
      lambda x, ws: sum(jnp.tanh(f(x, w).astype(jnp.float32))[:, :8].sum() for w in ws)
    )

  variants = {
    "f32": stack(lambda x, w: x.astype(jnp.float32) @ w),
    "bf16": stack(lambda x, w: x @ w),
    "w-only": stack(lambda x, w: sq.dense(x, w)),
    "w8a8": stack(lambda x, w: sq.dense(x, w, mode="w8a8")),
    "int4": stack(lambda x, w: sq.dense(x, w, impl="xla")),
    "int4/pl": stack(lambda x, w: sq.dense(x, w, impl="pallas")),
  }
  for k, n in ((4096, 4096), (4096, 16384)):
    f = [jnp.asarray(rng.standard_normal((k, n), np.float32) * 0.02) for _ in range(layers)]
    q = [sq.quantize_array(w, "symmetric_per_channel_int8") for w in f]
    q4 = [sq.quantize_array(w, "symmetric_per_group_int4") for w in f]
    weights = {"f32": f, "bf16": [w.astype(jnp.bfloat16) for w in f], "w-only": q, "w8a8": q}
    weights["int4"] = weights["int4/pl"] = q4
    x1 = jnp.asarray(rng.standard_normal((16, k)), jnp.bfloat16)
    ref = sq.dense(x1, q4[0], impl="xla").astype(jnp.float32)
    got = sq.dense(x1, q4[0], impl="pallas").astype(jnp.float32)
    err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
    print(f"pallas int4 vs XLA, {k}x{n}, 16 rows: max relative error {err:.2e}")
    print(f"\n{k}x{n} x{layers} layers; ratio = bf16 time / variant time")
    print(f"{'batch':>6s} {'bf16 us':>9s} " + " ".join(f"{v:>8s}" for v in variants))
    for b in batches:
      x = jnp.asarray(rng.standard_normal((b, k)), jnp.bfloat16)
      t = {name: median_time(fn, x, weights[name], repeats=20) for name, fn in variants.items()}
      print(
        f"{b:6d} {t['bf16'] * 1e6:9.1f} " + " ".join(f"{t['bf16'] / v:7.2f}x" for v in t.values()),
        flush=True,
      )
    del f, q, q4, weights


def exactness_report(fixture="tests/fixtures/oracle/per_tensor_cases.npz"):
  """How many Rust-oracle cases the per-tensor quantizer reproduces on each backend."""
  data = np.load(fixture)
  names = sorted({k.split("__")[0] for k in data.files})
  for device in {jax.devices()[0], jax.devices("cpu")[0]}:
    bad_cases, bad_q, bad_s = [], 0, 0
    with jax.default_device(device):
      for name in names:
        w, q, s = data[name + "__w"], data[name + "__q"], data[name + "__scale"]
        qa = sq.quantize_array(jax.device_put(w, device))
        dq = int(np.sum(np.asarray(qa.values) != q))
        ds = int(np.asarray(qa.scale, np.float32).reshape(()).view(np.uint32) != s.view(np.uint32))
        if dq or ds:
          bad_cases.append(f"{name}(q:{dq},scale:{ds})")
        bad_q += dq
        bad_s += ds
    print(
      f"exactness on {device.platform}: {len(names) - len(bad_cases)}/{len(names)} cases "
      f"bit-identical; {bad_q} int8 values and {bad_s} scales differ: {bad_cases}"
    )


if __name__ == "__main__":
  print(jax.devices())
  exactness_report()
  for rows in (1, 64):
    fusion_report(rows=rows)
  timings()
