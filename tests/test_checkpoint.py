"""Orbax save/restore of quantized trees, float checkpoint readers, streaming."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sensorquant_jax as sq
from sensorquant_jax import checkpoint
from sensorquant_jax.example_model import load_example
from tests.models import MODEL_SCHEMES
from tests.trees import assert_same_qtree, float_tree


@pytest.fixture(scope="module")
def example():
  return load_example()


@pytest.mark.parametrize("scheme", MODEL_SCHEMES)
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


def _regions(path):
  from sensorquant_jax._src.checkpoint import iter_float_regions

  return {name: (shape, dtype, read) for name, shape, dtype, read in iter_float_regions(path)}


@settings(max_examples=30)
@given(
  shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
  dtype=st.sampled_from(["float32", "float16", "bfloat16", "int8", "int64"]),
  data=st.data(),
)
def test_safetensors_regions_equal_numpy_slices(tmp_path_factory, shape, dtype, data):
  from safetensors.numpy import save_file

  folder = tmp_path_factory.mktemp("regions")
  x = (np.arange(int(np.prod(shape))) - 7).astype(jnp.dtype(dtype)).reshape(shape)
  other = np.ones((3, 2), np.float32)  # offsets of a second tensor are not 0
  save_file({"a.first": other, "b.x": x}, str(folder / "t.safetensors"))
  got_shape, got_dtype, read = _regions(folder / "t.safetensors")["b/x"]
  assert got_shape == tuple(shape) and got_dtype == x.dtype
  index = tuple(
    slice(
      data.draw(st.integers(-6, 6) | st.none()),
      data.draw(st.integers(-6, 6) | st.none()),
      data.draw(st.sampled_from([None, 1, 2, -1])),
    )
    for _ in shape
  )
  np.testing.assert_array_equal(read(index), x[index])


def test_safetensors_regions_refuse_damaged_headers(tmp_path):
  import json
  import struct

  def write(name, header, data=b"\0" * 16, size=None):
    text = json.dumps(header).encode()
    (tmp_path / name).write_bytes(
      struct.pack("<Q", len(text) if size is None else size) + text + data
    )
    return tmp_path / name

  good = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
  assert _regions(write("ok.safetensors", good))["w"][0] == (2, 2)
  cases = [
    (write("huge.safetensors", good, size=1 << 40), "header of"),
    (write("list.safetensors", [1, 2]), "not an object"),
    (write("past.safetensors", {"w": {**good["w"], "data_offsets": [0, 32]}}), "outside"),
    (write("size.safetensors", {"w": {**good["w"], "shape": [3, 2]}}), "do not hold"),
    (write("dtype.safetensors", {"w": {**good["w"], "dtype": "C64"}}), "unsupported dtype"),
    (write("neg.safetensors", {"w": {**good["w"], "shape": [-2, -2]}}), "list of sizes"),
    (write("nan.safetensors", {"w": {**good["w"], "data_offsets": [0, float("nan")]}}), "valid"),
  ]
  (tmp_path / "short.safetensors").write_bytes(b"\1\0")
  cases.append((tmp_path / "short.safetensors", "shorter than its header"))
  for path, message in cases:
    with pytest.raises(checkpoint.CheckpointError, match=message) as e:
      _regions(path)
    assert str(path) in str(e.value)
