"""QArray trees <-> Rust manifests (``to_manifest`` / ``from_manifest``)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sensorquant_jax as sq
from sensorquant_jax import manifest as m


class Deep(nn.Module):
  """10 blocks x (q, k, v, out DenseGeneral + fc) = 50 quantized layers."""

  @nn.compact
  def __call__(self, x):
    for i in range(10):
      h = nn.LayerNorm(name=f"ln_{i}")(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=4, name=f"attn_{i}")(h, h)
      x = x + nn.Dense(32, name=f"fc_{i}")(x)
    return x


def _deep_params():
  x = jnp.ones((1, 5, 32))
  return Deep(), x, Deep().init(jax.random.key(0), x)


def test_fifty_layer_round_trip_is_exact(tmp_path):
  model, x, params = _deep_params()
  q = sq.quantize(params, min_size=256)
  man = sq.to_manifest(q, '{"d_model": 32}')
  assert len(man.layers) == 50
  names = [layer.name for layer in man.layers]
  assert "attn_0.query" in names and "fc_9" in names
  by_name = {layer.name: layer for layer in man.layers}
  assert by_name["attn_0.query"].shape == (32, 32)  # [heads*head_dim, in]
  assert by_name["attn_0.out"].shape == (32, 32)
  man.save(tmp_path / "model.json")
  back = m.QuantizedModel.load(tmp_path / "model.json")
  assert back == man
  restored = sq.from_manifest(back, params)
  chex.assert_trees_all_equal(sq.dequantize(restored), sq.dequantize(q))
  y = model.apply(sq.dequantize(restored), x)
  np.testing.assert_allclose(y, model.apply(sq.dequantize(q), x), rtol=0, atol=0)


def test_dense_kernel_is_transposed_and_bias_kept():
  w = np.arange(12, dtype=np.float32).reshape(3, 4) - 5  # [in=3, out=4]
  params = {"params": {"enc": {"proj": {"kernel": w, "bias": np.arange(4, dtype=np.float32)}}}}
  q = sq.quantize(params, rules=[("kernel", "symmetric_per_tensor_int8")])
  man = sq.to_manifest(q)
  (layer,) = man.layers
  assert layer.name == "enc.proj" and layer.shape == (4, 3)
  ref = m.QuantizedWeights.from_f32("enc.proj", w.T.reshape(-1), [4, 3], np.arange(4))
  assert layer == ref  # the Rust quantizer on the [out, in] matrix gives the same layer
  abstract = jax.eval_shape(lambda: params)
  restored = sq.from_manifest(man, abstract)
  chex.assert_trees_all_equal(sq.dequantize(restored), sq.dequantize(q))


@pytest.mark.parametrize("scheme", ["symmetric_per_channel_int8", sq.FP8_PER_CHANNEL])
def test_other_schemes_need_requantize(scheme):
  """The Rust manifest holds per-tensor int8 only: other schemes (fp8 too) are refused,
  the message naming the scheme, or requantized on request."""
  _, _, params = _deep_params()
  q = sq.quantize(params, scheme, min_size=256)
  with pytest.raises(ValueError, match=f"scheme {scheme} does not fit.*requantize=True"):
    sq.to_manifest(q)
  with pytest.warns(sq.RequantizationWarning, match="attn_0.query: max abs"):
    man = sq.to_manifest(q, requantize=True)
  assert len(man.layers) == 50 and man.dumps()


def test_from_manifest_errors():
  _, _, params = _deep_params()
  man = sq.to_manifest(sq.quantize(params, min_size=256))
  with pytest.raises(m.ManifestError, match="neither in the manifest.*params/ln_0/"):
    sq.from_manifest(man, jax.eval_shape(lambda: params))
  man.layers[0].shape = (16, 64)
  with pytest.raises(m.ManifestError, match="does not match"):
    sq.from_manifest(man, params)
  with pytest.raises(m.ManifestError, match="no matching kernel"):
    sq.from_manifest(man, {"params": {"other": {"kernel": np.zeros((32, 32), np.float32)}}})


def test_custom_names():
  _, _, params = _deep_params()
  q = sq.quantize(params, min_size=256)
  man = sq.to_manifest(q, name_fn=lambda p: "model." + p.replace("/", "."))
  assert man.layers[0].name.startswith("model.params.")
  restored = sq.from_manifest(man, params, name_fn=lambda p: "model." + p.replace("/", "."))
  chex.assert_trees_all_equal(sq.dequantize(restored), sq.dequantize(q))
