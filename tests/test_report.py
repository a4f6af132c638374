"""``sq.report``: per-layer errors and output fidelity on the bundled model."""

import json

import numpy as np
import pytest

import sensorquant_jax as sq
from sensorquant_jax.example_model import load_example


def test_report_on_bundled_model(tmp_path):
  model, variables, split = load_example()
  q = sq.quantize(variables, "symmetric_per_tensor_int8")
  xs = [split["x"][i : i + 512] for i in range(0, 1024, 512)]
  ys = [split["y"][i : i + 512] for i in range(0, 1024, 512)]
  rep = sq.report(
    variables,
    q,
    model=model,
    batches=xs,
    labels=ys,
    show=True,
    json_path=tmp_path / "r.json",
    png_path=tmp_path / "r.png",
  )
  assert len(rep["layers"]) == 19
  assert rep["output"]["cosine_similarity"] > 0.999
  assert abs(rep["output"]["accuracy_delta"]) <= 0.01
  png = (tmp_path / "r.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  import matplotlib.image

  img = matplotlib.image.imread(tmp_path / "r.png")
  assert img.shape[0] > 200 and img.shape[1] > 600
  assert json.loads((tmp_path / "r.json").read_text())["totals"] == rep["totals"]


def test_report_files_are_written_safely(tmp_path):
  w = {"w": np.ones((64, 64), np.float32)}
  q = sq.quantize(w)
  mine = tmp_path / "notes.json"
  mine.write_text('{"mine": 1}')
  picture = tmp_path / "old_plot.png"
  picture.write_bytes(b"\x89PNG\r\n\x1a\n" + b"an earlier plot")
  for kwargs in ({"json_path": mine}, {"png_path": tmp_path / "notes.json"}):
    with pytest.raises(sq.DestinationError, match="refusing"):
      sq.report(w, q, show=False, overwrite=True, **kwargs)
  assert mine.read_text() == '{"mine": 1}'
  # Our own outputs: refused without overwrite, replaced with it.
  sq.report(w, q, show=False, json_path=tmp_path / "r.json", png_path=tmp_path / "r.png")
  with pytest.raises(sq.DestinationError, match="overwrite=True"):
    sq.report(w, q, show=False, json_path=tmp_path / "r.json")
  sq.report(w, q, show=False, json_path=tmp_path / "r.json", png_path=picture, overwrite=True)
  assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(picture.read_bytes()) > 1000
