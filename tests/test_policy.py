"""``sq.auto_policy`` under SQNR, output-error, accuracy and bits-per-weight budgets."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sensorquant_jax as sq
from sensorquant_jax._src import policy as policy_mod
from sensorquant_jax._src import schemes


class MLP(nn.Module):  # for the output-error budget
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(128, name="fc1")(x))
    h = nn.gelu(nn.Dense(128, name="fc2")(h))
    return nn.Dense(10, name="fc3")(h)


def _outlier_params():
  rng = np.random.default_rng(1)
  normal = rng.standard_normal((128, 128)).astype(np.float32) * 0.05
  outlier = rng.standard_normal((128, 128)).astype(np.float32) * 0.05
  outlier[:, 7] *= 400  # one column dwarfs the rest: per-tensor wastes its range
  return {
    "params": {"a": {"kernel": normal}, "b": {"kernel": outlier}, "c": {"kernel": normal.T.copy()}}
  }


def test_auto_policy_meets_sqnr_budget_and_beats_all_per_block():
  params = _outlier_params()
  budget = 38.0
  per_tensor = sq.report(params, sq.quantize(params, "symmetric_per_tensor_int8"), show=False)
  assert min(r["sqnr_db"] for r in per_tensor["layers"]) < budget  # per-tensor misses
  policy = sq.auto_policy(params, budget=budget)
  assert policy.choices["params/b/kernel"] != "symmetric_per_tensor_int8"
  assert policy.choices["params/a/kernel"] == "symmetric_per_tensor_int8"
  q = sq.quantize(params, rules=policy.rules)
  rep = sq.report(params, q, show=False)
  assert all(r["sqnr_db"] >= budget for r in rep["layers"])
  assert len(rep["layers"]) == 3
  assert sq.nbytes(q) < sq.nbytes(sq.quantize(params, "symmetric_per_block_int8"))
  assert "smallest meeting" in policy.reasons["params/b/kernel"]


def test_auto_policy_output_error_budget():
  model = MLP()
  params = model.init(jax.random.key(0), jnp.zeros((1, 64)))
  params["params"]["fc2"]["kernel"] = params["params"]["fc2"]["kernel"].at[:, 3].multiply(300.0)
  batches = [
    np.random.default_rng(i).standard_normal((64, 64)).astype(np.float32) for i in range(2)
  ]
  loose = sq.auto_policy(
    params, budget=sq.Budget(max_output_error=1.0), model=model, batches=batches
  )
  tight = sq.auto_policy(
    params, budget=sq.Budget(max_output_error=2e-3), model=model, batches=batches
  )
  assert set(loose.choices.values()) == {sq.INT4}  # the cheapest option meets a loose budget
  assert tight.choices != loose.choices

  def out_err(policy):
    q = sq.dequantize(sq.quantize(params, rules=policy.rules))
    num = sum(float(np.sum((model.apply(q, b) - model.apply(params, b)) ** 2)) for b in batches)
    den = sum(float(np.sum(model.apply(params, b) ** 2)) for b in batches)
    return np.sqrt(num / den)

  assert out_err(tight) <= 2e-3 < out_err(loose)


def test_auto_policy_accuracy_budget():
  model = MLP()
  params = model.init(jax.random.key(0), jnp.zeros((1, 64)))
  params["params"]["fc2"]["kernel"] = params["params"]["fc2"]["kernel"].at[:, 3].multiply(300.0)
  batches = [
    np.random.default_rng(i).standard_normal((256, 64)).astype(np.float32) for i in range(2)
  ]
  labels = [np.asarray(model.apply(params, b)).argmax(-1) for b in batches]  # float is 100%
  policy = sq.auto_policy(
    params, budget=sq.Budget(max_accuracy_drop=0.0), model=model, batches=batches, labels=labels
  )
  q = sq.dequantize(sq.quantize(params, rules=policy.rules))
  for b, lab in zip(batches, labels, strict=True):
    assert np.all(np.asarray(model.apply(q, b)).argmax(-1) == lab)
  with pytest.raises(ValueError, match="needs labels"):
    sq.auto_policy(params, budget=sq.Budget(max_accuracy_drop=0.01), model=model, batches=batches)


def _stored_bits(params, q, min_size=sq.MIN_SIZE):
  flat = {sq.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  qflat = {
    sq.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(q, is_leaf=sq.is_qarray)[0]
  }
  paths = [p for p, x in flat.items() if x.ndim >= 2 and x.size >= min_size]
  stored = sum(sq.nbytes(qflat[p]) for p in paths)
  return 8 * stored / sum(flat[p].size for p in paths)


@pytest.mark.parametrize("bits", [4.5, 5.0, 6.0, 9.0])
def test_bits_budget_is_met_exactly_as_nbytes_counts(bits):
  params = _outlier_params()
  params["params"]["e"] = {"embedding": np.ones((300, 48), np.float32)}
  policy = sq.auto_policy(params, budget=sq.Budget(max_bits_per_weight=bits))
  q = sq.quantize(params, rules=policy.rules)
  got = _stored_bits(params, q)
  assert got <= bits and got == pytest.approx(policy.bits_per_weight, abs=1e-12)
  assert got > bits - 1.0  # the budget is used, not wasted
  assert set(policy.reasons) == set(policy.choices)
  assert all("bits/weight" in r for r in policy.reasons.values())


def test_bits_budget_spends_bits_where_they_lower_error_most():
  params = _outlier_params()
  loose = sq.auto_policy(params, budget=sq.Budget(max_bits_per_weight=8.5))
  tight = sq.auto_policy(params, budget=sq.Budget(max_bits_per_weight=4.6))

  def err(policy):
    q = sq.dequantize(sq.quantize(params, rules=policy.rules))
    return sum(
      float(
        np.sum((np.asarray(q["params"][k]["kernel"]) - v["kernel"]) ** 2) / np.sum(v["kernel"] ** 2)
      )
      for k, v in params["params"].items()
    )

  assert err(loose) < err(tight)
  # the outlier kernel never goes per-tensor: per-channel or groups cost little more
  assert loose.choices["params/b/kernel"] != sq.PER_TENSOR
  with pytest.raises(ValueError, match="below the smallest choice"):
    sq.auto_policy(params, budget=sq.Budget(max_bits_per_weight=3.0))
  with pytest.raises(ValueError, match="cannot be combined"):
    sq.auto_policy(params, budget=sq.Budget(max_bits_per_weight=5, min_sqnr_db=30))


class Square(nn.Module):  # equal layer shapes: one compilation serves both
  @nn.compact
  def __call__(self, x):
    return nn.Dense(64, name="fc2")(nn.gelu(nn.Dense(64, name="fc1")(x)))


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_bits_budget_with_a_model_and_methods(method):
  model = Square()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((512, 64)).astype(np.float32)
  x[:, :3] *= 20
  params = model.init(jax.random.key(0), x[:1])
  batches = [x[:256], x[256:]]
  policy = sq.auto_policy(
    params, budget=sq.Budget(max_bits_per_weight=5.0), model=model, batches=batches, method=method
  )
  assert policy.method == method
  apply = {
    "rtn": lambda: sq.quantize(params, rules=policy.rules),
    "gptq": lambda: sq.gptq(model, params, batches, rules=policy.rules, progress=False),
    "awq": lambda: sq.awq(model, params, batches, rules=policy.rules, progress=False),
  }[method]
  q = apply()
  got = _stored_bits(params, q)
  assert got <= 5.0 and got == pytest.approx(policy.bits_per_weight, abs=1e-12)
  assert "output error" in policy.reasons["params/fc1/kernel"]


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_bits_budget_on_kernels_found_at_the_op(method, monkeypatch):
  """A plain function with stacked layers: output errors from each layer's own inputs."""
  from tests import llm_models as M

  # Four of the ten options (each costs its compilations; all ten at the op are weighed in
  # tests/test_blockwise.py's bits budget).
  monkeypatch.setattr(
    policy_mod,
    "BITS_CANDIDATES",
    ((sq.INT4, 32), (schemes.ASYMMETRIC_INT4, 128), (sq.PER_CHANNEL, None), (sq.PER_BLOCK, None)),
  )

  cfg = M.Config(vocab=256, embed=128, heads=1, head_dim=128, hidden=128, layers=1)
  params = M.init_plain(cfg, jax.random.key(0))
  batches = [jax.random.randint(jax.random.key(i), (2, 8), 0, cfg.vocab) for i in range(2)]

  def fn(p, t):
    return M.plain_forward(p, t, cfg)

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    policy = sq.auto_policy(
      params, budget=sq.Budget(max_bits_per_weight=6.0), model=fn, batches=batches, method=method
    )
  assert not [w for w in caught if "auto_policy" in str(w.message)]  # every leaf measured
  for leaf in ("layers/wqkv", "layers/w_up", "embedding"):
    assert "output error" in policy.reasons[leaf], policy.reasons[leaf]
  q = {
    "rtn": lambda: sq.quantize(params, rules=policy.rules),
    "gptq": lambda: sq.gptq(fn, params, batches, rules=policy.rules, progress=False),
    "awq": lambda: sq.awq(fn, params, batches, rules=policy.rules, progress=False),
  }[method]()
  got = _stored_bits(params, q)
  assert got <= 6.0 and got == pytest.approx(policy.bits_per_weight, abs=1e-12)
  # the chosen int4 kernels group along the contracted axis, as like= would
  for leaf, x in q["layers"].items():
    if sq.is_qarray(x) and x.bits == 4:
      assert x.axes == (-2,), (leaf, x.axes)
