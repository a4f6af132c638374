"""Orbax save/restore of quantized trees, float checkpoint readers, streaming."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sensorquant_jax as sq
from sensorquant_jax import checkpoint
from sensorquant_jax.example_model import load_example
from tests.trees import assert_same_qtree, float_tree


@pytest.fixture(scope="module")
def example():
  return load_example()


@pytest.mark.parametrize("scheme", list(sq.SCHEMES))
def test_round_trip_exact_with_and_without_target(scheme, example, tmp_path):
  model, variables, split = example
  q = sq.quantize(variables, scheme)
  sq.save(tmp_path / "ck", q, {"note": "hi"})
  assert checkpoint.read_spec(tmp_path / "ck")["metadata"] == {"note": "hi"}
  without = sq.restore(tmp_path / "ck")
  assert_same_qtree(without, q)
  with_target = sq.restore(tmp_path / "ck", like=jax.eval_shape(lambda: q))
  assert_same_qtree(with_target, q)
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
  assert_same_qtree(back, q)


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


def test_float_readers(tmp_path):
  tree = float_tree()
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
