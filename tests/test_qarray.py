"""The QArray pytree: transformations, dequantization at extremes, repr."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sensorquant_jax as sq


def test_qarray_under_vmap_and_tree_map():
  rng = np.random.default_rng(0)
  stack = jnp.asarray(rng.standard_normal((3, 32, 48)), jnp.float32)
  per_layer = jax.vmap(lambda w: sq.quantize_array(w, "symmetric_per_channel_int8"))(stack)
  assert per_layer.values.shape == (3, 32, 48) and per_layer.scale.shape == (3, 1, 48)
  for i in range(3):
    one = sq.quantize_array(stack[i], "symmetric_per_channel_int8")
    np.testing.assert_array_equal(per_layer.values[i], one.values)
  # Stacked QArrays dequantize directly (axes count from the end) and under vmap.
  np.testing.assert_array_equal(
    per_layer.dequantize(), jax.vmap(lambda q: q.dequantize())(per_layer)
  )
  doubled = jax.tree_util.tree_map(lambda x: x, per_layer)
  assert isinstance(doubled, sq.QArray) and doubled.scheme == per_layer.scheme


def _half_ulp(x: np.ndarray, dtype) -> np.ndarray:
  """Half the spacing of ``dtype`` at ``x`` (the rounding of the final cast)."""
  x = np.abs(np.asarray(x, np.float32))
  lo = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
  hi = np.asarray(
    jnp.nextafter(jnp.asarray(lo, dtype), jnp.asarray(np.inf, dtype)).astype(jnp.float32)
  )
  return (hi - lo) / 2


@pytest.mark.parametrize("scheme", sq.SCHEMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("case", ["max", "max_pos", "max_neg", "wide", "wide_neg", "mixed"])
def test_dequantize_is_finite_and_within_half_a_step_at_extremes(scheme, dtype, case):
  top = float(jnp.finfo(dtype).max)
  wide = {jnp.float32: 2e38, jnp.bfloat16: 2e38, jnp.float16: 6e4}[dtype]
  rows = {
    "max": [top, -top, 1.0, 0.5],
    "max_pos": [top, 0.3, 1.0, 2.0],
    "max_neg": [-top, -1.0, 0.0, 3.0],
    "wide": [wide, -wide, 1.0, 0.0],
    "wide_neg": [-wide, -wide / 3, 0.0, 1.0],
    "mixed": [top / 3, -top / 2, top / 7, -1.0],
  }[case]
  w = jnp.asarray(np.tile(np.array(rows, np.float32)[:, None], (1, 64)), dtype)
  q = sq.quantize_array(w, scheme)
  d = np.asarray(q.dequantize().astype(jnp.float32))
  assert np.isfinite(d).all()
  wf = np.asarray(w.astype(jnp.float32))
  step = np.asarray(q.scale, np.float32)
  if q.block_size:
    step = np.repeat(step, q.block_size, axis=0)[: wf.shape[0]]
  step = np.broadcast_to(step, wf.shape)
  bound = step / 2 * (1 + 1e-6) + _half_ulp(wf, dtype)
  if scheme in sq.FP8_SCHEMES:  # E4M3's step is relative: 1/8 of the value's binade
    bound = np.maximum(np.abs(wf) / 16, step * 2.0**-10) * (1 + 1e-6) + _half_ulp(wf, dtype)
  if scheme == "asymmetric_per_channel_int8" and case == "max":
    # +-max exactly: 256 levels over [-max, max] cannot put a level within
    # half a step of both ends (the top level would be max + step/2, past
    # float32): one end is off by up to one step, and stays finite.
    bound = step * (1 + 1e-6) + _half_ulp(wf, dtype)
  assert np.all(np.abs(d - wf) <= bound), (np.abs(d - wf) / step).max()


def test_repr_never_fails_on_non_array_leaves():
  q = sq.quantize({"w": jnp.ones((64, 64))}, "asymmetric_per_channel_int8")
  for tree in (
    jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), q),
    jax.tree_util.tree_map(lambda a: None, q),
    jax.tree_util.tree_map(lambda a: "text", q),
  ):
    text = repr(tree)
    assert "QArray(scheme='asymmetric_per_channel_int8'" in text
