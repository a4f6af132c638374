"""``sq.auto_policy`` under SQNR, output-error and accuracy budgets."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sensorquant_jax as sq


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
