"""``sq.report``: per-layer errors and output fidelity on the bundled model."""

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
