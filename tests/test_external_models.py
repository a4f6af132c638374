"""Model code we did not write: Google's RecurrentGemma (Griffin, Linen) from the package
registry, pinned (recurrentgemma 1.0.1, installed with ``--no-deps`` by the README's test
command so that our jax / numpy stay as they are), tiny config, random init."""

import io
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sensorquant_jax as sq
from tests.trees import op_level_errors

rg = pytest.importorskip("recurrentgemma.jax")
spm = pytest.importorskip("sentencepiece")

CFG = dict(
  vocab_size=256,
  width=256,
  mlp_expanded_width=512,
  num_heads=2,
  embeddings_scale_by_sqrt_dim=True,
  attention_window_size=16,
  logits_soft_cap=30.0,
  lru_width=256,
)
TOKENS = jnp.array([[1, 5, 9, 13, 17]])
POS = jnp.arange(5)[None]


@pytest.fixture(scope="module")
def griffin():
  blocks = (rg.TemporalBlockType.RECURRENT, rg.TemporalBlockType.ATTENTION)
  model = rg.Griffin(rg.GriffinConfig(block_types=blocks, **CFG))
  return model, model.init(jax.random.key(0), TOKENS, POS)


def _forward(model):
  def fwd(v, t, p):
    return model.apply(v, t, p, return_cache=False)[0]

  return fwd


@pytest.mark.parametrize("scheme", [sq.PER_CHANNEL, sq.INT4, sq.ASYMMETRIC_INT4, sq.FP8_BLOCK])
def test_every_matmul_runs_quantized(griffin, scheme):
  model, params = griffin
  fwd = _forward(model)
  q = sq.quantize(params, scheme, like=(fwd, TOKENS, POS))
  leaves = {
    sq.path_str(p): x
    for p, x in jax.tree_util.tree_leaves_with_path(q, is_leaf=sq.is_qarray)
    if sq.is_qarray(x)
  }
  # 9 Dense kernels, 2 block-diagonal gates (a batched einsum), 2 gated MLP einsums
  # (2, D, F), the table; the conv filter (an elementwise product), biases, norms and
  # the LRU's a_param are read by no matmul: they stay float
  assert len(leaves) == 14, sorted(leaves)
  assert not any("conv_1d" in p or p.endswith("/b") or "bias" in p for p in leaves)
  if sq.bits_of(scheme) == 4:
    assert max(x.nbytes / x.size for x in leaves.values()) <= 0.56
  ref = fwd(sq.dequantize(q), TOKENS, POS)
  # Python flags (return_cache=False) stay static through the transform
  y = jax.jit(lambda q, t, p: sq.apply(model, q, t, p, return_cache=False)[0])(q, TOKENS, POS)
  np.testing.assert_allclose(y, ref, atol=1e-4, rtol=1e-4)
  ex = sq.explain(fwd, q, TOKENS, POS)
  assert ex.dequantized == ()
  assert {u.leaf for u in ex if u.kind == "dot"} >= set(leaves) - {
    "params/embedder/input_embedding"
  }
  if scheme in sq.FP8_SCHEMES:
    return  # XLA:CPU converts an fp8 kernel to float whole (README, "fp8"): no kernel of ours
  # the compiled model holds no float copy of a kernel
  text = (
    jax.jit(lambda q, t, p: sq.apply(model, q, t, p, return_cache=False)[0])
    .lower(q, TOKENS, POS)
    .compile()
    .as_text()
  )
  sizes = {
    math.prod(int(d) for d in dims.split(",") if d)
    for dims in re.findall(r"\b(?:bf16|f32)\[([\d,]*)\]", text)
  }
  assert not {x.size for x in leaves.values()} & sizes


def test_w8a8_differs_from_weight_only(griffin):
  model, params = griffin
  fwd = _forward(model)
  q = sq.quantize(params, sq.PER_CHANNEL, like=(fwd, TOKENS, POS))
  wo = sq.quantized(fwd)(q, TOKENS, POS)
  w8 = sq.quantized(fwd, mode="w8a8")(q, TOKENS, POS)
  gap = float(jnp.max(jnp.abs(w8 - wo)))
  assert 0 < gap < 0.1 * float(jnp.max(jnp.abs(wo)))


def _tokenizer():
  text = [
    "quantized matmuls are found at the op",
    "the sampler runs on int8 and int4 weights",
    "every layer of the model reads its own codes",
  ] * 20
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(text),
    model_writer=buf,
    vocab_size=CFG["vocab_size"],
    model_type="char",
    minloglevel=2,
    hard_vocab_limit=False,
  )
  return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def test_the_librarys_own_sampler_runs_on_quantized_params(griffin):
  model, params = griffin
  q = sq.quantize(params, sq.INT4, like=(_forward(model), TOKENS, POS))
  vocab = _tokenizer()
  qmodel = sq.quantized_module(model)
  assert isinstance(qmodel, rg.Griffin) and qmodel.config == model.config
  got = rg.Sampler(model=qmodel, vocab=vocab, params=q["params"])(
    ["the sampler"], total_generation_steps=6
  )
  want = rg.Sampler(model=model, vocab=vocab, params=sq.dequantize(q)["params"])(
    ["the sampler"], total_generation_steps=6
  )
  assert got.text == want.text
  np.testing.assert_array_equal(np.asarray(got.tokens[0]), np.asarray(want.tokens[0]))
  assert len(got.tokens[0]) >= 6


def test_gptq_awq_smoothquant_and_calibrate_on_griffin(griffin):
  model, params = griffin
  fwd = _forward(model)
  batches = [
    (jax.random.randint(jax.random.key(i), (1, 12), 0, CFG["vocab_size"]), POS12) for i in range(2)
  ]
  like = (fwd, *batches[0])
  rtn = sq.quantize(params, sq.INT4, like=like)
  q = sq.gptq(fwd, params, batches, sq.INT4, like=like, progress=False)
  leaves = [
    sq.path_str(p)
    for p, x in jax.tree_util.tree_leaves_with_path(rtn, is_leaf=sq.is_qarray)
    if sq.is_qarray(x)
  ]
  errors = op_level_errors(fwd, params, batches, rtn, q, leaves)
  for key, (before, after) in errors.items():
    assert after < before, key
  assert {leaf for leaf, _ in errors} == set(leaves)
  # block-diagonal gates: one Hessian per block
  assert sum("a_gate" in leaf for leaf, _ in errors) == CFG["num_heads"]
  qa = sq.awq(fwd, params, batches, sq.INT4, like=like, progress=False)
  scaled = [x for x in jax.tree_util.tree_leaves(qa, is_leaf=sq.is_qarray) if sq.is_qarray(x)]
  assert all(x.input_scale is not None for x in scaled)  # every kernel got AWQ scales
  ya = jax.jit(sq.quantized(fwd))(qa, *batches[0])
  np.testing.assert_allclose(ya, fwd(sq.dequantize(qa), *batches[0]), atol=2e-4, rtol=1e-4)
  smooth = sq.smoothquant(fwd, params, batches, alpha=0.5, progress=False)
  np.testing.assert_allclose(
    fwd(sq.dequantize(smooth), *batches[0]), fwd(params, *batches[0]), rtol=1e-3, atol=1e-3
  )
  cal = sq.calibrate(fwd, params, batches)
  assert "params/blocks.0/recurrent_block/rg_lru/a_gate/w" in cal


POS12 = jnp.arange(12)[None]
