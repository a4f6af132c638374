"""SmoothQuant: the float function is unchanged and per-tensor W8A8 gets much closer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sensorquant_jax as sq


class Block(nn.Module):
  """LayerNorm then two Dense layers, as a transformer MLP; the norm scale plants outliers."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln")(x)
    h = nn.gelu(nn.Dense(128, name="fc1")(h))
    return nn.Dense(64, name="fc2")(h)


@pytest.fixture(scope="module")
def setup():
  model = Block()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1024, 64)).astype(np.float32)
  params = model.init(jax.random.key(0), x[:1])
  scale = np.ones(64, np.float32)
  scale[[3, 17, 40]] = 60.0  # outlier channels, as LLM LayerNorms grow them
  params["params"]["ln"]["scale"] = jnp.asarray(scale)
  return model, params, [x[:512], x[512:]]


def w8a8_error(model, params, p, xs, scheme):
  """Relative output error of static W8A8 on ``p`` (calibrated on ``xs``) vs the float model."""
  ref = np.concatenate([np.asarray(model.apply(params, x)) for x in xs])
  scales = sq.act_scales(sq.calibrate(model, p, xs))
  q = sq.quantize(p, scheme, min_size=1)
  got = np.concatenate(
    [np.asarray(sq.apply(model, q, x, mode="w8a8", act_scales=scales)) for x in xs]
  )
  return float(np.sum((got - ref) ** 2) / np.sum(ref**2))


def test_float_function_is_unchanged(setup):
  model, params, xs = setup
  smooth = sq.smoothquant(model, params, xs, alpha=0.5, progress=False)
  k = smooth["params"]["fc1"]["kernel"]
  assert isinstance(k, sq.InputScaled) and k.input_scale.shape == (64, 1)
  for x in xs:
    ref = np.asarray(model.apply(params, x))
    np.testing.assert_allclose(np.asarray(sq.apply(model, smooth, x)), ref, rtol=1e-4, atol=1e-4)
    folded = model.apply(sq.dequantize(smooth), x)
    np.testing.assert_allclose(np.asarray(folded), ref, rtol=1e-4, atol=1e-4)
  with pytest.raises(TypeError):
    model.apply(smooth, xs[0])  # never silently run without its scales


def test_smoothing_rescues_per_tensor_w8a8(setup):
  model, params, xs = setup
  smooth = sq.smoothquant(model, params, xs, alpha=0.5, progress=False)
  plain = w8a8_error(model, params, params, xs, sq.PER_TENSOR)
  smoothed = w8a8_error(model, params, smooth, xs, sq.PER_TENSOR)
  assert smoothed < 0.5 * plain, (smoothed, plain)


def test_calibrate_and_quantize_see_the_smoothed_layer(setup):
  model, params, xs = setup
  smooth = sq.smoothquant(model, params, xs, alpha=0.8, progress=False)
  cal = sq.calibrate(model, smooth, xs)["params/fc1"]
  k = smooth["params"]["fc1"]["kernel"]
  h = np.concatenate(
    [
      np.asarray(nn.LayerNorm().apply({"params": params["params"]["ln"]}, jnp.asarray(x)))
      for x in xs
    ]
  )
  seen = h * np.asarray(k.input_scale)[:, 0]
  np.testing.assert_allclose((cal.act_min, cal.act_max), (seen.min(), seen.max()), rtol=1e-5)
  assert (cal.w_min, cal.w_max) == (float(np.min(k.kernel)), float(np.max(k.kernel)))
  q = sq.quantize(smooth, sq.PER_TENSOR, rules=[("fc2", None)], min_size=1)
  assert sq.is_qarray(q["params"]["fc1"]["kernel"])
  np.testing.assert_array_equal(
    np.asarray(q["params"]["fc1"]["kernel"].input_scale), np.asarray(k.input_scale)
  )
  assert isinstance(q["params"]["fc2"]["kernel"], sq.InputScaled)  # kept float, still scaled
  with pytest.raises(ValueError, match="alpha"):
    sq.smoothquant(model, params, xs, alpha=1.5)


def test_auto_alpha_is_no_worse_than_fixed_or_none(setup):
  model, params, xs = setup
  auto = sq.smoothquant(model, params, xs, alpha="auto", progress=False)
  fixed = sq.smoothquant(model, params, xs, alpha=0.5, progress=False)
  e_auto, e_fixed, e_none = (
    w8a8_error(model, params, p, xs, sq.PER_CHANNEL) for p in (auto, fixed, params)
  )
  assert e_auto <= 1.05 * min(e_fixed, e_none), (e_auto, e_fixed, e_none)
  with pytest.raises(ValueError, match="float params"):
    sq.gptq(model, auto, xs, sq.INT4)


def test_smoothquant_on_kernels_found_at_the_op():
  """A plain function with stacked layers: one smoothing scale per layer, the function kept."""
  from tests import llm_models as M

  cfg = M.Config()
  params = M.init_plain(cfg, jax.random.key(0))
  batches = [jax.random.randint(jax.random.key(i), (2, 8), 0, cfg.vocab) for i in range(2)]
  smooth = sq.smoothquant(M.plain_forward, params, batches, alpha=0.5, progress=False)
  wqkv = smooth["layers"]["wqkv"]
  assert isinstance(wqkv, sq.InputScaled)
  assert wqkv.input_scale.shape == (cfg.layers, cfg.embed, 1)
  # layer 0's scale from its real inputs: s = max|x|^a / max|w|^(1-a) per input channel
  x0 = np.concatenate(
    [
      np.asarray(params["embedding"])[np.asarray(t)].reshape(-1, cfg.embed)
      * np.asarray(params["layers"]["norm"][0])
      for t in batches
    ]
  )
  w0 = np.asarray(params["layers"]["wqkv"][0])
  want = np.sqrt(np.abs(x0).max(0)) / np.sqrt(np.abs(w0).max(1))
  np.testing.assert_allclose(1 / np.asarray(wqkv.input_scale[0, :, 0]), want, rtol=1e-4)
  ref = M.plain_forward(params, batches[0])
  np.testing.assert_allclose(
    M.plain_forward(sq.dequantize(smooth), batches[0]), ref, rtol=1e-4, atol=1e-3
  )
  q = sq.quantize(smooth, sq.PER_CHANNEL, like=(M.plain_forward, batches[0]))
  assert q["layers"]["wqkv"].input_scale is not None
  y = jax.jit(sq.quantized(M.plain_forward, mode="w8a8"))(q, batches[0])
  assert float(jnp.max(jnp.abs(y - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))
  assert sq.explain(M.plain_forward, q, batches[0]).dequantized == ()
