"""Int8 ops and Flax integration against float references on dequantized weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sensorquant_jax as sq
from sensorquant_jax._src import ops, packed
from tests.models import NNXTransformer, TinyTransformer

SCHEMES = list(sq.SCHEMES)
rng = np.random.default_rng(0)


def _fake_quant_acts(x2):
  """What W8A8 does to activations, in numpy: per-row max|x|/127, round half away."""
  x2 = np.asarray(x2, np.float32)
  s = np.maximum(np.max(np.abs(x2), axis=-1, keepdims=True) / np.float32(127), 1e-12)
  y = x2 / s
  q = np.clip(np.sign(y) * np.floor(np.abs(y) + 0.5), -127, 127)
  return q * s


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("mode", ["weight_only", "w8a8"])
@pytest.mark.parametrize("rows,k,n", [(1, 256, 1024), (5, 200, 96), (40, 512, 1024)])
@pytest.mark.parametrize("packed", [False, True])
def test_dense_matches_float_on_dequantized(scheme, mode, rows, k, n, packed):
  w = rng.standard_normal((k, n)).astype(np.float32) * rng.uniform(0.1, 2, (1, n))
  x = rng.standard_normal((rows, k)).astype(np.float32)
  b = rng.standard_normal(n).astype(np.float32)
  qa = sq.quantize_array(w, scheme)
  kernel = sq.pack(qa) if packed else qa
  wd = np.asarray(qa.dequantize(), np.float64)
  xin = _fake_quant_acts(x) if mode == "w8a8" else x
  ref = np.asarray(xin, np.float64) @ wd + b
  for impl, tile in (("auto", "auto"), ("xla", "auto"), ("xla", None), ("xla", 64)):
    y = jax.jit(lambda x, q, b, t=tile, i=impl: sq.dense(x, q, b, mode=mode, tile=t, impl=i))(
      x, kernel, b
    )
    np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-4 * np.abs(ref).max())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dense_general_attention_kernels(scheme):
  x = rng.standard_normal((2, 7, 64)).astype(np.float32)
  qkv = rng.standard_normal((64, 4, 16)).astype(np.float32)  # [in, heads, head_dim]
  out = rng.standard_normal((4, 16, 64)).astype(np.float32)  # [heads, head_dim, out]
  q1 = sq.quantize_array(qkv, scheme)
  q2 = sq.quantize_array(out, scheme)
  h = sq.dense_general(x, q1, np.ones((4, 16), np.float32))
  ref_h = np.einsum("btd,dhk->bthk", x, np.asarray(q1.dequantize())) + 1
  np.testing.assert_allclose(h, ref_h, rtol=1e-5, atol=1e-4)
  y = jax.jit(lambda h, q: sq.dense_general(h, q, n_in=2))(h, q2)
  ref_y = np.einsum("bthk,hko->bto", np.asarray(h), np.asarray(q2.dequantize()))
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-3)


def test_pack_round_trip_and_fallbacks():
  w = rng.standard_normal((128, 2048)).astype(np.float32)
  for scheme in SCHEMES:
    qa = sq.quantize_array(w, scheme)
    p = sq.pack(qa, tile=512)
    if scheme == "symmetric_per_block_int8":
      assert p is qa  # block scales vary along K: kept canonical
      continue
    assert isinstance(p, sq.PackedQArray) and p.tiles.shape == (4, 128, 512)
    np.testing.assert_array_equal(sq.unpack(p).dequantize(), qa.dequantize())
    assert p.shape == qa.shape and p.nbytes >= qa.values.nbytes
  with pytest.raises(ValueError, match="unknown mode"):
    sq.dense(np.ones((1, 128), np.float32), sq.quantize_array(w), mode="int4")
  with pytest.raises(ValueError, match="does not match"):
    sq.dense(np.ones((1, 64), np.float32), sq.quantize_array(w))


def test_per_channel_along_contraction_falls_back_correctly():
  w = rng.standard_normal((64, 32)).astype(np.float32)
  qa = sq.quantize_array(w, "symmetric_per_channel_int8", axes=(0,))  # scales along K
  x = rng.standard_normal((3, 64)).astype(np.float32)
  np.testing.assert_allclose(sq.dense(x, qa), x @ np.asarray(qa.dequantize()), rtol=1e-5, atol=1e-4)


def test_weight_only_op_builds_no_float_weight():
  """Compiled memory analysis: temporaries stay far below the float32 weight size."""
  k = n = 4096
  abstract = jax.eval_shape(
    lambda w: sq.quantize_array(w, "symmetric_per_channel_int8", check_finite=False),
    jax.ShapeDtypeStruct((k, n), jnp.float32),
  )
  x = jax.ShapeDtypeStruct((1, k), jnp.float32)
  for kernel in (abstract, jax.eval_shape(sq.pack, abstract)):
    compiled = jax.jit(lambda x, q: sq.dense(x, q, tile=packed.DEFAULT_TILE)).lower(x, kernel)
    temp = compiled.compile().memory_analysis().temp_size_in_bytes
    assert temp < 0.25 * k * n * 4, temp
  naive = jax.jit(lambda x, q: x @ q.dequantize()).lower(x, abstract).compile()
  assert naive.memory_analysis().temp_size_in_bytes >= k * n * 4  # what we avoid


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


def _dequantized_nnx(qmodel, model):
  ref = nnx.clone(model)
  for path, node in nnx.iter_graph(qmodel):
    if isinstance(node, (sq.nnx.QuantizedLinear, sq.nnx.QuantizedEinsum, sq.nnx.QuantizedEmbed)):
      parent = ref
      for key in path:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
      leaf = "embedding" if isinstance(node, sq.nnx.QuantizedEmbed) else "kernel"
      getattr(parent, leaf).set_value(getattr(node, leaf).get_value().dequantize())
  return ref


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("mode", ["weight_only", "w8a8"])
def test_nnx_quantize_matches_dequantized_model(scheme, mode):
  model = NNXTransformer(rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 96)
  qmodel = sq.nnx.quantize(model, scheme, min_size=256, mode=mode)
  assert isinstance(qmodel.blocks[0].fc1, sq.nnx.QuantizedLinear)
  assert isinstance(qmodel.blocks[0].attn.query, sq.nnx.QuantizedLinear)  # LinearGeneral
  assert isinstance(qmodel.embed, sq.nnx.QuantizedEmbed)
  assert isinstance(qmodel.mix, sq.nnx.QuantizedEinsum)
  assert type(model.blocks[0].fc1) is nnx.Linear  # the input model is untouched
  y = nnx.jit(lambda m, t: m(t))(qmodel, tokens)
  ref = _dequantized_nnx(qmodel, model)(tokens)
  if mode == "weight_only":
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  else:
    assert float(jnp.max(jnp.abs(y - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))
