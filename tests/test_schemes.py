"""Exactness of symmetric_per_tensor_int8 against the Rust module's own output, and of
the fp8 schemes against numpy and ml_dtypes."""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

import sensorquant_jax as sq
from sensorquant_jax._src import schemes
from tests.references import fp8_reference

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "oracle", "per_tensor_cases.npz")


def _cases():
  data = np.load(FIXTURE)
  names = sorted({k.split("__")[0] for k in data.files})
  return [(n, data[n + "__w"], data[n + "__q"], data[n + "__scale"]) for n in names]


CASES = _cases()


def test_fixture_covers_the_required_cases():
  names = {c[0] for c in CASES}
  assert len(CASES) >= 70
  for needle in ("ties_pow2", "near_ties", "all_zero", "below_1e-8", "max_f32", "randn"):
    assert any(needle in n for n in names), needle
  # The tie cases really are ties: w / scale == k + 0.5 exactly.
  _, w, _, s = next(c for c in CASES if c[0] == "ties_pow2_-7")
  frac = np.abs(np.float32(w / s)) % 1
  assert np.sum(frac == 0.5) >= 254


def _bits(x):
  return np.asarray(x, np.float32).view(np.uint32)


@pytest.mark.parametrize("name,w,q,s", CASES, ids=[c[0] for c in CASES])
def test_per_tensor_matches_rust_bit_for_bit(name, w, q, s):
  qa = sq.quantize_array(w, "symmetric_per_tensor_int8")
  np.testing.assert_array_equal(np.asarray(qa.values), q)
  assert _bits(np.asarray(qa.scale).reshape(())) == _bits(s), (qa.scale, s)
  assert qa.values.dtype == jnp.int8 and qa.scale.dtype == jnp.float32


def test_per_tensor_matches_rust_under_outer_jit():
  @jax.jit
  def f(tree):
    return sq.quantize(tree, rules=[(".*", "symmetric_per_tensor_int8")])

  tree = {name: w for name, w, _, _ in CASES}
  out = f(tree)
  for name, _, q, s in CASES:
    np.testing.assert_array_equal(np.asarray(out[name].values), q, err_msg=name)
    assert _bits(np.asarray(out[name].scale).reshape(())) == _bits(s), name


def test_dequantize_matches_rust_product():
  # Rust: q as f32 * scale, one f32 multiply. Where that overflows (weights
  # within an ulp of float32 max) Rust gives inf and we clamp to +-max.
  top = np.finfo(np.float32).max
  clamped = 0
  for name, w, q, s in CASES:
    qa = sq.quantize_array(w)
    with np.errstate(over="ignore"):
      rust = q.astype(np.float32) * s
    expect = np.clip(rust, -top, top)
    clamped += int(np.sum(np.isinf(rust)))
    np.testing.assert_array_equal(_bits(qa.dequantize()), _bits(expect), err_msg=name)
  assert clamped > 0  # the max_f32 case exercises the clamp


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the rewrite is XLA:CPU's")
def test_the_two_traps_are_real():
  """Guards the reasons for schemes.exact_div and lax.round's default.

  If XLA ever stops rewriting the division, the first assertion tells us the
  workaround is no longer needed; the test is about our formulation staying
  exact while the naive one is not.
  """
  data = {c[0]: c for c in CASES}
  _, w, q, s = data["ties_pow2_-7"]
  assert np.any(np.asarray(jnp.round(w / s)) != q)  # half to even
  np.testing.assert_array_equal(
    np.clip(np.asarray(lax.round(jnp.asarray(w) / s)), -127, 127).astype(np.int8), q
  )
  rng = np.random.default_rng(0)
  big = rng.standard_normal((512, 512)).astype(np.float32)
  sc = np.float32(np.max(np.abs(big)) / np.float32(127))
  naive = np.asarray(jax.jit(lambda a, b: a / b)(big, sc))
  exact = np.asarray(jax.jit(schemes.exact_div)(big, sc))
  np.testing.assert_array_equal(exact, big / sc)
  # The trap itself: XLA:CPU rewrites the naive a / b into a * (1 / b).
  assert np.sum(naive != big / sc) > 0, "XLA keeps a / b now: exact_div may be simplified"


def test_nan_and_inf_follow_rust_when_not_checked():
  # Rust ignores NaN in the max and casts NaN to 0; an Inf weight makes scale inf.
  w = np.array([np.nan, 1.0, -0.5, np.nan, -0.0], np.float32)
  qa = sq.quantize_array(w, check_finite=False)
  np.testing.assert_array_equal(np.asarray(qa.values), [0, 127, -64, 0, 0])
  assert float(qa.scale.reshape(())) == np.float32(np.float32(1.0) / np.float32(127))
  qa = sq.quantize_array(np.array([np.inf, 1.0, -1.0], np.float32), check_finite=False)
  assert np.isinf(float(qa.scale.reshape(())))
  np.testing.assert_array_equal(np.asarray(qa.values), [0, 0, 0])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtypes_compute_in_float32(dtype):
  w = jnp.asarray(np.random.default_rng(1).standard_normal((40, 40)), dtype)
  qa = sq.quantize_array(w)
  ref = sq.quantize_array(np.asarray(w.astype(jnp.float32)))
  np.testing.assert_array_equal(np.asarray(qa.values), np.asarray(ref.values))
  assert qa.dequantize().dtype == dtype


@pytest.fixture
def fresh_jit_cache():
  # The tests below monkeypatch schemes.exact_div, which jit caches cannot see.
  jax.clear_caches()
  yield
  jax.clear_caches()


def _quantize_all_cases(division_fix):
  """Every oracle case in one vmapped call (one compilation, not one per shape):
  zero padding changes neither ``max|w|`` nor any other value's code."""
  padded = np.zeros((len(CASES), max(w.size for _, w, _, _ in CASES)), np.float32)
  for i, (_, w, _, _) in enumerate(CASES):
    padded[i, : w.size] = w.ravel()
  qa = jax.vmap(lambda w: sq.quantize_array(w, division_fix=division_fix))(padded)
  values, scales = np.asarray(qa.values), np.asarray(qa.scale)
  return [
    (values[i, : w.size].reshape(w.shape), scales[i].reshape(()))
    for i, (_, w, _, _) in enumerate(CASES)
  ]


def _check_all_cases(division_fix=None):
  for (name, _, q, s), (values, scale) in zip(
    CASES, _quantize_all_cases(division_fix), strict=True
  ):
    np.testing.assert_array_equal(values, q, err_msg=name)
    assert _bits(scale) == _bits(s), name


def test_division_fix_is_exact_with_exact_division():
  """The correction used on backends whose division is inexact (GPU) changes nothing here."""
  _check_all_cases(division_fix=True)


def _sloppy(exact_div, ulps):
  """A division whose every quotient is ``ulps`` ulps off, like XLA:GPU's at worst."""

  def div(a, b):
    y = exact_div(a, b)
    for _ in range(abs(ulps)):
      y = jnp.nextafter(y, jnp.float32(np.inf if ulps > 0 else -np.inf))
    return y

  return div


CPU_ONLY = pytest.mark.skipif(
  jax.default_backend() != "cpu",
  reason="simulates an inexact division on top of an exact one (XLA:CPU's)",
)


@CPU_ONLY
@pytest.mark.parametrize("ulps", [-2, -1, 1, 2])
def test_division_fix_repairs_an_inexact_division(ulps, fresh_jit_cache, monkeypatch):
  """Simulates XLA:GPU's approximate f32 division: every quotient off by `ulps`."""
  monkeypatch.setattr(schemes, "exact_div", _sloppy(schemes.exact_div, ulps))
  _check_all_cases(division_fix=True)
  # Without the fix the same division gets values wrong.
  wrong = sum(
    int(np.sum(values != q))
    for (_, _, q, _), (values, _) in zip(
      CASES, _quantize_all_cases(division_fix=False), strict=True
    )
  )
  assert wrong > 0


def _asymmetric_cases():
  """Columns whose quotients and zero points sit exactly on rounding ties."""
  s = 2.0**-4  # scale = (hi - lo) / 255 exactly, every w / s a float
  cols = []
  for lo in (-8.0, -100.5 * s, -3.5 * s):
    hi = lo + 255 * s
    j = np.arange(np.ceil(lo / s - 0.5), np.floor(hi / s - 0.5) + 1)
    ties = (j + 0.5) * s
    cols.append(np.concatenate([[lo, hi], ties[(ties > lo) & (ties < hi)]])[:200])
  width = max(len(c) for c in cols)
  w = np.stack([np.resize(c, width) for c in cols], axis=1)  # repeats keep min/max
  rng = np.random.default_rng(7)
  rand = (rng.standard_normal((width, 5)) * rng.uniform(1e-3, 1e3, (1, 5))).astype(np.float32)
  return np.concatenate([w.astype(np.float32), rand], axis=1)


@CPU_ONLY
@pytest.mark.parametrize("ulps", [-2, -1, 1, 2])
def test_asymmetric_division_fix_repairs_an_inexact_division(ulps, fresh_jit_cache, monkeypatch):
  """The asymmetric scheme (scale, zero point, quotient) under a sloppy division."""
  w = _asymmetric_cases()
  exact = sq.quantize_array(w, "asymmetric_per_channel_int8", division_fix=False)
  monkeypatch.setattr(schemes, "exact_div", _sloppy(schemes.exact_div, ulps))
  jax.clear_caches()
  wrong = sq.quantize_array(w, "asymmetric_per_channel_int8", division_fix=False)
  # Without the fix the ties break: values, and for some columns zero points.
  assert np.sum(np.asarray(wrong.values) != np.asarray(exact.values)) > 0
  fixed = sq.quantize_array(w, "asymmetric_per_channel_int8", division_fix=True)
  np.testing.assert_array_equal(np.asarray(fixed.values), np.asarray(exact.values))
  np.testing.assert_array_equal(np.asarray(fixed.zero_point), np.asarray(exact.zero_point))
  assert _bits(np.asarray(fixed.scale)).tolist() == _bits(np.asarray(exact.scale)).tolist()


def test_div_fix_recovers_correct_rounding_from_neighbours():
  # Magnitudes where the residual is exact (see _div_fix): quotients 1e-30..1e30.
  rng = np.random.default_rng(11)
  a = (rng.standard_normal(20000) * 10.0 ** rng.uniform(-15, 15, 20000)).astype(np.float32)
  b = (rng.standard_normal(20000) * 10.0 ** rng.uniform(-15, 15, 20000)).astype(np.float32)
  exact = (a.astype(np.float64) / b.astype(np.float64)).astype(np.float32)
  for ulps in (-2, -1, 0, 1, 2):
    c0 = exact.copy()
    for _ in range(abs(ulps)):
      c0 = np.nextafter(c0, np.float32(np.inf if ulps > 0 else -np.inf))
    got = np.asarray(jax.jit(schemes._div_fix)(a, b, c0))
    np.testing.assert_array_equal(got, exact)


def _e4m3_grid() -> np.ndarray:
  """Every finite float8_e4m3fn value as float32, ascending (subnormals included)."""
  g = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
  return np.unique(g[np.isfinite(g)])


def test_fp8_rounding_is_ml_dtypes_bit_for_bit_at_ties_subnormals_and_saturation():
  """With a unit scale the stored values are ``float8_e4m3fn(clip(w, -448, 448))`` as
  ml_dtypes converts: every E4M3 value, every midpoint between neighbours (ties to
  even, subnormal ones included), a float32 ulp either side of each, and values past
  448 (saturated, not NaN)."""
  grid = _e4m3_grid()
  mids = (grid[1:] + grid[:-1]) / 2  # exact in float32
  up, down = np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))
  past = np.array([448.5, 464, 465, 480, 1e4, 3e38], np.float32)
  w = np.concatenate([grid, mids, up, down, past, -past])
  assert np.sum(np.abs(mids) < 2.0**-6) >= 14  # subnormal ties are in
  reference = np.clip(w, -448, 448).astype(ml_dtypes.float8_e4m3fn)
  spec = schemes.Spec(sq.FP8_PER_TENSOR)
  got = jax.jit(lambda w: schemes.quantize_leaf(w, spec, scale=jnp.ones((1,), jnp.float32)))(w)
  assert np.asarray(got.values).tobytes() == reference.tobytes()
  # The scheme's own scale maps the largest |w| onto 448: 1 here, the same values.
  inside = w[np.abs(w) <= 448]
  own = sq.quantize_array(np.append(inside, 448), sq.FP8_PER_TENSOR)
  assert float(own.scale[0]) == 1.0
  assert np.asarray(own.values)[:-1].tobytes() == reference[np.abs(w) <= 448].tobytes()


@pytest.mark.parametrize("scheme", [sq.FP8_PER_TENSOR, sq.FP8_PER_CHANNEL, sq.FP8_BLOCK])
def test_fp8_values_and_scales_equal_numpy(scheme):
  """Scales ``max|w| / 448`` per tensor, column or 128 x 128 tile (partial tiles on
  both axes) and values bit for bit against numpy and ml_dtypes, under jit."""
  rng = np.random.default_rng(11)
  w = (rng.standard_normal((300, 260)) * rng.uniform(1e-3, 10, (1, 260))).astype(np.float32)
  w[5, 7] = 0.0
  w[:, 3] = 0.0  # an all-zero column: scale 1e-8, values 0
  q, s = fp8_reference(w, scheme)
  qa = jax.jit(lambda w: sq.quantize_array(w, scheme))(w)
  np.testing.assert_array_equal(np.asarray(qa.scale).view(np.uint32), s.view(np.uint32))
  assert np.asarray(qa.values).tobytes() == q.tobytes()
  full = np.repeat(s, 128, axis=0)[:300] if scheme == sq.FP8_BLOCK else s
  np.testing.assert_array_equal(np.asarray(qa.dequantize()), q.astype(np.float32) * full)
  if scheme == sq.FP8_BLOCK:  # one scale per tile: equal over each tile's 128 columns
    for t in range(0, 260, 128):
      assert (s[:, t : t + 128] == s[:, t : t + 1]).all()


def test_fp8_scales_are_correctly_rounded_where_a_shard_holds_a_whole_tile():
  """A (2, 4) mesh over a 256 x 512 kernel gives each device one 128 x 128 tile; the
  scales still equal the unsharded ones (and numpy's) bit for bit."""
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = Mesh(np.array(jax.devices("cpu")[:8]).reshape(2, 4), ("a", "b"))
  w = np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32)
  placed = jax.device_put(w, NamedSharding(mesh, P("a", "b")))
  qa = sq.quantize({"kernel": placed}, sq.FP8_BLOCK)["kernel"]
  q, s = fp8_reference(w, sq.FP8_BLOCK)
  np.testing.assert_array_equal(np.asarray(qa.scale).view(np.uint32), s.view(np.uint32))
  assert np.asarray(qa.values).tobytes() == q.tobytes()
