"""AWQ: the scaling leaves the float function alone and lowers the quantized error."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sensorquant_jax as sq
from tests.trees import op_level_errors


class TwoDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(128, name="fc1")(x))
    return nn.Dense(32, name="fc2")(h)


def planted(n=1024, k=64, seed=0):
  """Inputs whose channels 0-3 are 40x louder (the salient channels AWQ protects)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, k)).astype(np.float32)
  x[:, :4] *= 40
  return x


@pytest.fixture(scope="module")
def setup():
  model = TwoDense()
  x = planted()
  params = model.init(jax.random.key(0), x[:1])
  return model, params, [x[:512], x[512:]]


def out_error(model, params, q, xs):
  ref = np.concatenate([np.asarray(model.apply(params, x)) for x in xs])
  got = np.concatenate([np.asarray(sq.apply(model, q, x)) for x in xs])
  return float(np.sum((got - ref) ** 2) / np.sum(ref**2))


@pytest.mark.parametrize("scheme", [sq.INT4, sq.ASYMMETRIC_INT4, sq.PER_TENSOR, sq.PER_CHANNEL])
def test_lowers_the_quantized_error(scheme, setup):
  model, params, xs = setup
  rtn = sq.quantize(params, scheme, min_size=1)
  q = sq.awq(model, params, xs, scheme, min_size=1, progress=False)
  k = q["params"]["fc1"]["kernel"]
  assert k.input_scale is not None and k.input_scale.shape == (64, 1)
  assert out_error(model, params, q, xs) < 0.9 * out_error(model, params, rtn, xs)


def test_scaling_keeps_the_float_function_and_ops_agree_with_dequantize(setup):
  model, params, xs = setup
  q = sq.awq(model, params, xs, sq.INT4, min_size=1, progress=False)
  w = np.asarray(params["params"]["fc1"]["kernel"])
  qa = q["params"]["fc1"]["kernel"]
  s = 1 / np.asarray(qa.input_scale)  # the kernel was quantized as w * s
  x = xs[0]
  np.testing.assert_allclose((x / s.T) @ (w * s), x @ w, rtol=1e-4, atol=1e-3)
  # the op applies input_scale; dequantize folds it in: same layer either way
  for impl in ("xla", "auto"):
    got = sq.dense(jnp.asarray(x), qa, impl=impl)
    want = x @ np.asarray(qa.dequantize())
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-3)
  y = jax.jit(lambda v, x: sq.apply(model, v, x))(q, x)
  np.testing.assert_allclose(
    np.asarray(y), np.asarray(model.apply(sq.dequantize(q), x)), rtol=1e-4, atol=1e-3
  )
  w8a8 = sq.dense(jnp.asarray(x), qa, mode="w8a8")
  np.testing.assert_allclose(np.asarray(w8a8), want, rtol=0.05, atol=0.05 * np.abs(want).max())


def test_input_scaled_qarrays_save_restore_pack_and_manifest(setup, tmp_path):
  model, params, xs = setup
  q = sq.awq(model, params, xs, sq.PER_CHANNEL, min_size=1, progress=False)
  sq.save(tmp_path / "ck", q)
  back = sq.restore(tmp_path / "ck")
  a, b = q["params"]["fc1"]["kernel"], back["params"]["fc1"]["kernel"]
  np.testing.assert_array_equal(np.asarray(a.input_scale), np.asarray(b.input_scale))
  np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
  assert sq.nbytes(q) == sq.nbytes(back)
  assert sq.pack(q)["params"]["fc1"]["kernel"] is q["params"]["fc1"]["kernel"]
  with pytest.raises(ValueError, match="input scale"):
    sq.to_manifest(q)


@pytest.mark.parametrize("scheme", [sq.INT4, sq.PER_CHANNEL])
def test_awq_on_kernels_found_at_the_op(scheme):
  """A plain function with stacked layers: a scale per layer, never worse than RTN."""
  from tests import llm_models as M

  cfg = M.Config()
  params = M.init_plain(cfg, jax.random.key(0))
  batches = [jax.random.randint(jax.random.key(i), (2, 16), 0, cfg.vocab) for i in range(2)]
  like = (M.plain_forward, batches[0])
  rtn = sq.quantize(params, scheme, like=like)
  q = sq.awq(M.plain_forward, params, batches, scheme, like=like, progress=False)
  wqkv = q["layers"]["wqkv"]
  assert wqkv.input_scale.shape == (cfg.layers, cfg.embed, 1)
  assert wqkv.scheme == scheme and wqkv.axes == rtn["layers"]["wqkv"].axes
  leaves = ["layers/wqkv", "layers/wo", "layers/w_up", "layers/w_down", "embedding"]
  errors = op_level_errors(M.plain_forward, params, batches, rtn, q, leaves)
  assert len(errors) == 2 * 4 + 1  # one search per layer of each stack, one for the table
  for key, (before, after) in errors.items():
    assert after <= before * 1.0001, (key, before, after)
  assert sum(after < before for before, after in errors.values()) >= len(errors) // 2
  y = jax.jit(sq.quantized(M.plain_forward))(q, batches[0])
  np.testing.assert_allclose(y, M.plain_forward(sq.dequantize(q), batches[0]), atol=5e-4, rtol=1e-4)
  assert sq.explain(M.plain_forward, q, batches[0]).dequantized == ()


@pytest.mark.parametrize(
  "scheme, block",
  [
    (sq.INT4, 32),
    (sq.ASYMMETRIC_INT4, 32),
    (sq.PER_BLOCK, 16),
    (sq.PER_CHANNEL, None),
    (sq.ASYMMETRIC_PER_CHANNEL, None),
  ],
)
def test_clip_search_picks_each_groups_least_error(scheme, block):
  """The clipping bounds of every group and column give that group's least output error
  among the ratios tried (pairs of independent lower and upper ratios for asymmetric
  schemes, one ratio of max|w| otherwise), the errors recomputed in float64 numpy."""
  from sensorquant_jax._src import awq, schemes

  rng = np.random.default_rng(5)
  k, n = 80, 6  # 80: not a whole number of 32-groups
  w = rng.standard_normal((k, n)).astype(np.float32)
  w[rng.integers(0, k, 6), rng.integers(0, n, 6)] *= 6  # outliers worth clipping
  w[:, 0] = np.abs(w[:, 0])  # a column with no negative weight
  x = rng.standard_normal((400, k)).astype(np.float32)
  h = x.T.astype(np.float64) @ x
  axes = (0,) if block else (1,)
  spec = schemes.Spec(scheme, axes, block)
  bounds = np.asarray(awq.clip_search(jnp.asarray(w), jnp.asarray(h, jnp.float32), spec=spec))
  assert bounds.shape == (2, k, n)
  b = block or k
  ratios = 1 - np.arange(int(awq.CLIP_MAX_SHRINK * awq.CLIP_GRID)) / awq.CLIP_GRID

  def group_errors(lo, hi):
    q = schemes.quantize_leaf(jnp.clip(w, lo, hi), spec).dequantize()
    d = w - np.asarray(q, np.float64)
    return np.array(
      [
        [d[g : g + b, j] @ h[g : g + b, g : g + b] @ d[g : g + b, j] for j in range(n)]
        for g in range(0, k, b)
      ]
    )

  def per_group(f):
    return np.array([f(w[g : g + b], 0) for g in range(0, k, b)])

  if scheme in (sq.ASYMMETRIC_INT4, sq.ASYMMETRIC_PER_CHANNEL):
    lo_end, hi_end = per_group(np.min).clip(max=0), per_group(np.max).clip(min=0)
    pairs = [(a, c) for a in ratios for c in ratios]
  else:
    hi_end = per_group(lambda v, axis: np.abs(v).max(axis))
    lo_end = -hi_end
    pairs = [(r, r) for r in ratios]

  def full(v):
    return np.repeat(v, b, 0)[:k]

  tried = np.stack([group_errors(full(a * lo_end), full(c * hi_end)) for a, c in pairs])
  chosen = group_errors(bounds[0], bounds[1])
  np.testing.assert_allclose(chosen, tried.min(0), rtol=1e-4, atol=1e-6)
  assert (chosen <= tried[0] * (1 + 1e-5)).all()  # never worse than no clipping
  if scheme in sq.INT4_SCHEMES:  # 16 levels: the outliers are worth clipping
    assert (bounds[1] < w).any()
  if scheme == sq.ASYMMETRIC_INT4:  # the two ends move apart from each other
    assert (bounds[0] != -bounds[1]).any()


def test_fp8_gets_scales_without_clipping(setup):
  """E4M3's spacing is relative and block128's tile scales couple columns: AWQ on fp8
  is its scale search alone, and no worse than round-to-nearest."""
  model, params, xs = setup
  on = sq.awq(model, params, xs, sq.FP8_BLOCK, min_size=1, progress=False)
  off = sq.awq(model, params, xs, sq.FP8_BLOCK, min_size=1, clip=False, progress=False)
  chex.assert_trees_all_equal(on, off)
  rtn = sq.quantize(params, sq.FP8_BLOCK, min_size=1)
  assert out_error(model, params, on, xs) <= out_error(model, params, rtn, xs) * 1.0001


@pytest.mark.parametrize("scheme", [sq.INT4, sq.ASYMMETRIC_INT4])
def test_clipping_lowers_the_error_of_the_scaled_model(scheme, setup):
  model, params, xs = setup
  plain = sq.awq(model, params, xs, scheme, min_size=1, clip=False, progress=False)
  clipped = sq.awq(model, params, xs, scheme, min_size=1, progress=False)
  assert out_error(model, params, clipped, xs) < out_error(model, params, plain, xs)
  a, b = plain["params"]["fc1"]["kernel"], clipped["params"]["fc1"]["kernel"]
  np.testing.assert_array_equal(a.input_scale, b.input_scale)  # the scale search is the same
  assert not np.array_equal(np.asarray(a.values), np.asarray(b.values))


@pytest.mark.parametrize("blockwise", [True, False])
def test_gptq_rounding_after_the_scales(setup, blockwise):
  """``rounding="gptq"``: the same scales, GPTQ's codes on the scaled kernels; a smaller
  error than AWQ rounded to nearest and than GPTQ alone on this model."""
  model, params, xs = setup
  kw = dict(min_size=1, blockwise=blockwise, progress=False)
  nearest = sq.awq(model, params, xs, sq.INT4, **kw)
  both = sq.awq(model, params, xs, sq.INT4, rounding="gptq", **kw)
  alone = sq.gptq(model, params, xs, sq.INT4, min_size=1, progress=False)
  for name in ("fc1", "fc2"):
    a, b = nearest["params"][name]["kernel"], both["params"][name]["kernel"]
    np.testing.assert_array_equal(a.input_scale, b.input_scale)
    assert not np.array_equal(np.asarray(a.values), np.asarray(b.values))
  e = out_error(model, params, both, xs)
  assert e < out_error(model, params, nearest, xs) and e < out_error(model, params, alone, xs)


class HeadsOut(nn.Module):
  """An attention output projection: a DenseGeneral contracting (heads, head size)."""

  @nn.compact
  def __call__(self, x):
    return nn.DenseGeneral(32, axis=(-2, -1), name="out")(x.reshape(x.shape[:-1] + (4, 16)))


@pytest.mark.parametrize("blockwise", [True, False])
def test_a_kernel_searched_whole_says_it_gets_scales_only(blockwise):
  model = HeadsOut()
  x = planted(n=256)
  params = model.init(jax.random.key(0), x[:1])
  with pytest.warns(UserWarning, match=r"no clipping or GPTQ rounding for params/out/kernel"):
    q = sq.awq(
      model,
      params,
      [x],
      sq.INT4,
      min_size=1,
      rounding="gptq",
      blockwise=blockwise,
      progress=False,
    )
  assert q["params"]["out"]["kernel"].input_scale is not None  # the scales still apply


@pytest.mark.parametrize(
  "scheme, block", [(sq.INT4, 32), (sq.ASYMMETRIC_INT4, 32), (sq.PER_CHANNEL, None)]
)
def test_scale_search_takes_the_least_error_of_both_families(scheme, block):
  """The paper's ``mean|x| ** r`` and AutoAWQ's duo ``mean|x| ** r / w_mean ** (1 - r)``,
  re-derived and measured in float64 numpy: the search returns the scale of least error."""
  from sensorquant_jax._src import awq, schemes

  rng = np.random.default_rng(7)
  k, n, grid = 96, 8, 10
  w = rng.standard_normal((k, n)).astype(np.float32)
  x = (rng.standard_normal((300, k)) * np.exp(rng.standard_normal(k))).astype(np.float32)
  h = x.T.astype(np.float64) @ x
  act = np.maximum(np.abs(x).mean(0), 1e-8)
  spec = schemes.Spec(scheme, (0,) if block else (1,), block)
  a = np.abs(w.astype(np.float64))
  if block:
    top = np.concatenate(
      [np.repeat(a[g : g + block].max(0, keepdims=True), block, 0) for g in range(0, k, block)]
    )
  else:
    top = a.max(0, keepdims=True)
  w_mean = (a / (top + 1e-6)).mean(1)

  def scale(r, duo):
    s = act**r / (w_mean ** (1 - r) + 1e-4 if duo else 1.0)
    s = np.maximum(s, 1e-4)
    return s / np.sqrt(s.max() * s.min())

  def error(s):
    s32 = jnp.asarray(s, jnp.float32)
    q = schemes.quantize_leaf(jnp.asarray(w) * s32[:, None], spec).dequantize(jnp.float32)
    d = w.astype(np.float64) - np.asarray(q, np.float64) / np.asarray(s32, np.float64)[:, None]
    return float(np.sum((h @ d) * d))

  candidates = [scale(i / grid, duo) for duo in (False, True) for i in range(grid)]
  errors = [error(s) for s in candidates]
  got, got_errors = awq.search(
    jnp.asarray(w),
    jnp.asarray(h, jnp.float32),
    jnp.asarray(act, jnp.float32),
    spec=spec,
    n_in=1,
    grid=grid,
  )
  np.testing.assert_allclose(np.asarray(got_errors), errors, rtol=1e-3)
  assert error(np.asarray(got, np.float64)) <= min(errors) * (1 + 1e-4)
