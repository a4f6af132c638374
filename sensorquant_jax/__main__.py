"""``python -m sensorquant_jax``: the ``sensorquant`` CLI."""

import sys

from sensorquant_jax.cli import main

sys.exit(main())
