"""``sq.nnx.quantize``: NNX models with int8 layers against their dequantized float models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sensorquant_jax as sq
from tests.models import NNXTransformer

SCHEMES = [s for s in sq.SCHEMES if sq.bits_of(s) == 8]  # int4: tests/test_int4.py
rng = np.random.default_rng(0)


def _dequantized_nnx(qmodel, model):
  ref = nnx.clone(model)
  for path, node in nnx.iter_graph(qmodel):
    if isinstance(node, (sq.nnx.QuantizedLinear, sq.nnx.QuantizedEinsum, sq.nnx.QuantizedEmbed)):
      parent = ref
      for key in path:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
      leaf = "embedding" if isinstance(node, sq.nnx.QuantizedEmbed) else "kernel"
      getattr(parent, leaf).set_value(getattr(node, leaf).get_value().dequantize())
  return ref


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("mode", ["weight_only", "w8a8"])
def test_nnx_quantize_matches_dequantized_model(scheme, mode):
  model = NNXTransformer(rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 96)
  qmodel = sq.nnx.quantize(model, scheme, min_size=256, mode=mode)
  assert isinstance(qmodel.blocks[0].fc1, sq.nnx.QuantizedLinear)
  assert isinstance(qmodel.blocks[0].attn.query, sq.nnx.QuantizedLinear)  # LinearGeneral
  assert isinstance(qmodel.embed, sq.nnx.QuantizedEmbed)
  assert isinstance(qmodel.mix, sq.nnx.QuantizedEinsum)
  assert type(model.blocks[0].fc1) is nnx.Linear  # the input model is untouched
  y = nnx.jit(lambda m, t: m(t))(qmodel, tokens)
  ref = _dequantized_nnx(qmodel, model)(tokens)
  if mode == "weight_only":
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  else:
    assert float(jnp.max(jnp.abs(y - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))
