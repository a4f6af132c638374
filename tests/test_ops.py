"""Int8 ops and Flax integration against float references on dequantized weights."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import sensorquant_jax as sq
from sensorquant_jax._src import ops, packed

SCHEMES = [s for s in sq.SCHEMES if sq.bits_of(s) == 8]  # int4: tests/test_int4.py
rng = np.random.default_rng(0)


def _fake_quant_acts(x2, scheme=""):
  """What W8A8 does to activations, in numpy: per-row max|x|/127, round half away
  (fp8 kernels: per-row max|x|/448, E4M3 rounding as ml_dtypes)."""
  x2 = np.asarray(x2, np.float32)
  if scheme in sq.FP8_SCHEMES:
    s = np.maximum(np.max(np.abs(x2), axis=-1, keepdims=True) / np.float32(448), 1e-12)
    q = np.clip(x2 / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return q * s
  s = np.maximum(np.max(np.abs(x2), axis=-1, keepdims=True) / np.float32(127), 1e-12)
  y = x2 / s
  q = np.clip(np.sign(y) * np.floor(np.abs(y) + 0.5), -127, 127)
  return q * s


@pytest.mark.parametrize("static", [False, True])
def test_quantize_activations_is_numpys_ieee_rounding_bit_for_bit(static):
  # 64 x 512 draws: XLA's ``/ 127`` as ``* (1 / 127)`` gave another scale in ~5% of rows.
  x = np.random.default_rng(1).standard_normal((256, 512)).astype(np.float32)
  x[0, :7] = np.float32(0.5) * np.arange(7)  # exact ties at .5 under a static scale of 1
  act_scale = np.float32(1.0) if static else None
  q, s = jax.jit(lambda x: ops.quantize_activations(x, act_scale))(x)
  want_s = (
    np.full((len(x), 1), act_scale, np.float32)
    if static
    else np.maximum(np.max(np.abs(x), axis=-1, keepdims=True) / np.float32(127), 1e-12)
  )
  if not static:  # the draws include rows where a multiply by fl(1 / 127) rounds otherwise
    m = np.max(np.abs(x), axis=-1, keepdims=True)
    assert np.any(m * (np.float32(1) / np.float32(127)) != want_s)
  y = x / want_s
  want_q = np.clip(np.sign(y) * np.floor(np.abs(y) + 0.5), -127, 127).astype(np.int8)
  np.testing.assert_array_equal(np.asarray(s).view(np.uint32), want_s.view(np.uint32))
  np.testing.assert_array_equal(np.asarray(q), want_q)
  if static:
    np.testing.assert_array_equal(np.asarray(q)[0, :7], [0, 1, 1, 2, 2, 3, 3])


# sq.pack leaves fp8 kernels as they are (test_pack_round_trip_and_fallbacks): once each.
PACKINGS = [(s, p) for s in SCHEMES for p in (False, True) if not (p and s in sq.FP8_SCHEMES)]


DENSE_SHAPES = [(1, 256, 1024), (5, 200, 96), (40, 512, 1024)]


# Each scheme, layout and mode on two of the three shapes in turn.
@pytest.mark.parametrize("mode", ["weight_only", "w8a8"])
@pytest.mark.parametrize(
  "scheme,packed,rows,k,n",
  [
    (s, p, *DENSE_SHAPES[(i + j) % len(DENSE_SHAPES)])
    for i, (s, p) in enumerate(PACKINGS)
    for j in (0, 1)
  ],
)
def test_dense_matches_float_on_dequantized(scheme, mode, rows, k, n, packed):
  w = rng.standard_normal((k, n)).astype(np.float32) * rng.uniform(0.1, 2, (1, n))
  x = rng.standard_normal((rows, k)).astype(np.float32)
  b = rng.standard_normal(n).astype(np.float32)
  qa = sq.quantize_array(w, scheme)
  kernel = sq.pack(qa) if packed else qa
  wd = np.asarray(qa.dequantize(), np.float64)
  xin = _fake_quant_acts(x, scheme) if mode == "w8a8" else x
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
    if scheme in ("symmetric_per_block_int8", *sq.FP8_SCHEMES):
      assert p is qa  # block scales vary along K, fp8 values: kept canonical
      continue
    assert isinstance(p, sq.PackedQArray) and p.tiles.shape == (4, 128, 512)
    np.testing.assert_array_equal(sq.unpack(p).dequantize(), qa.dequantize())
    assert p.shape == qa.shape and p.nbytes >= qa.values.nbytes
  with pytest.raises(ValueError, match="unknown mode"):
    sq.dense(np.ones((1, 128), np.float32), sq.quantize_array(w), mode="int4")
  with pytest.raises(ValueError, match="does not match"):
    sq.dense(np.ones((1, 64), np.float32), sq.quantize_array(w))


@pytest.mark.parametrize("mode", ["weight_only", "w8a8"])
def test_integer_kernels_refuse_fp8_weights(mode):
  """The native and Pallas kernels read integer codes: asked for by name on an fp8
  kernel they raise; ``impl="auto"`` takes XLA."""
  qa = sq.quantize_array(rng.standard_normal((64, 32)).astype(np.float32), sq.FP8_PER_CHANNEL)
  x = rng.standard_normal((3, 64)).astype(np.float32)
  for impl in ("native", "pallas"):
    with pytest.raises(ValueError, match="fp8 kernels run on impl='xla'"):
      sq.dense(x, qa, mode=mode, impl=impl)
  np.testing.assert_array_equal(sq.dense(x, qa, mode=mode), sq.dense(x, qa, mode=mode, impl="xla"))


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
