"""Private implementation modules: import from ``sensorquant_jax`` instead."""
