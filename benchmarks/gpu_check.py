"""GPU check for the int8 ops: does XLA fuse the int8 convert into the GEMM, and timings.

Prints how many Rust-oracle per-tensor cases are bit-identical on the GPU
and, for a 4096x4096 weight-only layer, the compiled temporaries against the
float32 weight size and whether a single fusion holds both the convert and the
dot. Then, each step under a timeout: the Pallas and dispatcher tests compiled for
the GPU (``tests/test_pallas.py``, ``tests/test_tuning.py``),
``bench_dense.py`` (bf16, XLA int8, Pallas int8 and ``auto`` at batches 1 to
4096, GB/s at batch 1; then fp8 E4M3 weight-only and W8A8-fp8 against bf16) and
``bench_decode.py`` (the ~1B Llama-style decoder).
Run from the repository root with the project on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

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


def run(cmd: list[str], timeout: int) -> None:
  """One step of the check, cut off after ``timeout`` seconds (the lease is short)."""
  print(f"\n$ {' '.join(cmd)}", flush=True)
  try:
    subprocess.run(cmd, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    print(f"(stopped after {timeout} s)", flush=True)


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


def fp8_exactness_report():
  """Whether the fp8 schemes' scales and values on the default device equal XLA:CPU's
  (bit for bit; the CPU's are tested against ml_dtypes)."""
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((700, 520)) * rng.uniform(1e-4, 30, (1, 520))).astype(np.float32)
  for scheme in sq.FP8_SCHEMES:
    got = sq.quantize_array(jax.device_put(w, jax.devices()[0]), scheme)
    with jax.default_device(jax.devices("cpu")[0]):
      ref = sq.quantize_array(w, scheme)
    dv = int(np.sum(np.asarray(got.values).view(np.uint8) != np.asarray(ref.values).view(np.uint8)))
    ds = int(np.sum(np.asarray(got.scale) != np.asarray(ref.scale)))
    print(f"{scheme} on {jax.devices()[0].platform}: {dv} values and {ds} scales differ from CPU")


if __name__ == "__main__":
  print(jax.devices())
  exactness_report()
  fp8_exactness_report()
  for rows in (1, 64):
    fusion_report(rows=rows)
  py, here = sys.executable, os.path.dirname(os.path.abspath(__file__))
  # The Pallas kernels compiled for the GPU against XLA, then the dispatcher.
  run([py, "-m", "pytest", "-q", "-x", "tests/test_pallas.py", "tests/test_tuning.py"], 240)
  run([py, os.path.join(here, "bench_dense.py"), "--layers", "8", "--repeats", "10"], 420)
  # W8A8-fp8 (fp8 x fp8 dots, cuBLASLt fp8 GEMMs where XLA rewrites them) against bf16.
  fp8 = ["--scheme", "fp8_e4m3_per_channel", "--modes", "weight_only,w8a8", "--layers", "4"]
  run([py, os.path.join(here, "bench_dense.py"), *fp8, "--repeats", "5"], 300)
  run([py, os.path.join(here, "bench_decode.py"), "--repeats", "3"], 240)
