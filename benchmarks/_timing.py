"""Shared timing helpers for the benchmark scripts."""

import statistics
import time

import jax


def median_time(fn, *args, repeats: int) -> float:
  """Median wall time of ``fn(*args)`` over ``repeats`` runs, after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def median_times(calls: dict, repeats: int, rounds: int = 2) -> dict:
  """Median wall time of each ``name: (fn, args)`` in steady state.

  Each of ``rounds`` rounds times every variant in turn: one warm-up call, then
  ``ceil(repeats / rounds)`` consecutive timed calls. Alternating rounds spread
  a shared machine's slow drifts over all variants; consecutive calls keep a
  variant from being timed right after another (one that allocates and frees
  hundreds of MB slows whatever runs next for a while).
  """
  per = -(-repeats // rounds)
  times = {name: [] for name in calls}
  for _ in range(rounds):
    for name, (fn, args) in calls.items():
      jax.block_until_ready(fn(*args))
      for _ in range(per):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[name].append(time.perf_counter() - t)
  return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> str:
  """The CPU model, core count and vector flags (or the accelerator's name)."""
  import os

  import jax

  dev = jax.devices()[0]
  if dev.platform != "cpu":
    return f"{dev.platform}: {dev.device_kind}"
  model, flags = "unknown CPU", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name") and model == "unknown CPU":
          model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
          flags = set(line.split(":", 1)[1].split())
  except OSError:
    pass
  wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
  return f"{model}, {os.cpu_count()} cores, flags: {' '.join(f for f in wanted if f in flags)}"
