"""The bundled HAPT sensor encoder: weights, held-out split and accuracy helper."""

import jax
import numpy as np

import sensorquant_jax as sq
from sensorquant_jax.example_model import ACTIVITIES, CHANNELS, WINDOW, accuracy, load_example


def test_bundled_model_split_and_accuracy():
  model, variables, split = load_example()
  x, y = split["x"], split["y"]
  assert x.shape == (1718, WINDOW, len(CHANNELS)) and x.dtype == np.float32
  assert set(np.unique(y)) <= set(range(len(ACTIVITIES)))
  assert set(np.unique(split["subject"])) <= set(range(22, 31))
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(variables))
  assert 230_000 < n_params < 240_000
  fn = jax.jit(lambda v: model.apply(variables, v))
  # accuracy() batches; the reference is one argmax over all logits.
  logits = np.concatenate([np.asarray(fn(x[i : i + 600])) for i in range(0, len(x), 600)])
  expect = float(np.mean(logits.argmax(-1) == y))
  assert accuracy(fn, x, y, batch=256) == expect
  assert abs(expect - 0.9593) < 0.005  # the README's float32 figure
  assert sq.nbytes(variables) == 4 * n_params
