"""Test configuration: 8 virtual CPU devices (for sharding tests), hypothesis profile."""

import os

# Must happen before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
  "default",
  deadline=None,
  max_examples=60,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("default")
