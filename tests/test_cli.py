"""The sensorquant CLI: every command, and bad input as one line without a traceback."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import sensorquant_jax as sq
from sensorquant_jax import cli
from sensorquant_jax import manifest as m

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
  out = tmp_path_factory.mktemp("cli")
  assert cli.main(["quantize", "--out", str(out / "ck"), "--manifest", str(out / "m.json")]) == 0
  return out


def test_quantize_bundled_prints_accuracy_and_sizes(quantized, capsys):
  assert (
    cli.main(
      [
        "quantize",
        "--out",
        str(quantized / "ck2"),
        "--scheme",
        "symmetric_per_tensor_int8",
        "--report",
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  assert "float32: accuracy 95." in out and "int8   : accuracy" in out and "smaller" in out
  assert "SQNR" in out
  man = m.QuantizedModel.load(quantized / "m.json")
  assert len(man.layers) == 19 and man.scheme == "symmetric_per_tensor_int8"
  assert json.loads(man.config_json)["d_model"] == 96


def test_inspect_eval_convert(quantized, capsys):
  assert cli.main(["inspect", str(quantized / "m.json")]) == 0
  assert "compression 4.00x" in capsys.readouterr().out
  assert cli.main(["inspect", str(quantized / "ck")]) == 0
  assert "symmetric_per_channel_int8" in capsys.readouterr().out
  assert cli.main(["convert", str(quantized / "m.json"), str(quantized / "from_manifest")]) == 0
  assert cli.main(["convert", str(quantized / "from_manifest"), str(quantized / "again.json")]) == 0
  assert (quantized / "again.json").read_bytes() == (quantized / "m.json").read_bytes()
  capsys.readouterr()
  assert cli.main(["eval", str(quantized / "from_manifest")]) == 0
  out = capsys.readouterr().out
  assert "float32" in out and "checkpoint from_manifest" in out


def test_eval_all_variants(capsys, monkeypatch):
  # Every scheme's variant is evaluated the same way: two schemes on 256
  # windows keep the test short (the full command compiles 13 models).
  from sensorquant_jax._src import example_model

  load = example_model.load_example

  def small():
    model, variables, split = load()
    return model, variables, {k: v[:256] for k, v in split.items()}

  monkeypatch.setattr(example_model, "load_example", small)
  monkeypatch.setattr(sq, "SCHEMES", ("symmetric_per_tensor_int8", "asymmetric_per_channel_int8"))
  assert cli.main(["eval"]) == 0
  out = capsys.readouterr().out
  for scheme in ("symmetric_per_tensor_int8", "asymmetric_per_channel_int8"):
    assert out.count(scheme) == 2  # weight-only and W8A8
  assert "w8a8" in out and "float32" in out and "256 held-out windows" in out


def test_quantize_file_source(tmp_path, capsys):
  rng = np.random.default_rng(0)
  np.savez(
    tmp_path / "p.npz",
    **{
      "params/fc/kernel": rng.standard_normal((64, 64)).astype(np.float32),
      "params/fc/bias": np.zeros(64, np.float32),
    },
  )
  assert (
    cli.main(
      [
        "quantize",
        str(tmp_path / "p.npz"),
        "--out",
        str(tmp_path / "q"),
        "--manifest",
        str(tmp_path / "p.json"),
      ]
    )
    == 0
  )
  assert "1 of 2 leaves quantized" in capsys.readouterr().out
  assert m.QuantizedModel.load(tmp_path / "p.json").layers[0].name == "fc"
  rules = tmp_path / "rules.json"
  rules.write_text(json.dumps([["fc/kernel", None]]))
  assert (
    cli.main(
      ["quantize", str(tmp_path / "p.npz"), "--out", str(tmp_path / "q2"), "--rules", str(rules)]
    )
    == 0
  )
  assert "0 of 2 leaves quantized" in capsys.readouterr().out


def _bad_inputs(tmp):
  (tmp / "corrupt.npz").write_bytes(b"PK\x03\x04garbage")
  (tmp / "bad.json").write_text('{"config_json": "{}", "layers": [')
  (tmp / "weights.txt").write_text("1 2 3")
  (tmp / "rules.json").write_text("{not json")
  os.makedirs(tmp / "empty_dir", exist_ok=True)
  nan = tmp / "nan.npz"
  w = np.ones((64, 64), np.float32)
  w[0, 0] = np.nan
  np.savez(nan, **{"params/fc/kernel": w})
  return [
    (["quantize", str(tmp / "missing.npz"), "--out", str(tmp / "o1")], "no such file"),
    (["quantize", str(tmp / "corrupt.npz"), "--out", str(tmp / "o2")], "cannot read"),
    (["quantize", str(tmp / "weights.txt"), "--out", str(tmp / "o3")], "unknown checkpoint"),
    (["quantize", str(tmp / "nan.npz"), "--out", str(tmp / "o4")], "1 NaN"),
    (["quantize", "--out", str(tmp / "o5"), "--rules", str(tmp / "rules.json")], "rules"),
    (["inspect", str(tmp / "bad.json")], "layers"),
    (["inspect", str(tmp / "nothing")], "no such file"),
    (["eval", str(tmp / "empty_dir")], "not a sensorquant checkpoint"),
    (["convert", str(tmp / "bad.json"), str(tmp / "x")], "unexpected end"),
    (["convert", str(tmp / "missing"), str(tmp / "x")], "no such file"),
  ]


def test_bad_input_in_process(tmp_path, capsys):
  for argv, needle in _bad_inputs(tmp_path):
    assert cli.main(argv) == cli.EXIT_BAD_INPUT, argv
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sensorquant: error:"), (argv, err)
    assert needle in lines[0], (argv, lines[0])
    assert "Traceback" not in err


@pytest.mark.parametrize("entry", ["console", "module"])
def test_bad_input_as_a_process(entry, tmp_path):
  exe = os.path.join(os.path.dirname(sys.executable), "sensorquant")
  cmd = (
    [exe]
    if entry == "console" and os.path.exists(exe)
    else [sys.executable, "-m", "sensorquant_jax"]
  )
  proc = subprocess.run(
    [*cmd, "inspect", str(tmp_path / "nope.json")],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert proc.returncode == cli.EXIT_BAD_INPUT
  assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
  assert proc.stderr.startswith("sensorquant: error:")


def test_bits_per_weight_and_method_options(tmp_path, capsys):
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((256, 64)).astype(np.float32)
  kernel[:, 3] *= 50  # an outlier column: per-tensor int8 would lose it
  np.savez(tmp_path / "p.npz", **{"params/fc/kernel": kernel, "params/fc/bias": np.zeros(64)})
  src = str(tmp_path / "p.npz")
  assert cli.main(["quantize", src, "--out", str(tmp_path / "q"), "--bits-per-weight", "5"]) == 0
  assert "bits/weight (budget 5.0)" in capsys.readouterr().out
  q = sq.restore(tmp_path / "q")["params"]["fc"]["kernel"]
  assert 8 * q.nbytes / q.size <= 5.0 and q.bits == 4
  for argv, message in [
    (["--bits-per-weight", "0"], "expected a positive number"),
    (["--bits-per-weight", "nan"], "expected a positive number"),
    (["--bits-per-weight", "2"], "below the smallest choice"),
    (["--method", "gptq"], "needs a model and its inputs"),
    (["--method", "sgd"], "invalid choice"),
    (["--method", "qat"], "needs a model and its inputs"),
    (["--steps", "10"], "--steps sets the training of --method qat"),
    (["--method", "qat", "--steps", "0"], "--steps"),
    (["--method", "qat", "--bits-per-weight", "5"], "not qat"),
    (["--method", "awq+gptq", "--bits-per-weight", "5"], "not awq+gptq"),
  ]:
    code = cli.main(["quantize", src, "--out", str(tmp_path / "x"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, (argv, err)
  assert not os.path.exists(tmp_path / "x")


def test_quantize_method_qat_and_the_checkpoint_in_a_new_process(tmp_path, capsys):
  """``--method qat`` trains the bundled model through int4; its checkpoint, restored in a
  new process and run through ``sq.apply``, gives the accuracy the command printed."""
  out = str(tmp_path / "qat")
  argv = ["quantize", "--method", "qat", "--steps", "5", "--scheme", "symmetric_per_group_int4"]
  assert cli.main([*argv, "--out", out]) == 0
  printed = capsys.readouterr().out
  assert "method qat" in printed and "subjects 25-30" in printed
  line = next(s for s in printed.splitlines() if s.strip().startswith("int4"))
  accuracy = line.split("accuracy")[1].split(",")[0].strip()
  code = (
    "import jax, sys\n"
    "import sensorquant_jax as sq\n"
    "from sensorquant_jax._src.example_model import accuracy, load_example\n"
    "model, _, split = load_example()\n"
    "held = split['subject'] > 24\n"
    "q = sq.restore(sys.argv[1])\n"
    "acc = accuracy(jax.jit(lambda x: sq.apply(model, q, x)), split['x'][held], split['y'][held])\n"
    "print(f'{acc:.2%}')\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code, out], capture_output=True, text=True, cwd=ROOT, timeout=300
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == accuracy
