"""quantize/dequantize over pytrees: properties, Flax models, rules, errors, sharding."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sensorquant_jax as sq
from tests.models import MODEL_SCHEMES, TinyTransformer
from tests.references import fp8_reference, int4_reference

SCHEMES = list(sq.SCHEMES)
INT8 = [s for s in SCHEMES if sq.bits_of(s) == 8]  # int4 models and sharding: test_int4.py

finite_f32 = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
# A fixed menu of shapes keeps XLA compilations cached across examples; the
# values are where the properties live.
SHAPES = [(1,), (7,), (33,), (3, 5), (40, 17), (8, 8, 8), (2, 33, 3), (64, 64)]
arrays = st.sampled_from(SHAPES).flatmap(
  lambda shape: hnp.arrays(np.float32, shape, elements=finite_f32)
)


def _tol(qa, w=None):
  """Half a quantization step per element (plus float32 rounding of the product).

  fp8 E4M3 steps grow with the value: half a step is at most ``|w| / 16``, and
  ``2^-10`` scales among the subnormals.
  """
  s = np.asarray(qa.scale, np.float64)
  if qa.block_size is not None:
    axis = qa.ndim + qa.axes[0]
    s = np.repeat(s, qa.block_size, axis=axis)
    s = np.take(s, np.arange(qa.shape[axis]), axis=axis)
  s = np.broadcast_to(s, qa.shape)
  if qa.scheme in sq.FP8_SCHEMES:
    return np.maximum(np.abs(w) / 16, s * 2.0**-10) * (1 + 1e-6) + 1e-30
  return s / 2 * (1 + 1e-6) + 1e-30


@pytest.mark.parametrize("scheme", SCHEMES)
@given(w=arrays)
def test_error_is_at_most_half_a_step(scheme, w):
  qa = sq.quantize_array(w, scheme)
  err = np.abs(w.astype(np.float64) - np.asarray(qa.dequantize(), np.float64))
  assert np.all(err <= _tol(qa, w) + np.abs(w) * 1e-6)


@pytest.mark.parametrize("scheme", SCHEMES)
@given(w=arrays)
def test_requantizing_is_idempotent_or_within_half_a_step(scheme, w):
  qa = sq.quantize_array(w, scheme)
  d = qa.dequantize()
  qb = sq.quantize_array(d, scheme)
  if qa.zero_point is None:
    np.testing.assert_array_equal(np.asarray(qb.values), np.asarray(qa.values))
    np.testing.assert_allclose(np.asarray(qb.scale), np.asarray(qa.scale), rtol=1e-6)
  else:
    # The zero point is rounded, so the grid need not contain the range's ends:
    # the dequantized range can be one step narrower, and its grid finer.
    err = np.abs(np.asarray(d, np.float64) - np.asarray(qb.dequantize(), np.float64))
    assert np.all(err <= _tol(qb, np.asarray(d)) + np.abs(np.asarray(d)) * 1e-6)


def test_asymmetric_requantizing_can_move_a_code():
  # [-1, 1]: scale 2/255, zero point -0.5 rounds away to -1, so -1 clips to the
  # lowest code and dequantizes to -254/255; the range shrinks by one step.
  w = np.array([[1.0], [-1.0]], np.float32)
  qa = sq.quantize_array(w, "asymmetric_per_channel_int8")
  d = np.asarray(qa.dequantize())
  np.testing.assert_allclose(d[:, 0], [254 / 255, -254 / 255], rtol=1e-6)
  qb = sq.quantize_array(d, "asymmetric_per_channel_int8")
  np.testing.assert_allclose(np.asarray(qb.scale), (2 * 254 / 255) / 255, rtol=1e-6)


@pytest.mark.parametrize("scheme", INT8)  # int4: test_int4.py::test_other_axes_and_dtypes
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@settings(max_examples=4)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=9))
def test_shapes_and_dtypes_round_trip(scheme, dtype, shape):
  w = jnp.asarray(np.random.default_rng(len(shape)).standard_normal(shape), dtype)
  qa = sq.quantize_array(w, scheme)
  stored = jnp.float8_e4m3fn if scheme in sq.FP8_SCHEMES else jnp.int8
  assert qa.shape == w.shape and qa.values.dtype == (jnp.uint8 if qa.bits == 4 else stored)
  assert qa.scale.dtype == jnp.float32 and qa.scale.ndim == w.ndim
  out = qa.dequantize()
  assert out.shape == w.shape and out.dtype == dtype


@pytest.mark.parametrize("scheme", SCHEMES)
def test_matches_numpy_reference(scheme):
  rng = np.random.default_rng(3)
  w = (rng.standard_normal((70, 24)) * rng.uniform(0.01, 5, (1, 24))).astype(np.float32)
  qa = sq.quantize_array(w, scheme)
  f = w.astype(np.float64)

  def rnd(x):
    return np.sign(x) * np.floor(np.abs(x) + 0.5)

  if scheme in sq.FP8_SCHEMES:  # 70 x 24: one partial 128 x 128 tile
    q, s = fp8_reference(w, scheme)
    np.testing.assert_array_equal(np.asarray(qa.scale).view(np.uint32), s.view(np.uint32))
    assert np.asarray(qa.values).tobytes() == q.tobytes()  # bit for bit
    return
  if scheme == "symmetric_per_tensor_int8":
    s = np.float32(np.max(np.abs(w)) / np.float32(127))
    q = np.clip(rnd(w / s), -127, 127)
  elif scheme == "symmetric_per_channel_int8":
    s = (np.max(np.abs(w), axis=0, keepdims=True) / np.float32(127)).astype(np.float32)
    q = np.clip(rnd(w / s), -127, 127)
  elif scheme == "symmetric_per_block_int8":
    blocks = np.pad(f, ((0, 96 - 70), (0, 0))).reshape(3, 32, 24)
    s = (np.max(np.abs(blocks), axis=1) / 127).astype(np.float32)
    q = np.clip(rnd(w / np.repeat(s, 32, axis=0)[:70]), -127, 127)
  elif scheme == "asymmetric_per_channel_int8":
    lo = np.minimum(w.min(0, keepdims=True), 0)
    hi = np.maximum(w.max(0, keepdims=True), 0)
    s = ((hi - lo) / np.float32(255)).astype(np.float32)
    zp = np.clip(rnd(-128 - lo / s), -128, 127)
    q = np.clip(rnd(w / s) + zp, -128, 127)
    np.testing.assert_array_equal(np.asarray(qa.zero_point), zp)
  else:  # int4, groups of 128 along axis 0: one group of 70
    q, s, zp = int4_reference(w, 128, asymmetric=scheme.startswith("asym"))
    if zp is not None:
      np.testing.assert_array_equal(np.asarray(qa.zero_point), zp)
  np.testing.assert_allclose(np.asarray(qa.scale), s, rtol=1e-7)
  assert np.mean(np.asarray(qa.codes()) != q) < 1e-3  # ulp-level ties only
  assert np.max(np.abs(np.asarray(qa.codes(), np.int32) - q)) <= 1


def _params():
  model = TinyTransformer()
  tokens = jnp.zeros((2, 12), jnp.int32)
  return model, tokens, model.init(jax.random.key(0), tokens)


def test_default_selection_on_a_linen_transformer():
  _, _, params = _params()
  q = sq.quantize(params)
  flat = {
    sq.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(q, is_leaf=sq.is_qarray)[0]
  }
  quantized = {k for k, x in flat.items() if sq.is_qarray(x)}
  assert "params/embed/embedding" in quantized
  assert "params/blocks_0/attn/query/kernel" in quantized  # DenseGeneral [in, h, d]
  assert "params/blocks_0/attn/out/kernel" in quantized  # DenseGeneral [h, d, out]
  assert "params/blocks_1/fc1/kernel" in quantized
  assert "params/conv/kernel" in quantized
  for k in ("params/blocks_0/fc1/bias", "params/ln_f/scale", "params/head/kernel"):
    assert not sq.is_qarray(flat[k]), k  # bias, norm scale, small (64x10)
  assert sq.nbytes(q) < sq.nbytes(params) / 2.5


@pytest.mark.parametrize("scheme", [s for s in MODEL_SCHEMES if sq.bits_of(s) == 8])
def test_linen_transformer_end_to_end(scheme):
  model, tokens, params = _params()
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 96)
  q = sq.quantize(params, scheme)
  eager = sq.dequantize(q)
  jitted = jax.jit(lambda p: sq.dequantize(sq.quantize(p, scheme)))(params)
  chex.assert_trees_all_equal(eager, jitted)  # exact under an outer jit too
  chex.assert_trees_all_equal_shapes_and_dtypes(eager, params)
  ref = model.apply(params, tokens)
  out = model.apply(eager, tokens)
  # E4M3 keeps 3 mantissa bits: up to 6% per weight where int8 keeps 0.4% of the largest.
  tol = 0.1 if scheme in sq.FP8_SCHEMES else 0.05
  assert float(jnp.max(jnp.abs(out - ref))) < tol * float(jnp.max(jnp.abs(ref))) + 1e-3
  # flatten/unflatten and eval_shape
  leaves, treedef = jax.tree_util.tree_flatten(q)
  chex.assert_trees_all_equal(jax.tree_util.tree_unflatten(treedef, leaves), q)
  abstract = jax.eval_shape(lambda p: sq.quantize(p, scheme), params)
  chex.assert_trees_all_equal_shapes_and_dtypes(abstract, q)
  assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(q)


def test_rules_select_schemes_and_skip():
  _, _, params = _params()
  q = sq.quantize(
    params,
    "symmetric_per_channel_int8",
    rules=[
      sq.Rule("embed", None),
      (r"attn/(query|key|value)/kernel$", "symmetric_per_block_int8"),
      sq.Rule("head/kernel", "symmetric_per_tensor_int8"),  # forced despite size
    ],
  )
  p = q["params"]
  assert not sq.is_qarray(p["embed"]["embedding"])
  assert p["blocks_0"]["attn"]["query"]["kernel"].scheme == "symmetric_per_block_int8"
  assert p["blocks_0"]["attn"]["query"]["kernel"].scale.shape == (2, 4, 16)
  assert p["blocks_0"]["fc1"]["kernel"].scheme == "symmetric_per_channel_int8"
  assert p["head"]["kernel"].scheme == "symmetric_per_tensor_int8"
  with pytest.raises(ValueError, match="unknown scheme"):
    sq.quantize(params, "int4")
  with pytest.raises(ValueError, match="params/blocks_0/fc1/kernel.*out of range"):
    sq.quantize(params, rules=[sq.Rule("fc1/kernel", "symmetric_per_channel_int8", axes=(5,))])


def test_already_quantized_and_non_array_leaves_pass_through():
  w = np.ones((64, 64), np.float32)
  tree = {"a": w, "step": 3, "name": "x", "ints": np.arange(4096).reshape(64, 64), "none": None}
  q = sq.quantize(tree)
  assert sq.is_qarray(q["a"]) and q["step"] == 3 and q["name"] == "x" and q["none"] is None
  assert q["ints"] is tree["ints"]
  again = sq.quantize(q)
  assert again["a"] is q["a"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_raise_with_path_and_counts(bad):
  w = np.ones((32, 64), np.float32)
  w[0, :3] = bad
  w2 = np.ones((64, 64), np.float32)
  w2[5, 5] = np.nan
  params = {
    "params": {
      "dense": {"kernel": w},
      "ok": {"kernel": np.ones((64, 64), np.float32)},
      "other": {"kernel": w2},
    }
  }
  kind = "NaN" if np.isnan(bad) else "Inf"
  with pytest.raises(sq.NonFiniteError) as e:
    sq.quantize(params)
  msg = str(e.value)
  assert f"params/dense/kernel: 3 {kind} of 2048 values" in msg
  assert "params/other/kernel: 1 NaN of 4096 values" in msg
  assert "ok/kernel" not in msg
  with pytest.raises(Exception, match=f"params/dense/kernel: 3 {kind}"):
    jax.block_until_ready(jax.jit(sq.quantize)(params))
  assert sq.quantize(params, check_finite=False)["params"]["dense"]["kernel"].shape == (32, 64)


@pytest.mark.parametrize("scheme", INT8)
def test_sharded_params_stay_sharded(scheme):
  devices = np.array(jax.devices("cpu")[:8])  # CPU devices exist on GPU machines too
  assert devices.size == 8, "conftest sets 8 host devices"
  mesh = Mesh(devices.reshape(2, 4), ("data", "model"))
  w = np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32)
  sharding = NamedSharding(mesh, P("data", "model"))
  ws = jax.device_put(w, sharding)
  qa = sq.quantize({"kernel": ws}, scheme)["kernel"]
  assert qa.values.sharding.is_equivalent_to(sharding, 2)
  reduced = {qa.ndim + a for a in qa.axes}
  if qa.block_size is None:
    expect = P(*[None if i in reduced else n for i, n in enumerate(("data", "model"))])
  else:
    expect = P("data", "model")
  assert qa.scale.sharding.is_equivalent_to(NamedSharding(mesh, expect), 2), qa.scale.sharding
  # Each device only ever held its own shard of the float weights.
  for shard in qa.values.addressable_shards:
    assert shard.data.shape == (128, 128)
  ref = sq.quantize_array(w, scheme)
  np.testing.assert_array_equal(np.asarray(qa.values), np.asarray(ref.values))
  np.testing.assert_array_equal(np.asarray(qa.scale), np.asarray(ref.scale))


# ---------------------------------------------------------------------------
# Extreme and degenerate inputs.
# ---------------------------------------------------------------------------


def test_per_tensor_scale_still_matches_rust_at_float32_max():
  # Only dequantize clamps: the stored scale and values are the Rust module's.
  w = np.array([[3.4028235e38, -3.4028235e38], [1.0, 0.5]], np.float32)
  q = sq.quantize_array(w)
  assert np.float32(q.scale.reshape(())) == np.float32(np.float32(3.4028235e38) / np.float32(127))
  assert np.asarray(q.values).tolist() == [[127, -127], [0, 0]]
  top = np.finfo(np.float32).max
  np.testing.assert_array_equal(np.asarray(q.dequantize())[0], np.array([top, -top], np.float32))


@pytest.mark.parametrize("scheme", sq.SCHEMES)
@pytest.mark.parametrize("shape", [(0,), (0, 64), (64, 0), (3, 0, 5)])
def test_zero_size_leaves_stay_as_they_are(scheme, shape):
  params = {"empty": jnp.zeros(shape), "w": jnp.ones((64, 64))}
  q = sq.quantize(params, scheme, rules=[("empty", scheme)])
  assert not sq.is_qarray(q["empty"]) and q["empty"].shape == shape
  assert sq.is_qarray(q["w"])
  with pytest.raises(ValueError, match="empty array"):
    sq.quantize_array(jnp.zeros(shape), scheme)


@pytest.mark.parametrize(
  "rule, needle",
  [
    (("(", None), "not a valid regular expression"),
    ((1, None), "pattern must be a string"),
    (("w", "int3"), "unknown scheme"),
    (("w", 7), "scheme must be a string"),
    (("w", "symmetric_per_channel_int8", "x"), "axes must be integers"),
    (("w", "symmetric_per_block_int8", None, 0), "block_size must be >= 1"),
    (("w",), "expected (pattern, scheme"),
    ({"pattern": "w", "schem": None}, "unexpected keyword"),
  ],
)
def test_rules_are_validated_with_clear_errors(rule, needle):
  with pytest.raises(ValueError, match=re.escape(needle)):
    sq.quantize({"w": jnp.ones((64, 64))}, rules=[rule])
