"""``sq.nnx.quantize``: any NNX model (Linear, LinearGeneral, Einsum, Embed, custom modules,
``nnx.bridge.ToNNX``) on quantized params against its dequantized float model."""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sensorquant_jax as sq
from tests import llm_models as M
from tests.models import MODEL_SCHEMES, NNXTransformer

SCHEMES = [s for s in MODEL_SCHEMES if sq.bits_of(s) == 8]  # int4: tests/test_int4.py


def _dequantized(qmodel: sq.nnx.QuantizedModel) -> nnx.Module:
  model = nnx.clone(qmodel.model)
  _, params, _ = nnx.split(model, nnx.Param, ...)
  nnx.update(model, sq.dequantize(params))
  return model


def _quantized_paths(qmodel) -> set[str]:
  _, params, _ = nnx.split(qmodel.model, nnx.Param, ...)
  return set(
    sq.path_str(p)
    for p, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params), is_leaf=sq.is_qarray)
    if sq.is_qarray(x)
  )


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("mode", ["weight_only", "w8a8"])
def test_nnx_quantize_matches_dequantized_model(scheme, mode):
  model = NNXTransformer(rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 96)
  like = (lambda m, t: m(t), tokens)
  qmodel = sq.nnx.quantize(model, scheme, min_size=256, mode=mode, like=like)
  paths = _quantized_paths(qmodel)
  assert {
    "blocks/0/fc1/kernel",
    "blocks/0/attn/query/kernel",
    "embed/embedding",
    "mix/kernel",
  } <= paths
  assert type(model.blocks[0].fc1.kernel.get_value()) is not sq.QArray  # input untouched
  y = nnx.jit(lambda m, t: m(t))(qmodel, tokens)
  ref = _dequantized(qmodel)(tokens)
  if mode == "weight_only":
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  else:  # E4M3 activations keep 3 mantissa bits: up to 6% each (int8: 0.4% of the largest)
    tol = 0.1 if scheme in sq.FP8_SCHEMES else 0.05
    assert float(jnp.max(jnp.abs(y - ref))) < tol * float(jnp.max(jnp.abs(ref)))
    assert float(jnp.max(jnp.abs(y - ref))) > 0  # activations are quantized


def test_nnx_einsum_and_embed_run_on_quantized_ops():
  model = NNXTransformer(rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 96)
  like = (lambda m, t: m(t), tokens)
  qmodel = sq.nnx.quantize(model, sq.PER_CHANNEL, min_size=256, like=like)
  # the conv filter is read by no matmul: it stays float with like=
  assert not any(p.startswith("conv/") for p in _quantized_paths(qmodel))
  _, params, rest = nnx.split(qmodel.model, nnx.Param, ...)
  graphdef = nnx.graphdef(qmodel.model)

  def run(p, t):
    state = nnx.State(params)
    nnx.replace_by_pure_dict(state, p)
    return nnx.merge(graphdef, state, rest)(t)

  ex = sq.explain(run, nnx.to_pure_dict(params), tokens)
  assert ex.dequantized == ()
  kinds = {(u.leaf, u.kind) for u in ex}
  assert ("mix/kernel", "dot") in kinds and ("embed/embedding", "gather") in kinds
  np.testing.assert_allclose(qmodel(tokens), _dequantized(qmodel)(tokens), rtol=1e-5, atol=1e-5)


def test_nnx_bridge_to_nnx_gemma_like():
  cfg = M.Config(layers=1)
  tokens = jax.random.randint(jax.random.key(1), (1, 5), 0, cfg.vocab)
  model = nnx.bridge.ToNNX(M.Transformer(cfg), rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(model, tokens)
  qmodel = sq.nnx.quantize(model, sq.INT4, like=(lambda m, t: m(t), tokens))
  paths = _quantized_paths(qmodel)
  assert len(paths) == 6, paths  # five kernels and the table
  y = nnx.jit(lambda m, t: m(t, last_only=True))(qmodel, tokens)
  np.testing.assert_allclose(y, _dequantized(qmodel)(tokens)[:, -1:], atol=2e-4, rtol=1e-4)
  _, params, _ = nnx.split(qmodel.model, nnx.Param, ...)
  kernels = [
    x
    for x in jax.tree_util.tree_leaves(nnx.to_pure_dict(params), is_leaf=sq.is_qarray)
    if sq.is_qarray(x)
  ]
  assert max(x.nbytes / x.size for x in kernels) <= 0.56
  # the compiled NNX call holds no float array of any kernel's size
  text = nnx.jit(lambda m, t: m(t)).lower(qmodel, tokens).compile().as_text()
  sizes = {
    math.prod(int(d) for d in dims.split(",") if d)
    for dims in re.findall(r"\b(?:bf16|f32)\[([\d,]*)\]", text)
  }
  assert not {x.size for x in kernels} & sizes


def test_methods_and_state_updates_pass_through():
  class Counter(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(64, 64, rngs=rngs)
      self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))
      self.out = nnx.Linear(64, 8, rngs=rngs)

    def __call__(self, x):
      self.calls[...] += 1
      return self.out(self.fc(x))

    def features(self, x):
      return self.fc(x)

  model = Counter(nnx.Rngs(0))
  q = sq.nnx.quantize(model, sq.PER_CHANNEL, min_size=0)
  x = jnp.ones((2, 64))
  q(x)
  q(x)
  assert int(q.model.calls[...]) == 2 and int(model.calls[...]) == 0
  np.testing.assert_allclose(q.features(x), _dequantized(q).features(x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    q.call(lambda m, x: m.out(x), x), _dequantized(q).out(x), rtol=1e-5, atol=1e-5
  )
  with pytest.raises(ValueError, match="like must be"):
    sq.nnx.quantize(model, like=x)


def test_linen_module_through_bridge_dense():
  model = nnx.bridge.ToNNX(nn.Dense(48), rngs=nnx.Rngs(0))
  x = jnp.ones((2, 64))
  nnx.bridge.lazy_init(model, x)
  q = sq.nnx.quantize(model, sq.PER_CHANNEL, min_size=0)
  assert _quantized_paths(q) == {"kernel"}
  np.testing.assert_allclose(q(x), _dequantized(q)(x), rtol=1e-5, atol=1e-5)
