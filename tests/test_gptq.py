"""GPTQ against a numpy reference written from the paper, and against round-to-nearest."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import gptq_reference

import sensorquant_jax as sq
from sensorquant_jax._src import gptq, qarray, schemes
from tests.models import MODEL_SCHEMES
from tests.trees import op_level_errors


def correlated(n, k, seed=0, outliers=4):
  """Inputs with a known covariance (``A^T A`` plus noise) and a few loud channels."""
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(k, k)) / np.sqrt(k)
  x = rng.normal(size=(n, k)) @ a + 0.3 * rng.normal(size=(n, k))
  x[:, :outliers] *= 6
  return x.astype(np.float32)


class TwoDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(96, name="fc1")(x))
    return nn.Dense(40, name="fc2")(h)


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64, name="attn")(x, x)


def out_error(model, params, q, xs):
  ref = np.concatenate([np.asarray(model.apply(params, x)) for x in xs])
  got = np.concatenate([np.asarray(sq.apply(model, q, x)) for x in xs])
  return float(np.sum((got - ref) ** 2) / np.sum(ref**2))


@pytest.fixture(scope="module")
def two_dense():
  model = TwoDense()
  x = correlated(1536, 64)
  params = model.init(jax.random.key(1), x[:1])
  return model, params, [x[i : i + 512] for i in range(0, 1536, 512)]


@pytest.mark.parametrize("scheme", sq.SCHEMES)
@pytest.mark.parametrize("act_order", [False, True])
def test_matches_the_paper_reference(scheme, act_order):
  k, n = 72, 24  # K is not a multiple of the update block (32): the padded path
  x = correlated(800, k, seed=3)
  rng = np.random.default_rng(4)
  w = rng.normal(size=(k, n)).astype(np.float32)
  rtn = sq.quantize_array(jnp.asarray(w), scheme, block_size=8 if "block" in scheme else None)
  scale, zero = (np.asarray(a) for a in qarray.grid(rtn))
  qmin, qmax = schemes.code_range(scheme)
  h = x.T @ x
  fp8 = scheme in sq.FP8_SCHEMES  # the grid is E4M3's
  ref = gptq_reference(w, h, scale, zero, qmin, qmax, act_order=act_order, fp8=fp8)
  got = gptq.quantize_layer(w, rtn, h, k, damp=0.01, block=32, act_order=act_order)
  codes = np.asarray(got.codes()).astype(np.float64 if fp8 else np.int32)
  assert np.mean(codes == ref) > 0.99  # float32 vs float64: rare ties may round apart
  deq = lambda q: (q - zero) * scale  # noqa: E731
  e_ref = np.sum((x @ (w - deq(ref))) ** 2)
  e_got = np.sum((x @ (w - deq(codes))) ** 2)
  np.testing.assert_allclose(e_got, e_ref, rtol=0.02)
  np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(rtn.scale))


@pytest.mark.parametrize("scheme", MODEL_SCHEMES)
def test_lowers_the_output_error_below_round_to_nearest(scheme, two_dense):
  model, params, xs = two_dense
  rtn = sq.quantize(params, scheme, min_size=1)
  q = sq.gptq(model, params, xs, scheme, min_size=1, progress=False)
  chex_same_structure(q, rtn)
  for path in ("fc1", "fc2"):
    a, b = q["params"][path]["kernel"], rtn["params"][path]["kernel"]
    np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
    assert (a.scheme, a.axes, a.block_size, a.values.dtype) == (
      b.scheme,
      b.axes,
      b.block_size,
      b.values.dtype,
    )
  e_rtn, e_gptq = out_error(model, params, rtn, xs), out_error(model, params, q, xs)
  assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def chex_same_structure(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)


def test_uncorrelated_inputs_give_round_to_nearest():
  """With a diagonal Hessian no error can be moved: GPTQ is plain rounding."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(40, 16)).astype(np.float32)
  h = np.diag(rng.uniform(0.5, 2.0, 40)).astype(np.float32)
  for scheme in sq.SCHEMES:
    rtn = sq.quantize_array(jnp.asarray(w), scheme, block_size=8 if "block" in scheme else None)
    got = gptq.quantize_layer(w, rtn, h, 40, damp=0.01, block=16, act_order=True)
    np.testing.assert_array_equal(np.asarray(got.values), np.asarray(rtn.values))


def test_dense_general_attention_sequential_and_independent():
  model = Attention()
  x = correlated(8 * 32, 48, seed=5).reshape(8, 32, 48)
  params = model.init(jax.random.key(0), x[:1])
  xs = [x[:4], x[4:]]
  rtn = sq.quantize(params, sq.INT4, min_size=1)
  e_rtn = out_error(model, params, rtn, xs)
  for sequential in (True, False):
    q = sq.gptq(model, params, xs, sq.INT4, min_size=1, sequential=sequential, progress=False)
    attn = q["params"]["attn"]
    assert all(sq.is_qarray(attn[n]["kernel"]) for n in ("query", "key", "value", "out"))
    assert out_error(model, params, q, xs) < 0.8 * e_rtn


def test_rules_progress_and_errors(two_dense, capsys):
  model, params, xs = two_dense
  q = sq.gptq(model, params, lambda: iter(xs), sq.INT4, rules=[("fc2", None)], min_size=1)
  assert sq.is_qarray(q["params"]["fc1"]["kernel"])
  assert not sq.is_qarray(q["params"]["fc2"]["kernel"])
  err = capsys.readouterr().err
  assert "gptq params/fc1/kernel (1 matrix): output error" in err
  assert "gptq: block 1/1 (1 matrix)" in err and "s left" in err
  with pytest.raises(ValueError, match="sequence or a zero-argument callable"):
    sq.gptq(model, params, iter(xs), sq.INT4)
  with pytest.raises(ValueError, match="no batches"):
    sq.gptq(model, params, [], sq.INT4)
  bad = jax.tree_util.tree_map(lambda a: a, params)
  bad["params"]["fc1"]["kernel"] = bad["params"]["fc1"]["kernel"].at[0, 0].set(jnp.nan)
  with pytest.raises(sq.NonFiniteError, match="params/fc1/kernel"):
    sq.gptq(model, bad, xs, sq.INT4)


# --- kernels found at the op (einsum layers, plain functions, scanned stacks) -------------


@pytest.mark.parametrize("scheme", [sq.INT4, sq.PER_CHANNEL])
def test_gptq_on_a_plain_function_with_stacked_layers(scheme):
  from tests import llm_models as M

  cfg = M.Config()
  params = M.init_plain(cfg, jax.random.key(0))
  batches = [jax.random.randint(jax.random.key(i), (2, 16), 0, cfg.vocab) for i in range(3)]
  like = (M.plain_forward, batches[0])
  rtn = sq.quantize(params, scheme, like=like)
  q = sq.gptq(M.plain_forward, params, batches, scheme, like=like, progress=False)
  leaves = ["layers/wqkv", "layers/wo", "layers/w_up", "layers/w_down"]
  for leaf in leaves:
    a, b = rtn["layers"][leaf[7:]], q["layers"][leaf[7:]]
    assert a.scheme == b.scheme and a.axes == b.axes
    np.testing.assert_array_equal(a.scale, b.scale)  # same grid, new codes
    assert float(jnp.mean(a.codes() != b.codes())) > 0.01, leaf
  errors = op_level_errors(M.plain_forward, params, batches, rtn, q, leaves)
  assert len(errors) == 2 * len(leaves)  # one Hessian per layer of each stack
  for key, (before, after) in errors.items():
    assert after < before, (key, before, after)
  # the captured X^T X of layer 0's wqkv equals one computed by hand
  from sensorquant_jax._src import gptq as G

  stats, _ = G.op_level_stats(
    M.plain_forward, params, lambda: iter(batches), ["layers/wqkv"], lambda r: {"xtx": r.T @ r}
  )
  rows = [
    np.asarray(params["embedding"])[np.asarray(t)].reshape(-1, cfg.embed)
    * np.asarray(params["layers"]["norm"][0])
    for t in batches
  ]
  x = np.concatenate(rows).astype(np.float64)
  np.testing.assert_allclose(stats["layers/wqkv|1|0:0"]["xtx"], x.T @ x, rtol=1e-4, atol=1e-2)


def test_gptq_on_gemma_like_einsum_layers():
  from tests import llm_models as M

  cfg = M.Config(layers=1)
  model = M.Transformer(cfg, "scan")
  batches = [jax.random.randint(jax.random.key(i), (2, 8), 0, cfg.vocab) for i in range(2)]
  params = model.init(jax.random.key(0), batches[0])
  like = (model.apply, batches[0])
  rtn = sq.quantize(params, sq.INT4, like=like)
  q = sq.gptq(model, params, batches, sq.INT4, like=like, progress=False)
  kernels = [
    sq.path_str(p)
    for p, x in jax.tree_util.tree_leaves_with_path(rtn, is_leaf=sq.is_qarray)
    if sq.is_qarray(x) and "layers" in sq.path_str(p)
  ]
  assert len(kernels) == 5
  errors = op_level_errors(lambda v, t: model.apply(v, t), params, batches, rtn, q, kernels)
  assert {leaf for leaf, _ in errors} == set(kernels)
  for key, (before, after) in errors.items():
    assert after < before, (key, before, after)
  # the quantized model runs on the GPTQ codes
  y = jax.jit(lambda q, t: sq.apply(model, q, t))(q, batches[0])
  np.testing.assert_allclose(y, model.apply(sq.dequantize(q), batches[0]), atol=2e-4, rtol=1e-4)
