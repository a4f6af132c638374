"""Unmodified Linen models on quantized params (``sq.apply``) and the quantized Linen modules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sensorquant_jax as sq
from sensorquant_jax._src import ops
from tests.models import MODEL_SCHEMES, TinyTransformer

SCHEMES = [s for s in MODEL_SCHEMES if sq.bits_of(s) == 8]  # int4: tests/test_int4.py
rng = np.random.default_rng(0)


def _count_int8_calls(monkeypatch):
  calls = []
  real = ops.dense_general

  def spy(*a, **kw):
    calls.append(a[1].shape)
    return real(*a, **kw)

  monkeypatch.setattr(ops, "dense_general", spy)
  return calls


@pytest.mark.parametrize("scheme", SCHEMES)
def test_linen_apply_matches_dequantized_model(scheme, monkeypatch):
  model = TinyTransformer()
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 96)
  params = model.init(jax.random.key(0), tokens)
  q = sq.quantize(params, scheme, min_size=256)
  ref = model.apply(sq.dequantize(q), tokens)
  calls = _count_int8_calls(monkeypatch)
  y = jax.jit(lambda q, t: sq.apply(model, q, t))(q, tokens)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  # 2 blocks x (q, k, v, out, fc1, fc2) and the head go to the int8 op; the
  # Conv kernel is dequantized; the Embed lookup gathers int8 rows.
  assert len(calls) == 13
  y8 = jax.jit(lambda q, t: sq.apply(model, q, t, mode="w8a8"))(q, tokens)
  assert float(jnp.max(jnp.abs(y8 - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))
  yp = jax.jit(lambda q, t: sq.apply(model, q, t))(sq.pack(q), tokens)
  np.testing.assert_allclose(yp, ref, rtol=1e-5, atol=1e-5)


class Custom(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1], 64))
    h = jnp.tanh(x @ w)  # a quantized leaf no int8 op consumes
    e = nn.Embed(50, 64, name="emb")
    return nn.Dense(50, name="out")(h) + e.attend(h) + e(jnp.arange(50) % 7).sum()


def test_unconsumed_quantized_leaves_are_dequantized():
  model = Custom()
  x = rng.standard_normal((3, 64)).astype(np.float32)
  params = model.init(jax.random.key(0), x)
  q = sq.quantize(
    params, "symmetric_per_channel_int8", rules=[(".*", "symmetric_per_channel_int8")]
  )
  assert sq.is_qarray(q["params"]["w"])
  y = jax.jit(lambda q, x: sq.apply(model, q, x))(q, x)
  np.testing.assert_allclose(y, model.apply(sq.dequantize(q), x), rtol=1e-5, atol=1e-4)


def test_quantized_dense_modules():
  dense = nn.Dense(256)
  x = rng.standard_normal((4, 128)).astype(np.float32)
  p = dense.init(jax.random.key(0), x)
  q = sq.quantize(p, "symmetric_per_channel_int8")
  y = sq.QuantizedDense(256).apply(q, x)
  np.testing.assert_allclose(y, dense.apply(sq.dequantize(q), x), rtol=1e-5, atol=1e-5)
  dg = nn.DenseGeneral((4, 64))
  p2 = dg.init(jax.random.key(0), x)
  q2 = sq.quantize(p2)
  y2 = sq.QuantizedDenseGeneral((4, 64)).apply(q2, x)
  np.testing.assert_allclose(y2, dg.apply(sq.dequantize(q2), x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="no initializer"):
    sq.QuantizedDense(8).init(jax.random.key(0), x)
