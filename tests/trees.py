"""Tree helpers shared by the tests: comparing quantized trees, float trees, per-matrix errors."""

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


def flat_tree(tree):
  """``{"/"-joined path: leaf}``, QArrays as leaves."""
  pairs = jax.tree_util.tree_leaves_with_path(tree, is_leaf=sq.is_qarray)
  return {sq.path_str(p): x for p, x in pairs}


def op_level_errors(fn, params, batches, before, after, leaves):
  """Per matrix ``(leaf, fixed positions)``: the output errors of two quantized trees.

  Each matrix's ``X^T X`` is captured from ``fn(params, *batch)`` at the op (one
  per layer of a stack, per block of a block-diagonal layer); nothing may be
  left uncaptured.
  """
  import jax.numpy as jnp

  from sensorquant_jax._src import gptq, transform

  stats, skipped = gptq.op_level_stats(
    fn, params, lambda: iter(batches), leaves, lambda r: {"xtx": r.T @ r}
  )
  assert not skipped, skipped
  f, a, b = flat_tree(params), flat_tree(before), flat_tree(after)
  out = {}
  for key, s in stats.items():
    leaf, k_axes, index = transform.parse_key(key)

    def matrix(x, k_axes=k_axes, index=index):
      return gptq.sub_matrix(jnp.asarray(x, jnp.float32), k_axes, index)[0]

    w = matrix(f[leaf])
    out[(leaf, index)] = tuple(
      gptq.output_error(w, matrix(t[leaf].dequantize(jnp.float32)), s["xtx"]) for t in (a, b)
    )
  return out
