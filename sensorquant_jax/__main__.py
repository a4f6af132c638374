"""``python -m sensorquant_jax``: the ``sensorquant`` CLI."""

import sys

from sensorquant_jax._src.cli import main

sys.exit(main())
