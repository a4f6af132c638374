"""Orbax save/restore of quantized trees, float checkpoint readers, streaming."""

import os
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sensorquant_jax as sq
from sensorquant_jax import checkpoint, stream
from sensorquant_jax.example_model import load_example


@pytest.fixture(scope="module")
def example():
  return load_example()


def _assert_same_qtree(a, b):
  la = jax.tree_util.tree_leaves(a, is_leaf=sq.is_qarray)
  lb = jax.tree_util.tree_leaves(b, is_leaf=sq.is_qarray)
  assert len(la) == len(lb)
  for x, y in zip(la, lb, strict=True):
    assert type(x) is type(y)
    if sq.is_qarray(x):
      assert (x.scheme, x.axes, x.block_size, np.dtype(x.dtype)) == (
        y.scheme,
        y.axes,
        y.block_size,
        np.dtype(y.dtype),
      )
      np.testing.assert_array_equal(np.asarray(x.values), np.asarray(y.values))
      np.testing.assert_array_equal(np.asarray(x.scale), np.asarray(y.scale))
      if x.zero_point is not None:
        np.testing.assert_array_equal(np.asarray(x.zero_point), np.asarray(y.zero_point))
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("scheme", list(sq.SCHEMES))
def test_round_trip_exact_with_and_without_target(scheme, example, tmp_path):
  model, variables, split = example
  q = sq.quantize(variables, scheme)
  sq.save(tmp_path / "ck", q, {"note": "hi"})
  assert checkpoint.read_spec(tmp_path / "ck")["metadata"] == {"note": "hi"}
  without = sq.restore(tmp_path / "ck")
  _assert_same_qtree(without, q)
  with_target = sq.restore(tmp_path / "ck", like=jax.eval_shape(lambda: q))
  _assert_same_qtree(with_target, q)
  x = split["x"][:16]
  run = jax.jit(lambda t: sq.apply(model, t, x))
  chex.assert_trees_all_close(run(without), run(q), atol=0, rtol=0)


def test_save_replaces_and_keeps_mixed_leaves(tmp_path):
  tree = {
    "a": sq.quantize_array(np.ones((8, 8), np.float32)),
    "b": np.arange(3),
    "step": 7,
    "name": "x",
  }
  sq.save(tmp_path / "ck", tree)
  with pytest.raises(sq.DestinationError, match="overwrite=True"):
    sq.save(tmp_path / "ck", tree)
  sq.save(tmp_path / "ck", tree, overwrite=True)  # replacing an existing checkpoint
  back = sq.restore(tmp_path / "ck")
  assert back["step"] == 7 and back["name"] == "x"
  np.testing.assert_array_equal(back["b"], np.arange(3))
  assert sorted(os.listdir(tmp_path)) == ["ck"]
  with pytest.raises(checkpoint.CheckpointError, match="cannot save"):
    sq.save(tmp_path / "bad", {"f": object()})


def test_restore_with_sharded_target(tmp_path):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
  w = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
  q = sq.quantize({"kernel": w}, "symmetric_per_channel_int8")
  sq.save(tmp_path / "ck", q)
  sharding = NamedSharding(mesh, P("a", "b"))
  like = jax.tree_util.tree_map(lambda x: x, q, is_leaf=lambda x: False)
  like = {
    "kernel": sq.QArray(
      jax.ShapeDtypeStruct((64, 128), jnp.int8, sharding=sharding),
      jax.ShapeDtypeStruct((1, 128), jnp.float32, sharding=NamedSharding(mesh, P(None, "b"))),
      None,
      q["kernel"].scheme,
      q["kernel"].axes,
      None,
      q["kernel"].dtype,
    )
  }
  back = sq.restore(tmp_path / "ck", like=like)
  assert back["kernel"].values.sharding.is_equivalent_to(sharding, 2)
  _assert_same_qtree(back, q)


def test_corrupt_and_missing_checkpoints(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="not a sensorquant checkpoint"):
    sq.restore(tmp_path)
  q = {"w": sq.quantize_array(np.ones((8, 8), np.float32))}
  sq.save(tmp_path / "ck", q)
  spec = tmp_path / "ck" / "sensorquant.json"
  spec.write_text("{not json")
  with pytest.raises(checkpoint.CheckpointError):
    sq.restore(tmp_path / "ck")
  spec.write_text('{"format": "other"}')
  with pytest.raises(checkpoint.CheckpointError, match="unknown format"):
    sq.restore(tmp_path / "ck")
  sq.save(tmp_path / "ck2", q)
  for root, _, files in os.walk(tmp_path / "ck2" / "arrays"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")
  with pytest.raises(checkpoint.CheckpointError, match="cannot read arrays"):
    sq.restore(tmp_path / "ck2")
  sq.save(tmp_path / "ck3", q)
  with pytest.raises(checkpoint.CheckpointError, match="does not have the saved tree"):
    sq.restore(tmp_path / "ck3", like={"other": q["w"]})


def _float_tree():
  rng = np.random.default_rng(0)
  return {
    "params": {
      "dense": {
        "kernel": rng.standard_normal((64, 48)).astype(np.float32),
        "bias": rng.standard_normal(48).astype(np.float32),
      },
      "emb": {"embedding": rng.standard_normal((100, 32)).astype(np.float32)},
    }
  }


def test_float_readers(tmp_path):
  tree = _float_tree()
  flat = {
    "/".join(k): v
    for k, v in [
      (("params", "dense", "kernel"), tree["params"]["dense"]["kernel"]),
      (("params", "dense", "bias"), tree["params"]["dense"]["bias"]),
      (("params", "emb", "embedding"), tree["params"]["emb"]["embedding"]),
    ]
  }
  np.savez(tmp_path / "p.npz", **flat)
  (tmp_path / "p.msgpack").write_bytes(serialization.to_bytes(tree))
  import orbax.checkpoint as ocp

  ck = ocp.StandardCheckpointer()
  ck.save(os.path.abspath(tmp_path / "orbax"), tree)
  ck.wait_until_finished()
  for src in ("p.npz", "p.msgpack", "orbax"):
    got = sq.load_float(tmp_path / src)
    chex.assert_trees_all_equal(got, tree)
  try:
    from safetensors.numpy import save_file
  except ImportError:
    pass
  else:
    save_file({k.replace("/", "."): v for k, v in flat.items()}, str(tmp_path / "p.safetensors"))
    chex.assert_trees_all_equal(sq.load_float(tmp_path / "p.safetensors"), tree)
  (tmp_path / "bad.msgpack").write_bytes(b"\xc1\xc1\xc1")
  (tmp_path / "x.txt").write_text("hi")
  for bad, msg in (
    ("bad.msgpack", "cannot read"),
    ("x.txt", "unknown checkpoint format"),
    ("missing.npz", "no such file"),
  ):
    with pytest.raises(checkpoint.CheckpointError, match=msg):
      sq.load_float(tmp_path / bad)


def test_streaming_matches_in_memory_quantize(tmp_path):
  tree = _float_tree()
  path = tmp_path / "big.npz"
  with zipfile.ZipFile(path, "w") as zf:  # written leaf by leaf, as bench_stream does
    for key, value in (
      ("params/dense/kernel", tree["params"]["dense"]["kernel"]),
      ("params/dense/bias", tree["params"]["dense"]["bias"]),
      ("params/emb/embedding", tree["params"]["emb"]["embedding"]),
    ):
      with zf.open(key + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, value)
  seen = []
  summary = stream.quantize_file(
    path, tmp_path / "out", "symmetric_per_channel_int8", progress=lambda p, n: seen.append(p)
  )
  assert summary["leaves"] == 3 and summary["quantized"] == 2 and len(seen) == 3
  _assert_same_qtree(sq.restore(tmp_path / "out"), sq.quantize(tree, "symmetric_per_channel_int8"))


def test_streaming_writes_bounded_parts(tmp_path):
  rng = np.random.default_rng(2)
  flat = {f"params/l{i}/kernel": rng.standard_normal((64, 64)).astype(np.float32) for i in range(5)}
  np.savez(tmp_path / "p.npz", **flat)
  stream.quantize_file(tmp_path / "p.npz", tmp_path / "out", part_bytes=4000)
  spec = checkpoint.read_spec(tmp_path / "out")
  assert spec["parts"] == 5 and len(os.listdir(tmp_path / "out" / "arrays")) == 5
  tree = {"params": {f"l{i}": {"kernel": flat[f"params/l{i}/kernel"]} for i in range(5)}}
  _assert_same_qtree(sq.restore(tmp_path / "out"), sq.quantize(tree))
  like = jax.eval_shape(lambda: sq.quantize(tree))
  _assert_same_qtree(sq.restore(tmp_path / "out", like=like), sq.quantize(tree))
