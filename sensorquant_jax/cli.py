"""The ``sensorquant`` command line (``main`` is the console script's entry point)."""

from sensorquant_jax._src.cli import EXIT_BAD_INPUT, build_parser, main

__all__ = ["EXIT_BAD_INPUT", "build_parser", "main"]
