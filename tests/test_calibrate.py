"""Observers against numpy references; static W8A8 with outliers; report; auto_policy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sensorquant_jax as sq
from sensorquant_jax.example_model import load_example


class OneDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(16, name="fc")(x)


def _data(kind, n=20_000, features=8, seed=0):
  rng = np.random.default_rng(seed)
  if kind == "normal":
    x = rng.standard_normal((n, features))
  elif kind == "uniform":
    x = rng.uniform(-3, 2, (n, features))
  else:
    x = rng.laplace(0.5, 1.0, (n, features))
  return x.astype(np.float32)


def _batches(x, sizes):
  cuts = np.cumsum(sizes)[:-1]
  return np.split(x, cuts)


@pytest.fixture(scope="module")
def one_dense():
  model = OneDense()
  return model, model.init(jax.random.key(0), jnp.zeros((1, 8)))


@pytest.mark.parametrize("dist", ["normal", "uniform", "laplace"])
def test_minmax_and_percentile_match_numpy_for_any_batching(dist, one_dense):
  model, params = one_dense
  x = _data(dist)
  ref_pct = (np.percentile(x.astype(np.float64), 0.1), np.percentile(x.astype(np.float64), 99.9))
  results = {}
  for sizes in ([5000] * 4, [3000, 7000, 1234, 8766]):
    batches = _batches(x, sizes)
    mm = sq.calibrate(model, params, batches)["params/fc"]
    pc = sq.calibrate(
      model, params, batches, observer="percentile", percentile=99.9, max_samples=200_000
    )["params/fc"]
    assert (mm.act_min, mm.act_max) == (float(x.min()), float(x.max()))
    np.testing.assert_allclose((pc.act_min, pc.act_max), ref_pct, rtol=1e-6)
    results[tuple(sizes)] = (mm, pc)
    w = np.asarray(params["params"]["fc"]["kernel"])
    assert (mm.w_min, mm.w_max) == (float(w.min()), float(w.max())) and mm.name == "fc"
  a, b = results.values()
  assert a == b  # order/batching independent, bit for bit


def test_moving_average_matches_reference(one_dense):
  model, params = one_dense
  x = _data("normal", 8000)
  batches = _batches(x, [2000] * 4)
  got = sq.calibrate(model, params, batches, observer="moving_average", momentum=0.8)["params/fc"]
  lo, hi = float(batches[0].min()), float(batches[0].max())
  for b in batches[1:]:
    lo, hi = 0.8 * lo + 0.2 * float(b.min()), 0.8 * hi + 0.2 * float(b.max())
  np.testing.assert_allclose((got.act_min, got.act_max), (lo, hi), rtol=1e-12)


def _mse(x, c):
  s = c / 127.0
  q = np.clip(np.sign(x / s) * np.floor(np.abs(x / s) + 0.5), -127, 127) * s
  return float(np.mean((x - q) ** 2))


@pytest.mark.parametrize("dist", ["normal", "laplace"])
def test_mse_clip_is_near_brute_force_and_batching_independent(dist, one_dense):
  model, params = one_dense
  x = _data(dist, 12_000, seed=3)
  x[::997] *= 30  # a few outliers make clipping worthwhile
  amax = float(np.abs(x).max())
  brute = min((_mse(x.astype(np.float64), c), c) for c in np.linspace(amax / 400, amax, 400))
  got = []
  for sizes in ([6000, 6000], [1000, 4000, 7000]):
    cal = sq.calibrate(model, params, _batches(x, sizes), observer="mse", grid=128)["params/fc"]
    got.append(cal)
    clip = max(abs(cal.act_min), abs(cal.act_max))
    assert _mse(x.astype(np.float64), clip) <= brute[0] * 1.05
    assert clip < amax * 0.9
  assert got[0] == got[1]


def test_calibration_json_round_trip(one_dense, tmp_path):
  model, params = one_dense
  cal = sq.calibrate(model, params, [_data("normal", 100)])
  sq.save_calibration(tmp_path / "cal.json", cal)
  assert sq.load_calibration(tmp_path / "cal.json") == cal
  (tmp_path / "bad.json").write_text('{"x": 1}')
  with pytest.raises(ValueError):
    sq.load_calibration(tmp_path / "bad.json")
  with pytest.raises(ValueError, match="unknown observer"):
    sq.calibrate(model, params, [], observer="magic")
  with pytest.raises(ValueError, match="twice"):
    sq.calibrate(model, params, iter([_data("normal", 10)]), observer="mse")


def test_static_w8a8_with_outliers_prefers_percentile_and_mse():
  """Rare glitches in the calibration data inflate min/max ranges; robust observers do not.

  The bundled transformer encoder is calibrated on held-out windows in which
  0.05% of the samples are sensor glitches (x60 spikes), then evaluated on
  clean windows: static W8A8 output error must rank min/max last.
  """
  model, variables, split = load_example()
  rng = np.random.default_rng(0)
  calib = split["x"][:384].copy()
  glitch = rng.random(calib.shape) < 5e-4
  calib[glitch] *= 60
  batches = [calib[i : i + 128] for i in range(0, 384, 128)]
  x_eval = split["x"][384:896]
  ref = np.asarray(model.apply(variables, x_eval))
  q = sq.quantize(variables, "symmetric_per_channel_int8")
  errs = {}
  for obs, kw in (
    ("minmax", {}),
    ("percentile", {"percentile": 99.9, "max_samples": 2_000_000}),
    ("mse", {}),
  ):
    cal = sq.calibrate(model, variables, batches, observer=obs, **kw)
    scales = sq.act_scales(cal)
    y = jax.jit(lambda q, x, s=scales: sq.apply(model, q, x, mode="w8a8", act_scales=s))(q, x_eval)
    errs[obs] = float(np.mean((np.asarray(y) - ref) ** 2))
  assert errs["percentile"] < errs["minmax"], errs
  assert errs["mse"] < errs["minmax"], errs


def test_calibrate_finds_matmuls_at_the_op():
  """Einsum layers and plain functions: ranges by leaf path, looked up by sq.quantized."""
  from tests import llm_models as M

  cfg = M.Config()
  params = M.init_plain(cfg, jax.random.key(0))
  batches = [jax.random.randint(jax.random.key(i), (2, 8), 0, cfg.vocab) for i in range(3)]
  cal = sq.calibrate(M.plain_forward, params, batches)
  assert set(cal) == {"embedding", "layers/wqkv", "layers/wo", "layers/w_up", "layers/w_down"}
  # layer 0's wqkv reads embedding rows times the norm; layer 1's too: the range covers both
  x0 = np.concatenate(
    [
      np.asarray(params["embedding"])[np.asarray(t)] * np.asarray(params["layers"]["norm"][0])
      for t in batches
    ]
  )
  assert cal["layers/wqkv"].act_max >= float(x0.max())
  assert cal["layers/wqkv"].act_min <= float(x0.min())
  scales = sq.act_scales(cal)
  q = sq.quantize(params, sq.PER_CHANNEL, like=(M.plain_forward, batches[0]))
  dynamic = sq.quantized(M.plain_forward, mode="w8a8")(q, batches[0])
  static = sq.quantized(M.plain_forward, mode="w8a8", act_scales=scales)(q, batches[0])
  ref = M.plain_forward(sq.dequantize(q), batches[0])
  assert float(jnp.max(jnp.abs(static - dynamic))) > 0  # the static scales are used
  assert float(jnp.max(jnp.abs(static - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))
  model = M.Transformer(cfg, "scan")
  variables = model.init(jax.random.key(0), batches[0])
  cal = sq.calibrate(model, variables, batches)
  assert len(cal) == 6 and "params/layers/block/attn/q_einsum/w" in cal
