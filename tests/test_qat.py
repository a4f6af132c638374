"""``sq.qat`` / ``sq.fake_quant`` / ``sq.qat_export`` / ``sq.distill``: training through
the exact rounding of ``sq.quantize``, checked against the exported QArrays bit for bit
and against the straight-through / LSQ gradients written out in numpy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sensorquant_jax as sq
from sensorquant_jax._src import schemes
from tests.models import MODEL_SCHEMES, NNXTransformer, TinyTransformer

DTYPES = [jnp.float32, jnp.bfloat16]


def _params(dtype=jnp.float32, k=130, n=48):
  """A Dense-like tree whose contraction axis is odd (a half-filled int4 byte) and
  not a whole number of groups."""
  rng = np.random.default_rng(0)
  return {
    "a": {"kernel": jnp.asarray(rng.standard_normal((k, n)) * 0.1, dtype), "bias": jnp.zeros(n)},
    "b": {"kernel": jnp.asarray(rng.standard_normal((n, k - 1)) * 0.1, dtype)},
  }


def _rules(scheme):
  block = 32 if scheme in sq.INT4_SCHEMES else None
  return [sq.Rule("kernel", scheme, block_size=block)]


def _trained(tree, steps=3):
  """``tree`` after a few Adam steps that move weights and learned scales (and clip some
  weights: the scales shrink)."""
  opt = optax.adam(3e-3)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 130)), jnp.float32)

  def loss(t):
    p = sq.fake_quant(t)
    h = x @ p["a"]["kernel"].astype(jnp.float32)
    return jnp.mean((h @ p["b"]["kernel"].astype(jnp.float32)) ** 2)

  @jax.jit
  def step(t, s):
    g = jax.grad(loss)(t)
    u, s = opt.update(g, s, t)
    return optax.apply_updates(t, u), s

  state = opt.init(tree)
  for _ in range(steps):
    tree, state = step(tree, state)
  return tree


# Every scheme with and without learned scales and in both dtypes, though not in every
# combination of the two: the dtype alternates with the scheme, which halves the
# compilations.
@pytest.mark.parametrize(
  ("scheme", "learn", "dtype"),
  [
    (scheme, learn, DTYPES[(i + learn) % 2])
    for i, scheme in enumerate(MODEL_SCHEMES)
    for learn in (False, True)
  ],
)
def test_forward_weights_are_the_exported_qarrays_bit_for_bit(scheme, learn, dtype):
  tree = _trained(sq.qat(_params(dtype), rules=_rules(scheme), learn_scales=learn))
  exported = sq.qat_export(tree)
  want = sq.dequantize(exported)
  # The weights as the jitted forward sees them: an identity matmul returns them exactly.
  eye = jnp.eye(130, dtype=dtype)
  seen = jax.jit(lambda t: eye @ sq.fake_quant(t)["a"]["kernel"])(tree)
  assert seen.dtype == dtype
  np.testing.assert_array_equal(
    np.asarray(seen, np.float32), np.asarray(want["a"]["kernel"], np.float32)
  )
  chex.assert_trees_all_equal(jax.jit(sq.fake_quant)(tree), want)
  chex.assert_trees_all_equal(sq.fake_quant(tree), want)
  assert sq.is_qarray(exported["a"]["kernel"]) and exported["a"]["kernel"].scheme == scheme
  assert not sq.is_qarray(exported["a"]["bias"])
  if learn:  # training moved the scales away from the range-based ones
    start = sq.quantize(_params(dtype), rules=_rules(scheme))["a"]["kernel"].scale
    assert not np.array_equal(np.asarray(exported["a"]["kernel"].scale), np.asarray(start))


@pytest.mark.parametrize("learn", [False, True])
@pytest.mark.parametrize("scheme", MODEL_SCHEMES)
def test_untrained_export_is_quantize(scheme, learn):
  params = _params()
  tree = sq.qat(params, scheme, min_size=100, learn_scales=learn)
  chex.assert_trees_all_equal(sq.qat_export(tree), sq.quantize(params, scheme, min_size=100))


def test_selection_follows_quantize_with_like_and_rules():
  model = TinyTransformer()
  tokens = jnp.zeros((2, 8), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  like = (model.apply, tokens)
  rules = [("embedding", None)]
  scheme = "asymmetric_per_group_int4"
  tree = sq.qat(params, scheme, rules, min_size=256, like=like)
  chex.assert_trees_all_equal(
    sq.qat_export(tree), sq.quantize(params, scheme, rules, min_size=256, like=like)
  )
  assert not any(sq.is_qat_weight(x) for x in _leaves(tree) if "embedding" in str(x))


def _leaves(tree):
  return jax.tree_util.tree_leaves(tree, is_leaf=sq.is_qat_weight)


def _numpy_gradients(w, s, scheme, g):
  """The straight-through gradient and LSQ's scale gradient for one per-channel
  (or per-group along axis 0) leaf, in float64 numpy from the paper's formulas."""
  lo, hi = schemes.code_range(scheme)
  qa = schemes.quantize_leaf(
    jnp.asarray(w), schemes.resolve(schemes.Spec(scheme), 2), jnp.asarray(s)
  )
  from sensorquant_jax._src.qarray import grid

  sf, z = (np.asarray(a, np.float64) for a in grid(qa))
  codes = np.asarray(qa.codes(), np.float64)
  v = np.asarray(w, np.float32).astype(np.float64) / sf
  r = np.where(v < 0, -np.floor(-v + 0.5), np.floor(v + 0.5)) + z
  inside = (r >= lo) & (r <= hi)
  gw = np.where(inside, g, 0.0)
  d = (codes - z) - np.where(inside, v, 0.0)
  per = g * d
  if qa.block_size is None:
    n = w.shape[0]
    gs = per.sum(axis=0, keepdims=True)
  else:
    n = qa.block_size
    gs = np.stack([per[i : i + n].sum(0) for i in range(0, w.shape[0], n)])
  return gw, gs / np.sqrt(n * ((hi - lo) // 2)), inside


@pytest.mark.parametrize(
  "scheme",
  [
    "symmetric_per_channel_int8",
    "asymmetric_per_channel_int8",
    "symmetric_per_group_int4",
    "asymmetric_per_group_int4",
  ],
)
def test_gradients_equal_their_closed_form(scheme):
  rng = np.random.default_rng(3)
  w = (rng.standard_normal((256, 8)) * 0.1).astype(np.float32)
  g = rng.standard_normal((256, 8)).astype(np.float32)
  spec = schemes.resolve(schemes.Spec(scheme), 2)
  s0 = np.asarray(schemes.quantize_leaf(jnp.asarray(w), spec).scale)
  s = (s0 * 0.6).astype(np.float32)  # shrunk: the largest weights are clipped
  tree = {"w": sq.QATWeight(jnp.asarray(w), jnp.asarray(s), spec)}
  got = jax.grad(lambda t: jnp.sum(sq.fake_quant(t)["w"] * g))(tree)["w"]
  gw, gs, inside = _numpy_gradients(w, s, scheme, g.astype(np.float64))
  assert 0 < (~inside).sum() < inside.sum()  # some clipped, most not
  np.testing.assert_array_equal(np.asarray(got.weight), gw.astype(np.float32))
  np.testing.assert_allclose(np.asarray(got.scale), gs, rtol=2e-5, atol=1e-6)
  # Without a learned scale: the plain straight-through gradient (nothing clipped).
  plain = jax.grad(lambda t: jnp.sum(sq.fake_quant(t)["w"] * g))(
    {"w": sq.qat({"w": w}, scheme, min_size=1)["w"]}
  )
  np.testing.assert_array_equal(np.asarray(plain["w"].weight), g)


def test_pure_under_transformations_and_keeps_shardings():
  params = _params()
  tree = sq.qat(params, "symmetric_per_channel_int8", min_size=100, learn_scales=True)
  shapes = jax.eval_shape(sq.fake_quant, tree)
  assert shapes["a"]["kernel"].shape == (130, 48)
  stacked = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), tree)
  out = jax.vmap(sq.fake_quant)(stacked)
  np.testing.assert_array_equal(out["a"]["kernel"][0], sq.fake_quant(tree)["a"]["kernel"])
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("x", "y"))
  put = NamedSharding(mesh, P(None, "y"))
  sharded = jax.tree.map(
    lambda x: jax.device_put(x, put) if x.ndim == 2 and x.shape[1] % 4 == 0 else x, tree
  )
  y = jax.jit(sq.fake_quant)(sharded)
  assert y["a"]["kernel"].sharding.is_equivalent_to(put, 2)
  np.testing.assert_array_equal(y["a"]["kernel"], sq.fake_quant(tree)["a"]["kernel"])


def test_export_names_a_diverged_leaf():
  params = _params()
  params["b"]["kernel"] = params["b"]["kernel"].at[0, 0].set(jnp.nan)
  tree = sq.qat(params, "symmetric_per_channel_int8", min_size=100)
  with pytest.raises(sq.NonFiniteError, match=r"b/kernel: 1 NaN of 6192 values"):
    sq.qat_export(tree)


def _distill_loss(fn, teacher, tree, batches):
  return float(
    np.mean([np.mean((fn(sq.fake_quant(tree), b) - fn(teacher, b)) ** 2) for b in batches])
  )


def test_a_jitted_training_step_on_linen_lowers_the_quantized_loss():
  model = TinyTransformer()
  batches = [jax.random.randint(jax.random.key(i), (4, 12), 0, 64) for i in range(4)]
  params = model.init(jax.random.key(0), batches[0])
  scheme = "symmetric_per_group_int4"
  kw = dict(rules=[sq.Rule("kernel", scheme, block_size=32)], min_size=256)
  before = sq.qat(params, scheme, learn_scales=True, **kw)
  after = sq.distill(
    model, params, batches, scheme, steps=40, learning_rate=1e-4, progress=False, **kw
  )
  fn = jax.jit(model.apply)
  assert _distill_loss(fn, params, after, batches) < 0.7 * _distill_loss(
    fn, params, before, batches
  )
  # What the trained student computes is what its export computes.
  np.testing.assert_array_equal(
    fn(sq.fake_quant(after), batches[0]), fn(sq.dequantize(sq.qat_export(after)), batches[0])
  )


def test_a_jitted_training_step_on_nnx_lowers_the_quantized_loss():
  model = NNXTransformer(rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  tokens = jax.random.randint(jax.random.key(1), (4, 12), 0, 96)

  def forward(p, t):
    s = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(s, p)
    return nnx.merge(graphdef, s)(t)

  tree = sq.qat(
    params, "symmetric_per_channel_int8", min_size=1024, like=(forward, tokens), learn_scales=True
  )
  assert sum(sq.is_qat_weight(x) for x in _leaves(tree)) >= 4
  target = forward(params, tokens) + 0.5  # a task: move the outputs
  opt = optax.adam(1e-2)

  def loss(t):
    return jnp.mean((forward(sq.fake_quant(t), tokens) - target) ** 2)

  @jax.jit
  def step(t, s):
    v, g = jax.value_and_grad(loss)(t)
    u, s = opt.update(g, s, t)
    return optax.apply_updates(t, u), s, v

  state_o = opt.init(tree)
  first = float(loss(tree))
  for _ in range(20):
    tree, state_o, _ = step(tree, state_o)
  assert float(loss(tree)) < 0.5 * first
  np.testing.assert_array_equal(
    forward(sq.fake_quant(tree), tokens), forward(sq.dequantize(sq.qat_export(tree)), tokens)
  )


@pytest.mark.parametrize("loss", ["mse", "cosine", "kl"])
def test_distill_losses(loss):
  rng = np.random.default_rng(4)
  w = jnp.asarray(rng.standard_normal((64, 32)) * 0.2, jnp.float32)
  params = {"w": w}
  batches = [jnp.asarray(rng.standard_normal((8, 64)), jnp.float32) for _ in range(3)]
  fn = lambda p, x: x @ p["w"]  # noqa: E731

  def run(steps=1, seed=0):
    return sq.distill(
      fn,
      params,
      batches,
      "symmetric_per_group_int4",
      steps=steps,
      loss=loss,
      min_size=1,
      seed=seed,
      progress=False,
    )

  assert sq.is_qat_weight(run()["w"])
  if loss == "mse":  # deterministic for a seed; another seed draws other batches
    again = run(steps=4)
    chex.assert_trees_all_equal(run(steps=4), again)
    other = run(steps=4, seed=1)
    assert not np.array_equal(np.asarray(other["w"].weight), np.asarray(again["w"].weight))
  with pytest.raises(ValueError, match="loss must be"):
    sq.distill(fn, params, batches, steps=1, loss="l1", min_size=1, progress=False)
  with pytest.raises(ValueError, match="steps must be"):
    sq.distill(fn, params, batches, steps=0, min_size=1, progress=False)


W8A8_WEIGHTS = [
  "symmetric_per_tensor_int8",
  "symmetric_per_channel_int8",
  "asymmetric_per_group_int4",
]


def _w8a8_layer(rng, k=96, n=40):
  """One matmul of a 3-D kernel (an einsum over two contracted axes) and its inputs."""
  w = jnp.asarray(rng.standard_normal((k // 8, 8, n)) * 0.1, jnp.float32)
  x = jnp.asarray(rng.standard_normal((2, 6, k // 8, 8)), jnp.float32)
  return {"w": w}, x, lambda p, x: jnp.einsum("btij,ijn->btn", x, p["w"])


def _round_away(v):
  return np.where(v < 0, -np.floor(-v + 0.5), np.floor(v + 0.5))


@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("scheme", W8A8_WEIGHTS)
def test_w8a8_fake_quant_is_the_static_w8a8_op(scheme, static):
  rng = np.random.default_rng(5)
  params, x, fn = _w8a8_layer(rng)
  s = float(np.abs(np.asarray(x)).max()) * 0.8 / 127  # the largest activations clip
  acts = {"w": s} if static else None
  rules = [sq.Rule("w", scheme, block_size=32 if scheme in sq.INT4_SCHEMES else None)]
  tree = sq.qat(params, scheme, rules, mode="w8a8", act_scales=acts, min_size=1)
  got = jax.jit(sq.fake_quantized(fn))(tree, x)
  served = sq.quantized(fn, mode="w8a8", act_scales=sq.qat_act_scales(tree))(sq.qat_export(tree), x)
  # Independent: int8 activations rounded in float64 numpy, times the exported weights.
  xf = np.asarray(x, np.float64).reshape(12, -1)
  scale = s if static else np.maximum(np.abs(xf).max(-1, keepdims=True) / 127, 1e-12)
  v = np.asarray(x, np.float32).reshape(12, -1) / np.float32(scale)
  assert ((np.abs(v) > 127.5).sum() > 0) == static  # static scales clip; per-token ones don't
  codes = np.clip(_round_away(v), -127, 127)
  w = np.asarray(sq.dequantize(sq.qat_export(tree))["w"], np.float64).reshape(-1, 40)
  ref = ((codes * scale) @ w).reshape(2, 6, 40)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(served), ref, rtol=1e-5, atol=1e-5)
  # Weight-only training ignores the activations' rounding: far from the op.
  plain = fn(sq.fake_quant(tree), x)
  assert np.abs(np.asarray(plain) - ref).max() > 100 * np.abs(np.asarray(got) - ref).max()


def test_w8a8_activation_gradients_equal_their_closed_form():
  rng = np.random.default_rng(6)
  params, x, fn = _w8a8_layer(rng)
  s = np.float32(np.abs(np.asarray(x)).max() * 0.7 / 127)
  tree = sq.qat(
    params,
    "symmetric_per_channel_int8",
    mode="w8a8",
    act_scales={"w": s},
    min_size=1,
    learn_scales=True,
  )
  g = rng.standard_normal((2, 6, 40)).astype(np.float32)
  got = jax.grad(lambda t, x: jnp.sum(sq.fake_quantized(fn)(t, x) * g), argnums=(0, 1))(tree, x)
  # d loss / d x_hat = g @ w_hat^T; then straight through where not clipped, and LSQ for s.
  w_hat = np.asarray(sq.fake_quant(tree)["w"], np.float64).reshape(-1, 40)
  gx_hat = (g.reshape(12, 40).astype(np.float64) @ w_hat.T).reshape(x.shape)
  v = np.asarray(x, np.float32) / s
  r = _round_away(v)
  inside = np.abs(r) <= 127
  assert 0 < (~inside).sum() < inside.sum()
  gs = np.sum(gx_hat * np.where(inside, r - v, np.clip(r, -127, 127))) / np.sqrt(x.size * 127)
  np.testing.assert_allclose(np.asarray(got[1]), np.where(inside, gx_hat, 0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(got[0]["w"].act_scale), gs, rtol=1e-3)  # float32 sum


def test_w8a8_training_on_a_scanned_linen_stack_matches_the_served_model():
  from tests.llm_models import Config, Transformer

  model = Transformer(Config(), style="scan")
  batches = [jax.random.randint(jax.random.key(i), (2, 8), 0, 64) for i in range(3)]
  params = model.init(jax.random.key(0), batches[0])
  acts = sq.act_scales(sq.calibrate(model, params, batches))
  scheme = "symmetric_per_channel_int8"
  kw = dict(min_size=1024, mode="w8a8", act_scales=acts, learn_scales=False)
  before = sq.qat(params, scheme, **kw)
  assert all(x.act_scale is not None for x in _leaves(before) if sq.is_qat_weight(x))
  after = sq.distill(
    model, params, batches, scheme, steps=20, learning_rate=1e-4, progress=False, **kw
  )
  fq = jax.jit(sq.fake_quantized(model.apply))
  teacher = jax.jit(model.apply)

  def loss(t):
    return float(np.mean([np.mean((fq(t, b) - teacher(params, b)) ** 2) for b in batches]))

  assert loss(after) < 0.7 * loss(before)
  served = jax.jit(
    lambda q, b: sq.quantized(
      model.apply, mode="w8a8", act_scales=sq.qat_act_scales(after), warn=False
    )(q, b)
  )
  got, want = served(sq.qat_export(after), batches[0]), fq(after, batches[0])
  # Float sums in another order may flip a rounding of a later layer's activations.
  close = np.isclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  assert close.mean() > 0.99


def test_w8a8_options_are_checked():
  params = _params()
  with pytest.raises(ValueError, match='act_scales are for mode="w8a8"'):
    sq.qat(params, "symmetric_per_channel_int8", act_scales={"a": 0.1}, min_size=100)
  with pytest.raises(ValueError, match="a/kernel: the static activation scale must be positive"):
    sq.qat(params, "symmetric_per_channel_int8", mode="w8a8", act_scales={"a": -1.0}, min_size=100)
  with pytest.raises(ValueError, match="mode"):
    sq.qat(params, "symmetric_per_channel_int8", mode="w4a4", min_size=100)


@pytest.mark.parametrize("style", ["linen", "nnx"])
def test_w8a8_training_forward_is_the_served_model_in_other_styles(style):
  """Linen Dense / DenseGeneral / Conv layers and an NNX model (through its pure dict)."""
  tokens = jax.random.randint(jax.random.key(2), (4, 12), 0, 64)
  if style == "linen":
    model = TinyTransformer()
    params = model.init(jax.random.key(0), tokens)
    fn = model.apply
  else:
    graphdef, state = nnx.split(NNXTransformer(rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)

    def fn(p, t):
      s = jax.tree.map(lambda x: x, state)
      nnx.replace_by_pure_dict(s, p)
      return nnx.merge(graphdef, s)(t)

  acts = sq.act_scales(sq.calibrate(fn, params, [tokens]))
  tree = sq.qat(
    params,
    "symmetric_per_channel_int8",
    min_size=1024,
    like=(fn, tokens),
    mode="w8a8",
    act_scales=acts,
  )
  assert sum(x.act_scale is not None for x in _leaves(tree) if sq.is_qat_weight(x)) >= 4
  got = jax.jit(sq.fake_quantized(fn))(tree, tokens)
  served = sq.quantized(fn, mode="w8a8", act_scales=sq.qat_act_scales(tree), warn=False)(
    sq.qat_export(tree), tokens
  )
  close = np.isclose(np.asarray(got), np.asarray(served), rtol=1e-4, atol=1e-4)
  assert close.mean() > 0.99  # float summation order may flip a later rounding
  plain = fn(sq.fake_quant(tree), tokens)  # weight-only: the activations' rounding shows
  assert (
    np.abs(np.asarray(plain) - np.asarray(served)).max()
    > 10 * np.abs(np.asarray(got) - np.asarray(served)).max()
  )
