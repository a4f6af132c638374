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


def median_times(calls: dict, repeats: int) -> dict:
  """Median wall time of each ``name: (fn, args)``, measured round-robin.

  One warm-up call each, then ``repeats`` rounds that time every variant once,
  so slow drifts of a shared machine hit all variants alike.
  """
  for fn, args in calls.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, (fn, args) in calls.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(ts) for name, ts in times.items()}
