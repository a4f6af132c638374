"""Streaming quantization, disk to disk, leaf by leaf."""

import os
import zipfile

import jax
import numpy as np
import pytest

import sensorquant_jax as sq
from sensorquant_jax import checkpoint, stream
from tests.trees import assert_same_qtree, float_tree


@pytest.mark.parametrize("scheme", ["symmetric_per_channel_int8", sq.FP8_BLOCK])
def test_streaming_matches_in_memory_quantize(scheme, tmp_path):
  tree = float_tree()
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
  out = tmp_path / "out"
  summary = stream.quantize_file(path, out, scheme, progress=lambda p, n: seen.append(p))
  assert summary["leaves"] == 3 and summary["quantized"] == 2 and len(seen) == 3
  assert_same_qtree(sq.restore(out), sq.quantize(tree, scheme))


def test_streaming_writes_bounded_parts(tmp_path):
  rng = np.random.default_rng(2)
  flat = {f"params/l{i}/kernel": rng.standard_normal((64, 64)).astype(np.float32) for i in range(5)}
  np.savez(tmp_path / "p.npz", **flat)
  stream.quantize_file(tmp_path / "p.npz", tmp_path / "out", part_bytes=4000)
  spec = checkpoint.read_spec(tmp_path / "out")
  assert spec["parts"] == 5 and len(os.listdir(tmp_path / "out" / "arrays")) == 5
  tree = {"params": {f"l{i}": {"kernel": flat[f"params/l{i}/kernel"]} for i in range(5)}}
  assert_same_qtree(sq.restore(tmp_path / "out"), sq.quantize(tree))
  like = jax.eval_shape(lambda: sq.quantize(tree))
  assert_same_qtree(sq.restore(tmp_path / "out", like=like), sq.quantize(tree))
