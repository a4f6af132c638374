"""The int4 per-group schemes end to end: nibble layout, arithmetic against numpy,
memory, jit/vmap/eval_shape/sharding, checkpoints, streaming, Linen/NNX, report,
manifest, policy, CLI, and the native, XLA and Pallas kernels."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sensorquant_jax as sq
from sensorquant_jax import stream
from sensorquant_jax._src import checkpoint as _ckpt
from sensorquant_jax._src import native, nibbles, packed
from tests.models import TinyTransformer
from tests.references import int4_reference, pack_reference
from tests.trees import assert_same_qtree

INT4 = list(sq.INT4_SCHEMES)
GROUPS = [32, 64, 128]


# --- the nibble layout --------------------------------------------------------


def test_every_byte_round_trips():
  b = np.arange(256, dtype=np.uint8).reshape(256, 1)
  codes = np.asarray(nibbles.unpack(jnp.asarray(b), 0, 512))
  np.testing.assert_array_equal(codes[0::2, 0], b[:, 0] & 0xF)  # low nibble first
  np.testing.assert_array_equal(codes[1::2, 0], b[:, 0] >> 4)
  np.testing.assert_array_equal(np.asarray(nibbles.pack(jnp.asarray(codes), 0)), b)


@settings(max_examples=20)
@given(
  shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
  axis_seed=st.integers(0, 2),
  fill=st.integers(0, 15),
)
def test_pack_matches_reference_for_odd_shapes(shape, axis_seed, fill):
  axis = axis_seed % len(shape)
  codes = np.random.default_rng(sum(shape)).integers(0, 16, shape).astype(np.uint8)
  packed = np.asarray(nibbles.pack(jnp.asarray(codes), axis, fill))
  np.testing.assert_array_equal(packed, pack_reference(codes, axis, fill))
  back = np.asarray(nibbles.unpack(jnp.asarray(packed), axis, shape[axis]))
  np.testing.assert_array_equal(back, codes)


# --- the arithmetic -----------------------------------------------------------


@pytest.mark.parametrize("scheme", INT4)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("shape", [(257, 33), (64, 16), (1, 5), (300, 7)])
def test_codes_scales_zero_points_match_numpy(scheme, group, shape):
  rng = np.random.default_rng(group + shape[0])
  w = (rng.standard_normal(shape) * rng.uniform(0.01, 3, (1, shape[1]))).astype(np.float32)
  qa = sq.quantize_array(w, scheme, block_size=group)
  q, s, zp = int4_reference(w, group, asymmetric=scheme == sq.ASYMMETRIC_INT4)
  assert qa.shape == w.shape and qa.pad == shape[0] % 2 and qa.bits == 4
  assert qa.values.dtype == jnp.uint8 and qa.values.shape == ((shape[0] + 1) // 2, shape[1])
  np.testing.assert_allclose(np.asarray(qa.scale), s, rtol=1e-7)
  if zp is not None:
    np.testing.assert_array_equal(np.asarray(qa.zero_point), zp)
  assert np.max(np.abs(np.asarray(qa.codes(), np.int32) - q)) <= 1  # ulp-level ties only
  assert np.mean(np.asarray(qa.codes()) != q) < 2e-3
  stored = q + (0 if zp is not None else 8)
  fill = 8 if zp is None else 0
  np.testing.assert_array_equal(
    np.asarray(qa.values)[: shape[0] // 2], pack_reference(stored, 0, fill)[: shape[0] // 2]
  )


@pytest.mark.parametrize("scheme", INT4)
def test_other_axes_and_dtypes(scheme):
  w = np.random.default_rng(0).standard_normal((6, 45, 3)).astype(np.float32)
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    qa = sq.quantize_array(jnp.asarray(w, dtype), scheme, axes=(1,), block_size=32)
    assert qa.shape == w.shape and qa.values.shape == (6, 23, 3) and qa.scale.shape == (6, 2, 3)
    out = qa.dequantize()
    assert out.dtype == dtype and out.shape == w.shape
    q, s, zp = int4_reference(np.asarray(jnp.asarray(w, dtype), np.float32), 32, zp_flag(scheme), 1)
    np.testing.assert_allclose(np.asarray(qa.scale), s, rtol=1e-6)


def zp_flag(scheme):
  return scheme == sq.ASYMMETRIC_INT4


def test_group_size_must_be_even_and_symmetric_range_is_7():
  with pytest.raises(ValueError, match="even"):
    sq.quantize_array(np.ones((8, 8), np.float32), sq.INT4, block_size=33)
  qa = sq.quantize_array(np.array([[-7.0], [7.0], [3.5], [-3.5]], np.float32), sq.INT4)
  np.testing.assert_array_equal(np.asarray(qa.codes())[:, 0], [-7, 7, 4, -4])  # half away
  assert float(qa.scale[0, 0]) == 1.0


# --- memory -------------------------------------------------------------------


@pytest.mark.parametrize("scheme", INT4)
def test_bytes_per_weight_at_group_128(scheme, tmp_path):
  w = np.random.default_rng(1).standard_normal((1024, 512)).astype(np.float32)
  qa = sq.quantize_array(w, scheme)
  assert qa.block_size == sq.DEFAULT_GROUP_SIZE == 128
  assert qa.nbytes / w.size <= 0.55, qa.nbytes / w.size
  sq.save(tmp_path / "c", {"w": qa})
  back = sq.restore(tmp_path / "c")["w"]
  held = sum(
    s.data.nbytes
    for a in (back.values, back.scale, back.zero_point)
    if a is not None
    for s in a.addressable_shards
  )
  assert held == qa.nbytes and held / w.size <= 0.55


# --- transformations ----------------------------------------------------------


@pytest.mark.parametrize("scheme", INT4)
def test_jit_vmap_eval_shape(scheme):
  rng = np.random.default_rng(2)
  w = rng.standard_normal((3, 99, 32)).astype(np.float32)
  eager = [sq.quantize_array(w[i], scheme, block_size=32) for i in range(3)]
  jitted = jax.jit(lambda a: sq.quantize({"k": a}, rules=[("k", scheme, None, 32)])["k"])(w[0])
  chex.assert_trees_all_equal(jitted, eager[0])
  stacked = jax.vmap(lambda a: sq.quantize({"k": a}, rules=[("k", scheme, (0,), 32)])["k"])(w)
  for i in range(3):
    np.testing.assert_array_equal(np.asarray(stacked.values[i]), np.asarray(eager[i].values))
  np.testing.assert_allclose(
    np.asarray(stacked.dequantize()), np.stack([np.asarray(e.dequantize()) for e in eager])
  )
  shape = jax.eval_shape(lambda a: sq.quantize_array(a, scheme, block_size=32), w[0])
  assert shape.shape == (99, 32) and shape.values.shape == (50, 32) and shape.scale.shape == (4, 32)
  deq = jax.jit(sq.dequantize)(eager[0])
  np.testing.assert_array_equal(np.asarray(deq), np.asarray(eager[0].dequantize()))


@pytest.mark.parametrize("scheme", INT4)
def test_sharded_contraction_splits_at_group_boundaries(scheme):
  devices = np.array(jax.devices("cpu")[:8])
  mesh = Mesh(devices.reshape(2, 4), ("data", "model"))
  w = np.random.default_rng(3).standard_normal((512, 256)).astype(np.float32)
  sharding = NamedSharding(mesh, P("data", "model"))
  qa = sq.quantize({"kernel": jax.device_put(w, sharding)}, scheme)["kernel"]
  assert qa.values.sharding.is_equivalent_to(sharding, 2)
  for shard in qa.values.addressable_shards:
    assert shard.data.shape == (128, 64)  # 256 rows of K = two whole groups of 128
  for shard in qa.scale.addressable_shards:
    assert shard.data.shape == (2, 64)
  ref = sq.quantize_array(w, scheme)
  np.testing.assert_array_equal(np.asarray(qa.values), np.asarray(ref.values))
  np.testing.assert_array_equal(np.asarray(qa.scale), np.asarray(ref.scale))


# --- files --------------------------------------------------------------------


@pytest.mark.parametrize("scheme", INT4)
def test_checkpoint_round_trip_bit_for_bit(scheme, tmp_path):
  rng = np.random.default_rng(4)
  tree = {
    "a": {"kernel": rng.standard_normal((99, 48)).astype(np.float32)},
    "b": {"kernel": rng.standard_normal((64, 16)).astype(np.float32)},
  }
  q = sq.quantize(tree, scheme, rules=[("a", scheme, None, 32)], min_size=1)
  sq.save(tmp_path / "c", q)
  assert_same_qtree(sq.restore(tmp_path / "c"), q)
  sq.save(tmp_path / "p", sq.pack(q))  # packed tiles are saved canonical
  assert_same_qtree(sq.restore(tmp_path / "p"), q)
  assert_same_qtree(sq.restore(tmp_path / "c", like=jax.eval_shape(lambda: q)), q)
  assert sq.restore(tmp_path / "c")["a"]["kernel"].pad == 1


def test_checkpoint_refuses_edited_int4_records(tmp_path):
  q = {"w": sq.quantize_array(np.ones((99, 16), np.float32), sq.INT4, block_size=32)}
  sq.save(tmp_path / "c", q)
  spec_path = tmp_path / "c" / "sensorquant.json"
  doc = json.loads(spec_path.read_text())
  edits = (
    ("shape", [98, 16]),  # packs to 49 rows, not the 50 stored
    ("shape", [99]),
    ("shape", "99x16"),
    ("block_size", 64),
    ("scheme", sq.ASYMMETRIC_INT4),
  )
  for key, value in edits:
    edited = json.loads(json.dumps(doc))
    edited["leaves"][0][key] = value
    edited["leaves_sha256"] = _ckpt._leaves_digest(edited["leaves"])
    spec_path.write_text(json.dumps(edited))
    with pytest.raises(sq.CheckpointError):
      sq.restore(tmp_path / "c")
  spec_path.write_text(json.dumps(doc))
  assert_same_qtree(sq.restore(tmp_path / "c"), q)


def test_streaming_and_cli(tmp_path):
  rng = np.random.default_rng(5)
  flat = {
    "params/l0/kernel": rng.standard_normal((256, 64)).astype(np.float32),
    "params/l0/bias": np.zeros(64, np.float32),
  }
  np.savez(tmp_path / "p.npz", **flat)
  stream.quantize_file(tmp_path / "p.npz", tmp_path / "s", sq.INT4)
  tree = {"params": {"l0": {"kernel": flat["params/l0/kernel"], "bias": flat["params/l0/bias"]}}}
  assert_same_qtree(sq.restore(tmp_path / "s"), sq.quantize(tree, sq.INT4))
  cmd = [
    sys.executable,
    "-m",
    "sensorquant_jax",
    "quantize",
    str(tmp_path / "p.npz"),
    "--out",
    str(tmp_path / "c"),
    "--scheme",
    sq.ASYMMETRIC_INT4,
  ]
  run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
  assert run.returncode == 0, run.stderr
  assert_same_qtree(sq.restore(tmp_path / "c"), sq.quantize(tree, sq.ASYMMETRIC_INT4))
  cmd = [sys.executable, "-m", "sensorquant_jax", "inspect", str(tmp_path / "c")]
  run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
  assert run.returncode == 0 and sq.ASYMMETRIC_INT4 in run.stdout, run.stderr


def test_manifest_refuses_int4_unless_requantized():
  q = {"params": {"d": {"kernel": sq.quantize_array(np.ones((64, 32), np.float32), sq.INT4)}}}
  with pytest.raises(ValueError, match="requantize"):
    sq.to_manifest(q)
  with pytest.warns(sq.RequantizationWarning):
    man = sq.to_manifest(q, requantize=True)
  assert len(man.layers) == 1


# --- models -------------------------------------------------------------------


@pytest.mark.parametrize("scheme", INT4)
def test_linen_apply_and_report(scheme):
  model = TinyTransformer()
  tokens = jnp.asarray(np.random.default_rng(6).integers(0, 50, (2, 12)), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  q = sq.quantize(params, scheme, rules=[("conv", None)])
  got = jax.jit(lambda v, t: sq.apply(model, v, t))(q, tokens)
  want = model.apply(sq.dequantize(q), tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)
  rep = sq.report(params, q, show=False)
  assert {r["scheme"] for r in rep["layers"]} == {scheme}
  # sq.pack's int4 tiles (where the native packed kernels run): the same model.
  packed_q = sq.pack(q)
  tiles = [
    x
    for x in jax.tree.leaves(packed_q, is_leaf=lambda x: isinstance(x, sq.PackedQArray))
    if isinstance(x, sq.PackedQArray)
  ]
  assert bool(tiles) == packed.int4_pack_here()
  got_p = jax.jit(lambda v, t: sq.apply(model, v, t))(packed_q, tokens)
  np.testing.assert_allclose(np.asarray(got_p), np.asarray(want), rtol=2e-4, atol=2e-4)
  w4 = jax.jit(lambda v, t: sq.apply(model, v, t, mode="w8a8"))
  np.testing.assert_allclose(
    np.asarray(w4(packed_q, tokens)), np.asarray(w4(q, tokens)), rtol=1e-5, atol=1e-5
  )


def test_auto_policy_takes_int4_where_it_is_cheapest():
  rng = np.random.default_rng(8)
  params = {
    "dense": {"kernel": rng.standard_normal((256, 64)).astype(np.float32)},
    "heads": {"kernel": rng.standard_normal((4, 16, 64)).astype(np.float32)},  # 4-value groups
  }
  pol = sq.auto_policy(params, budget=sq.Budget(min_sqnr_db=5.0))
  assert pol.choices["dense/kernel"] == sq.INT4
  assert pol.choices["heads/kernel"] != sq.INT4  # per-tensor int8 is smaller there
  loose = sq.quantize(params, rules=pol.rules)
  assert sq.nbytes(loose) == sum(
    sq.quantize_array(params[k]["kernel"], pol.choices[f"{k}/kernel"]).nbytes for k in params
  )


@pytest.mark.parametrize("scheme", INT4)
def test_nnx_quantize(scheme):
  from flax import nnx

  from tests.models import NNXTransformer

  model = NNXTransformer(rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(7).integers(0, 96, (2, 10)), jnp.int32)
  want = model(tokens)
  qmodel = sq.nnx.quantize(model, scheme)
  got = nnx.jit(lambda m, t: m(t))(qmodel, tokens)
  cos = float(jnp.sum(got * want) / (jnp.linalg.norm(got) * jnp.linalg.norm(want)))
  assert cos > 0.95, cos


# --- kernels ------------------------------------------------------------------


def _impls():
  out = ["xla"]
  if native.INT4_TARGET in native.ffi_targets():
    out.append("native")
  return out


@pytest.mark.parametrize("scheme", INT4)
@pytest.mark.parametrize("impl", ["native", "xla"])  # Pallas: tests/test_pallas.py
@pytest.mark.parametrize(
  "k,n,m,group,xdtype",
  [(99, 32, 1, 32, jnp.float32), (300, 48, 5, 64, jnp.bfloat16), (256, 1040, 3, 128, jnp.float32)],
)
def test_kernels_equal_the_dequantized_reference(scheme, impl, xdtype, k, n, m, group):
  if impl not in _impls():
    pytest.skip("native kernels unavailable")
  rng = np.random.default_rng(k + n)
  w = rng.standard_normal((k, n)).astype(np.float32)
  qa = sq.quantize_array(w, scheme, block_size=group)
  x = jnp.asarray(rng.standard_normal((m, k)), xdtype)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  ref = np.asarray(x, np.float64) @ np.asarray(qa.dequantize(), np.float64) + np.asarray(bias)
  got = jax.jit(lambda x, q, b: sq.dense(x, q, b, impl=impl))(x, qa, bias)
  assert got.dtype == xdtype
  tol = 3e-6 if xdtype == jnp.float32 else 2e-2
  err = np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max()
  assert err < tol, err
  # vmap over examples folds them into the rows
  xs = jnp.stack([x, x * 2])
  ys = jax.vmap(lambda x: sq.dense(x, qa, bias, impl=impl))(xs)
  one = jax.jit(lambda x: sq.dense(x, qa, bias, impl=impl))(x * 2)
  err = np.abs(np.asarray(ys[1], np.float64) - np.asarray(one, np.float64)).max()
  assert err <= tol * 2 * np.abs(ref).max(), err


def test_pallas_refuses_what_it_has_no_kernel_for():
  qa = sq.quantize_array(np.ones((64, 32), np.float32), sq.INT4)
  with pytest.raises(ValueError, match="W8A8 with int8 kernels only"):
    sq.dense(jnp.ones((1, 64)), qa, mode="w8a8", impl="pallas")
