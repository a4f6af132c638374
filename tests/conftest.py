"""Test configuration: 8 virtual CPU devices (for sharding tests), full-precision
float32 matmuls on accelerators, hypothesis profiles."""

import os

# Must happen before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

# impl="auto" takes the shipped fallbacks, not timings: results and test times
# do not depend on the machine's load (tests/test_tuning.py turns timing on).
os.environ.setdefault("SENSORQUANT_TUNING", "0")

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

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
