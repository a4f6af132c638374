"""Tree helpers shared by the checkpoint and streaming tests."""

import jax
import numpy as np

import sensorquant_jax as sq


def assert_same_qtree(a, b):
  la = jax.tree_util.tree_leaves(a, is_leaf=sq.is_qarray)
  lb = jax.tree_util.tree_leaves(b, is_leaf=sq.is_qarray)
  assert len(la) == len(lb)
  for x, y in zip(la, lb, strict=True):
    assert type(x) is type(y)
    if sq.is_qarray(x):
      assert (x.scheme, x.axes, x.block_size, np.dtype(x.dtype)) == (
        y.scheme,
        y.axes,
        y.block_size,
        np.dtype(y.dtype),
      )
      np.testing.assert_array_equal(np.asarray(x.values), np.asarray(y.values))
      np.testing.assert_array_equal(np.asarray(x.scale), np.asarray(y.scale))
      if x.zero_point is not None:
        np.testing.assert_array_equal(np.asarray(x.zero_point), np.asarray(y.zero_point))
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def float_tree():
  rng = np.random.default_rng(0)
  return {
    "params": {
      "dense": {
        "kernel": rng.standard_normal((64, 48)).astype(np.float32),
        "bias": rng.standard_normal(48).astype(np.float32),
      },
      "emb": {"embedding": rng.standard_normal((100, 32)).astype(np.float32)},
    }
  }
