"""The op-level transform: sq.quantized, sq.explain and quantize(like=...) on model code in
every style (Gemma-like einsum modules, nn.scan, nn.remat, plain functions with lax.scan,
nested jit, cond / while), checked against the dequantized float model."""

import math
import re
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import sensorquant_jax as sq
from tests import llm_models as M

CFG = M.Config()
TOKENS = jax.random.randint(jax.random.key(1), (1, 5), 0, CFG.vocab)
SCHEMES = [sq.PER_CHANNEL, sq.INT4, sq.PER_TENSOR, sq.ASYMMETRIC_INT4, sq.FP8_BLOCK]


def _qleaves(tree):
  return {
    sq.path_str(p): x
    for p, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=sq.is_qarray)
    if sq.is_qarray(x)
  }


def _float_sizes_in_hlo(fn, *args) -> set[int]:
  text = jax.jit(fn).lower(*args).compile().as_text()
  return {
    math.prod(int(d) for d in dims.split(",") if d)
    for dims in re.findall(r"\b(?:f16|bf16|f32|f64)\[([\d,]*)\]", text)
  }


def _assert_all_quantized(explanation, q, stacked: int = 1):
  leaves = _qleaves(q)
  assert explanation.dequantized == ()
  used = {u.leaf for u in explanation if u.kind in ("dot", "gather")}
  assert used == set(leaves), set(leaves) - used
  assert all(u.kind in ("dot", "gather") for u in explanation), str(explanation)


def _assert_no_float_kernel(fn, q, *args, stacked=()):
  sizes = _float_sizes_in_hlo(fn, q, *args)
  for path, x in _qleaves(q).items():
    assert x.size not in sizes, path
    if path in stacked:
      assert x.size // x.shape[0] not in sizes, path


@pytest.fixture(scope="module")
def gemma_like():
  out = {}
  for style in ("loop", "scan", "remat"):
    model = M.Transformer(CFG, style)
    out[style] = (model, model.init(jax.random.key(0), TOKENS))
  return out


# Every scheme on the scanned stack (layer slices of stacked codes); the unrolled and
# rematerialized styles differ from it in how the transform walks the jaxpr, not in
# the scheme, so each takes two schemes that between them cover int8, int4 and fp8.
@pytest.mark.parametrize(
  ("style", "scheme"),
  [("scan", s) for s in SCHEMES]
  + [("loop", sq.PER_CHANNEL), ("loop", sq.ASYMMETRIC_INT4)]
  + [("remat", sq.INT4), ("remat", sq.FP8_BLOCK)],
)
def test_linen_einsum_models(gemma_like, style, scheme):
  model, params = gemma_like[style]
  q = sq.quantize(params, scheme, like=(model.apply, TOKENS))
  leaves = _qleaves(q)
  # every kernel and the embedding table; norms stay float
  assert len(leaves) == (6 if style == "scan" else 1 + 5 * CFG.layers)
  assert not any("norm" in p for p in leaves)
  ref = model.apply(sq.dequantize(q), TOKENS)
  # a Python flag stays static through the transform
  y = jax.jit(lambda q, t: sq.apply(model, q, t, last_only=True))(q, TOKENS)
  np.testing.assert_allclose(y, ref[:, -1:], atol=2e-4, rtol=1e-4)
  ex = sq.explain(lambda v, t: model.apply(v, t), q, TOKENS)
  _assert_all_quantized(ex, q)
  if sq.bits_of(scheme) == 4:
    for path, x in leaves.items():
      assert x.nbytes / x.size <= 0.56, (path, x.nbytes / x.size)


@pytest.mark.parametrize("style", ["scan", "loop", "remat"])
@pytest.mark.parametrize("scheme", [sq.PER_CHANNEL, sq.INT4])
def test_no_float_copy_of_a_consumed_kernel(gemma_like, scheme, style):
  model, params = gemma_like[style]
  q = sq.quantize(params, scheme, like=(model.apply, TOKENS))
  stacked = {p for p in _qleaves(q) if "/layers/" in p}
  assert len(stacked) == (5 if style == "scan" else 0)
  _assert_no_float_kernel(lambda q, t: sq.apply(model, q, t), q, TOKENS, stacked=stacked)
  # the check can fail: the dequantized model holds every kernel in float
  sizes = _float_sizes_in_hlo(lambda q, t: model.apply(sq.dequantize(q), t), q, TOKENS)
  assert all(x.size in sizes for x in _qleaves(q).values())


def test_axes_read_from_the_computation(gemma_like):
  model, params = gemma_like["loop"]
  q = sq.quantize(params, sq.PER_CHANNEL, like=(model.apply, TOKENS))
  layer = q["params"]["layer_0"]
  # q_einsum (N, D, H) contracts D: scales per (N, H)
  assert layer["attn"]["q_einsum"]["w"].scale.shape == (CFG.heads, 1, CFG.head_dim)
  # gating (2, F, D) contracts D (last axis)
  assert layer["mlp"]["gating_einsum"]["w"].scale.shape == (2, CFG.hidden, 1)
  # attn_vec (N, H, D) contracts N and H
  assert layer["attn"]["attn_vec_einsum"]["w"].scale.shape == (1, 1, CFG.embed)
  # the table is looked up and used as the tied output layer: one scale per row
  assert q["params"]["embedder"]["input_embedding"].scale.shape == (CFG.vocab, 1)
  q4 = sq.quantize(params, sq.INT4, like=(model.apply, TOKENS))
  l4 = q4["params"]["layer_0"]
  assert l4["mlp"]["gating_einsum"]["w"].axes == (-1,)
  assert l4["attn"]["q_einsum"]["w"].axes == (-2,)
  assert l4["attn"]["attn_vec_einsum"]["w"].axes == (-2,)  # head_dim: the larger one
  assert q4["params"]["embedder"]["input_embedding"].axes == (-1,)


def test_default_block_axis_shorter_than_a_block_is_refused(gemma_like):
  model, params = gemma_like["loop"]
  with pytest.raises(
    ValueError, match=r"params/layer_0/attn/\w+/w: the default group axis 0 .*like="
  ):
    sq.quantize(params, sq.INT4)


@pytest.mark.parametrize("scheme", [sq.PER_CHANNEL, sq.INT4])
def test_plain_function_scan_remat_nested_jit(scheme):
  params = M.init_plain(CFG, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(2), (2, 5), 0, CFG.vocab)
  q = sq.quantize(params, scheme, like=(M.plain_forward, tokens))
  assert set(_qleaves(q)) == {
    "embedding",
    *(f"layers/{k}" for k in ("wqkv", "wo", "w_up", "w_down")),
  }
  ref = M.plain_forward(sq.dequantize(q), tokens)
  f = sq.quantized(M.plain_forward)
  y = jax.jit(f)(q, tokens)
  np.testing.assert_allclose(y, ref, atol=5e-4, rtol=1e-4)
  _assert_all_quantized(sq.explain(M.plain_forward, q, tokens), q)
  stacked = {p for p in _qleaves(q) if p.startswith("layers/")}
  _assert_no_float_kernel(f, q, tokens, stacked=stacked)
  # vmap over the batch
  yv = jax.vmap(lambda t: f(q, t[None]))(tokens)
  np.testing.assert_allclose(yv[:, 0], y, atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize("scheme", [sq.PER_CHANNEL, sq.INT4])
def test_w8a8_matches_fake_quant_reference(scheme):
  params = M.init_plain(CFG, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(2), (2, 5), 0, CFG.vocab)
  q = sq.quantize(params, scheme, like=(M.plain_forward, tokens))
  wo = jax.jit(sq.quantized(M.plain_forward))(q, tokens)
  w8 = jax.jit(sq.quantized(M.plain_forward, mode="w8a8"))(q, tokens)
  ref = M.plain_forward(sq.dequantize(q), tokens, fq=M.fake_quant_tokens)
  gap = float(jnp.max(jnp.abs(w8 - wo)))
  assert gap > 0.05
  # Each token matches the reference, except that one activation exactly between two
  # int8 steps may round the other way (its float input differs by an ulp between
  # the int8 op and the float reference) and move its token by a fraction of the gap.
  err = np.max(np.abs(np.asarray(w8) - np.asarray(ref)), axis=-1)
  assert np.sum(err > 1e-3) <= 1 and err.max() < 0.25 * gap, err


def test_w8a8_linen_einsum_matches_fake_quant_reference(gemma_like):
  model, params = gemma_like["loop"]
  q = sq.quantize(params, sq.PER_CHANNEL, like=(model.apply, TOKENS))
  wo = sq.apply(model, q, TOKENS)
  w8 = jax.jit(lambda q, t: sq.apply(model, q, t, mode="w8a8"))(q, TOKENS)
  import dataclasses

  fq_model = M.Transformer(dataclasses.replace(CFG, fq=True), "loop")
  ref = fq_model.apply(sq.dequantize(q), TOKENS)
  assert float(jnp.max(jnp.abs(w8 - wo))) > 1e-3
  np.testing.assert_allclose(w8, ref, atol=2e-3, rtol=1e-4)


def test_static_act_scales_by_leaf_or_module():
  w = jax.random.normal(jax.random.key(0), (64, 32))
  x = jax.random.normal(jax.random.key(1), (4, 64))
  q = {"dense": {"kernel": sq.quantize_array(w, sq.PER_CHANNEL)}}
  wq = sq.dequantize(q)["dense"]["kernel"]

  def f(p, x):
    return x @ p["dense"]["kernel"]

  s = 0.02
  expect = np.asarray(jnp.clip(jnp.round(x / s), -127, 127) * s) @ np.asarray(wq)
  for key in ("dense/kernel", "dense"):
    y = sq.quantized(f, mode="w8a8", act_scales={key: s})(q, x)
    np.testing.assert_allclose(y, expect, atol=1e-3, rtol=1e-4)


def _stack(key, n=3, k=64):
  return 0.1 * jax.random.normal(key, (n, k, k))


def test_indexing_cond_while_and_fori():
  ws = _stack(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, 64))

  def f(p, x, i):
    w = p["w"]
    a = x @ w[1]  # static index: slice + squeeze
    b = x @ w[i]  # traced index: dynamic slice
    c = lax.cond(i > 0, lambda: x @ w[0], lambda: x @ w[2])
    d = lax.fori_loop(0, 3, lambda j, h: jnp.tanh(h @ w[j]), x)  # scan over a traced index
    e = lax.while_loop(lambda s: s[0] < 2, lambda s: (s[0] + 1, s[1] @ w[s[0]]), (0, x))[1]
    return a, b, c, d, e

  q = {"w": sq.quantize_array(ws, sq.PER_CHANNEL, axes=(0, 2))}
  i = jnp.int32(2)
  ref = f(sq.dequantize(q), x, i)
  out = jax.jit(sq.quantized(f))(q, x, i)
  chex.assert_trees_all_close(out, ref, atol=1e-4, rtol=1e-4)
  ex = sq.explain(f, q, x, i)
  assert ex.dequantized == ()
  assert {u.kind for u in ex} == {"dot"}


def test_lax_scan_over_stacked_weights_with_layer_scales():
  ws = _stack(jax.random.key(0), n=4)
  x = jax.random.normal(jax.random.key(1), (2, 64))

  def f(p, x):
    return lax.scan(lambda h, w: (jnp.tanh(h @ w), h.sum()), x, p["w"])

  for scheme in (sq.PER_TENSOR, sq.PER_CHANNEL, sq.INT4):
    q = sq.quantize({"w": ws}, scheme, like=(f, x), min_size=0)
    out = jax.jit(sq.quantized(f))(q, x)
    chex.assert_trees_all_close(out, f(sq.dequantize(q), x), atol=1e-4, rtol=1e-4)
    assert sq.explain(f, q, x).dequantized == ()


def test_grad_with_respect_to_activations():
  w = jax.random.normal(jax.random.key(0), (64, 32))
  x = jax.random.normal(jax.random.key(1), (3, 64))
  q = {"w": sq.quantize_array(w, sq.PER_CHANNEL)}
  wq = np.asarray(sq.dequantize(q)["w"], np.float64)

  def f(p, x):
    return jnp.sum(jnp.tanh(x @ p["w"]))

  g = jax.jit(jax.grad(sq.quantized(f), argnums=1))(q, x)
  h = np.tanh(np.asarray(x, np.float64) @ wq)
  np.testing.assert_allclose(g, (1 - h**2) @ wq.T, atol=1e-4, rtol=1e-4)


def test_unconsumed_leaf_is_dequantized_and_named():
  k = jax.random.normal(jax.random.key(0), (3, 3, 8, 16))
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 8))
  conv = nn.Conv(16, (3, 3))
  q = {"params": {"kernel": sq.quantize_array(k, sq.PER_CHANNEL), "bias": jnp.zeros(16)}}
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = sq.apply(conv, q, x)
  msgs = [str(w.message) for w in caught if issubclass(w.category, sq.DequantizedWarning)]
  assert len(msgs) == 1 and "params/kernel" in msgs[0]
  np.testing.assert_allclose(y, conv.apply(sq.dequantize(q), x), atol=1e-5)
  ex = sq.explain(lambda v, x: conv.apply(v, x), q, x)
  (use,) = ex
  assert use.kind == "dequantized" and "conv_general_dilated" in use.detail
  assert use.float_nbytes == k.size * 4 and use.nbytes == q["params"]["kernel"].nbytes
  assert "params/kernel" in str(ex)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sq.quantized(lambda v, x: conv.apply(v, x), warn=False)(q, x)


def test_like_keeps_unread_leaves_float():
  params = {"w": jnp.ones((64, 64)), "unused": jnp.ones((64, 64)), "b": jnp.ones((64, 64))}

  def f(p, x):
    return x @ p["w"] + jnp.sum(p["b"])

  q = sq.quantize(params, sq.PER_CHANNEL, like=(f, jnp.ones((2, 64))))
  assert sq.is_qarray(q["w"]) and not sq.is_qarray(q["unused"]) and not sq.is_qarray(q["b"])
  q = sq.quantize(params, sq.PER_CHANNEL, [("unused", sq.PER_TENSOR)], like=(f, jnp.ones((2, 64))))
  assert sq.is_qarray(q["unused"])
  with pytest.raises(ValueError, match="like must be"):
    sq.quantize(params, like=f)


def test_shardings_and_shard_map():
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  try:
    from jax import shard_map
  except ImportError:  # older jax
    from jax.experimental.shard_map import shard_map

  mesh = Mesh(np.array(jax.devices("cpu")[:8]).reshape(2, 4), ("data", "model"))
  w = jax.random.normal(jax.random.key(0), (256, 512))
  x = jax.random.normal(jax.random.key(1), (8, 256))

  def f(p, x):
    return jnp.tanh(x @ p["w"])

  q = sq.quantize({"w": w}, sq.PER_CHANNEL)
  ref = f(sq.dequantize(q), x)
  qs = jax.device_put(q, NamedSharding(mesh, P(None, "model")))
  assert qs["w"].values.sharding.spec == P(None, "model")
  xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
  y = jax.jit(sq.quantized(f))(qs, xs)
  np.testing.assert_allclose(y, ref, atol=1e-4, rtol=1e-4)
  specs = (
    {
      "w": sq.QArray(
        P(None, "model"), P(None, "model"), None, q["w"].scheme, q["w"].axes, None, q["w"].dtype
      )
    },
    P("data", None),
  )
  sm = shard_map(sq.quantized(f), mesh=mesh, in_specs=specs, out_specs=P("data", "model"))
  with warnings.catch_warnings():
    warnings.simplefilter("error", sq.DequantizedWarning)  # the dot runs quantized per shard
    jax.jit(sm).lower(qs, xs)
  np.testing.assert_allclose(jax.jit(sm)(qs, xs), ref, atol=1e-4, rtol=1e-4)
