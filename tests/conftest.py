"""Test configuration: 8 virtual CPU devices (for sharding tests), full-precision
float32 matmuls on accelerators, a compilation cache shared by the suite's processes,
hypothesis profiles."""

import os
import shutil
import tempfile

# Must happen before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

# impl="auto" takes the shipped fallbacks, not timings: results and test times
# do not depend on the machine's load (tests/test_tuning.py turns timing on).
os.environ.setdefault("SENSORQUANT_TUNING", "0")

# The two pytest-xdist workers, and the processes tests start, compile many of the same
# programs: they share XLA's executables through JAX's persistent cache, in a folder made
# for this run (the workers inherit it from the controller, which removes it at the end).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sensorquant-tests-xla-")
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
  _OWN_CACHE = None
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# A plugin may have imported JAX before this file set its environment.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
  "jax_persistent_cache_min_compile_time_secs",
  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)


def pytest_sessionfinish(session, exitstatus):
  if _OWN_CACHE is not None and "PYTEST_XDIST_WORKER" not in os.environ:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# GPUs default to TF32 for float32 matmuls (10-bit mantissas); the tests compare
# int8 ops with float references, so they ask for true float32 there.
if jax.default_backend() != "cpu":
  jax.config.update("jax_default_matmul_precision", "highest")

# The suite is deterministic (the same examples every run), so CI passes or fails
# on the code alone; HYPOTHESIS_PROFILE=explore searches fresh random examples.
_COMMON = dict(
  deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile("default", max_examples=30, derandomize=True, **_COMMON)
settings.register_profile("explore", max_examples=600, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
